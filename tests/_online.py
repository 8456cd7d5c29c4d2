"""Shared checks of the online stages (PPO, GRPO): a run killed mid-rollout and resumed ends as an
uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignment.stages import Stage


def adapter_tensors(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "head.safetensors").exists():
        tensors.update({f"head.{k}": v for k, v in load_file(str(folder / "head.safetensors")).items()})
    return tensors


def check_kill_mid_rollout_then_resume(tmp_path, make_stage, name: str, folders: tuple[str, ...], monkeypatch):
    """4 steps = 2 rollouts of 2 updates each (`make_stage(out, resume=...)` builds such a stage); the
    kill comes in the middle of the second rollout, after the step-2 checkpoint: the resumed run redoes
    that rollout identically and ends with the uninterrupted run's adapters (`folders`) and losses."""
    straight = tmp_path / "straight"
    make_stage(straight).run(None)

    crashed = tmp_path / "crashed"
    original = Stage._optimizer_step

    def crash_at_step_4(self, optimizer, params, stream, step):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, optimizer, params, stream, step)

    monkeypatch.setattr(Stage, "_optimizer_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        make_stage(crashed).run(None)
    monkeypatch.setattr(Stage, "_optimizer_step", original)
    checkpoints = sorted(p.name for p in (crashed / name / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-000002"]  # only on rollout boundaries
    entry = make_stage(crashed, resume=True).run(None)

    for folder in folders:
        a, b = adapter_tensors(straight / folder), adapter_tensors(crashed / folder)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    straight_history = json.loads((straight / name / "checkpoints" / "step-000004" / "state.json").read_text())
    assert [h["loss"] for h in entry["history"]] == [h["loss"] for h in straight_history["history"]]
