"""Extending a run on resume (`alignment/stages/checkpoint.py`: `EXTENDABLE`, `check_fingerprint`): a larger
`max_steps` trains on from the newest checkpoint, with a notice; any other change stays refused.

What is asserted, and why: the learning-rate schedule's length is `max_steps` itself, so from the
checkpoint's step on the extended run follows the longer run's schedule (as HF Trainer does). With a
constant schedule steps 1-3 of a 3-step run are those of a 6-step run, so the extended run *is* the
6-step run: the same weights and losses, exactly. With cosine the first 3 steps decayed faster (to the
3-step floor), so only the learning rates of steps 4-6 equal the 6-step run's; the weights differ.
Loop rows on the toy stage (tests/_toy_stage.py), recipe rows on tiny-mllama."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.config import ConfigError
from alignment.recipe import load_recipe, run_recipe
from alignment.stages import checkpoint as ckpt
from alignment.stages.schedule import lr_at
from tests._toy_stage import toy_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def fingerprint(max_steps: int, **more) -> dict:
    return {"max_steps": max_steps, "batch_size": 2, "world_size": 1, "lr": 0.1, **more}


def test_check_fingerprint_returns_what_a_larger_max_steps_extends():
    assert ckpt.check_fingerprint("f", fingerprint(3), fingerprint(3)) == {}
    assert ckpt.check_fingerprint("f", fingerprint(3), fingerprint(6)) == {"max_steps": (3, 6)}
    with pytest.raises(ckpt.CheckpointError, match=r"f was written by a different recipe \(changed: max_steps 6 -> 4\)"):
        ckpt.check_fingerprint("f", fingerprint(6), fingerprint(4))  # shorter: refused
    with pytest.raises(ckpt.CheckpointError, match=r"\(changed: lr 0.1 -> 0.2\); resume with the same recipe"):
        ckpt.check_fingerprint("f", fingerprint(3), fingerprint(6, lr=0.2))  # longer, and another change


def test_a_larger_max_steps_trains_on_and_is_the_longer_run(tmp_path, capsys):
    """Constant schedule: 3 steps, then resume with max_steps 6 == 6 steps straight (weights, losses)."""
    straight = toy_stage(tmp_path / "straight", max_steps=6, fingerprint=fingerprint(6))
    straight.train()
    toy_stage(tmp_path, max_steps=3, fingerprint=fingerprint(3)).train()
    longer = toy_stage(tmp_path, resume=True, max_steps=6, fingerprint=fingerprint(6))
    assert longer.train() == 6
    out = capsys.readouterr().out
    assert ("[toy] extending: max_steps 3 -> 6; training on from step 3 to 6, the learning-rate schedule now that "
            "of a 6-step run from step 4 on") in out
    assert torch.equal(longer.policy.w, straight.policy.w)
    assert [h["loss"] for h in longer.history] == [h["loss"] for h in straight.history]
    assert ckpt.latest_checkpoint(tmp_path / "toy/checkpoints").name == "step-000006"


def test_with_cosine_the_later_steps_follow_the_longer_schedule(tmp_path):
    """Cosine from 0.1 to 0.01: steps 1-3 keep the 3-step schedule's rates, steps 4-6 take the 6-step's."""
    options = dict(lr_schedule="cosine", min_lr_ratio=0.1)
    straight = toy_stage(tmp_path / "straight", max_steps=6, fingerprint=fingerprint(6), **options)
    straight.train()
    toy_stage(tmp_path, max_steps=3, fingerprint=fingerprint(3), **options).train()
    longer = toy_stage(tmp_path, resume=True, max_steps=6, fingerprint=fingerprint(6), **options)
    longer.train()
    rates = [h["lr"] for h in longer.history]
    assert rates[:3] == [lr_at(s, 3, 0.1, 0, "cosine", 0.1) for s in range(3)]
    assert rates[3:] == [h["lr"] for h in straight.history[3:]] == [lr_at(s, 6, 0.1, 0, "cosine", 0.1) for s in range(3, 6)]


# ----------------------------------------------------------------------------- recipes
def write_recipe(path, out, stages=(("sft", 3),)):
    """Tiny recipe on tiny-mllama: stages (type, max_steps), batch 4, constant learning rate."""
    raw = {"name": "extend", "output_dir": str(out), "seed": 0,
           "model": {"name": "tiny-mllama", "quantization": "none"},
           "data": {"num_covers": 40, "max_eval_examples": 2},
           "stages": [{"type": kind, "name": kind, "max_steps": steps, "batch_size": 4, "save_every": 2,
                       "lr_schedule": "constant", "warmup_steps": 0, "eval_examples": 2, "eval_batch_size": 2,
                       "max_new_tokens": 2, **({"blind_control": False} if kind == "sft" else {})}
                      for kind, steps in stages]}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_resume_with_a_larger_max_steps_continues_a_finished_run(tmp_path, capsys):
    """A finished 3-step SFT run, then `resume=true stages.0.max_steps=6` (refused as "a different
    recipe" before): steps 4-6 run, and the run equals a 6-step run: losses, adapter, report."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    straight = run_recipe(load_recipe(recipe, [f"output_dir={tmp_path / 'straight'}", "stages.0.max_steps=6"]))
    run_recipe(load_recipe(recipe))
    capsys.readouterr()
    report = run_recipe(load_recipe(recipe, ["resume=true", "stages.0.max_steps=6"]))
    assert "[sft] extending: max_steps 3 -> 6; training on from step 3 to 6" in capsys.readouterr().out
    (mine,), (theirs,) = report["stages"], straight["stages"]
    assert mine["steps"] == 6 and [h["step"] for h in mine["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in mine["history"]] == [h["loss"] for h in theirs["history"]]
    assert mine["eval"] == theirs["eval"]
    assert json.loads((tmp_path / "out/report.json").read_text())["stages"][0]["steps"] == 6
    a, b = (load_file(str(tmp_path / run / "sft/adapter_model.safetensors")) for run in ("straight", "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_last_started_stage_may_be_extended(tmp_path):
    """SFT (2 steps) then DPO (1 step), finished: extending SFT is refused (DPO was trained on the 2-step
    SFT adapter), nothing is touched; extending DPO to 2 steps trains its one more step."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", stages=(("sft", 2), ("dpo", 1)))
    run_recipe(load_recipe(recipe))
    before = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.safetensors"))}
    with pytest.raises(ConfigError, match=r"^stages\.0\.max_steps: 2 -> 4 would extend stage 'sft', but stage 'dpo' "
                                          r"was already trained on its 2-step result; extend only the last started"):
        run_recipe(load_recipe(recipe, ["resume=true", "stages.0.max_steps=4"]))
    assert before == {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.safetensors"))}
    shutil.copy(tmp_path / "out/report.json", tmp_path / "report-before.json")
    report = run_recipe(load_recipe(recipe, ["resume=true", "stages.1.max_steps=2"]))
    sft, dpo = report["stages"]
    assert sft["steps"] == 2 and dpo["steps"] == 2 and [h["step"] for h in dpo["history"]] == [1, 2]
    assert sft == json.loads((tmp_path / "report-before.json").read_text())["stages"][0]  # not run again
