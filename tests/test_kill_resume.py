"""Resume exactness after SIGKILL: SFT then DPO, killed at several moments (mid-step, between the
optimizer step and its checkpoint, during a checkpoint write, right after one, during evaluation,
and at a random time from outside), resumed each time with resume=true. The end must equal an
uninterrupted run: adapters, final optimizer state, report metrics and the sample ledger
(`VLM_ALIGN_LEDGER`: the ids each optimizer step trained on, appended after the step).

The kills come from inside a child `launch/run.py` (SIGKILL to itself at a chosen point, set by
KILL_AT=stage:step:where), so each moment is hit exactly; one more comes from the parent at a
random time.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.recipe import load_recipe, run_recipe
from alignment.stages import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import os, runpy, signal, sys
from alignment.stages import STAGES, base, checkpoint as ckpt
from alignment.stages.engine import StepEngine

stage, at, where = os.environ["KILL_AT"].split(":")
target, current = (stage, int(at)), [None]

def die_if(point):
    if where == point and current[0] == target:
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, name, point, before=True):
    real = getattr(owner, name)
    def hooked(*args, **kwargs):
        if before:
            die_if(point)
        result = real(*args, **kwargs)
        if not before:
            die_if(point)
        return result
    setattr(owner, name, hooked)

real_step = base.Stage._optimizer_step
def optimizer_step(self, optimizer, params, stream, step):
    current[0] = (self.config.name, step + 1)
    return real_step(self, optimizer, params, stream, step)
base.Stage._optimizer_step = optimizer_step

wrap(StepEngine, "grad_norm_and_clip", "grad")            # mid-step: after backward, before optimizer.step
wrap(base.Stage, "_save", "save")                          # after the step (and its ledger line), no checkpoint
wrap(ckpt, "rng_state", "rng")                             # checkpoint half written: adapters, optimizer
wrap(ckpt, "write_manifest", "manifest")                   # checkpoint fully staged, no manifest
wrap(ckpt, "publish", "published", before=False)           # checkpoint renamed into place and pruned
for kind in STAGES.values():
    wrap(kind, "evaluate", "evaluate")                     # stage adapter saved, report not yet written

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

QUICK = ["sft:2:manifest", "dpo:3:grad"]
FULL = ["sft:2:manifest", "sft:4:save", "sft:6:evaluate", "dpo:2:rng", "dpo:3:grad", "dpo:4:published", "random"]


def write_recipe(path, out):
    stage = {"max_steps": 6, "batch_size": 4, "save_every": 1, "keep_checkpoints": 2, "warmup_steps": 0,
             "eval_examples": 2, "eval_batch_size": 2, "max_new_tokens": 2}
    raw = {"name": "kill", "output_dir": str(out), "seed": 0,
           "model": {"name": "tiny-mllama", "quantization": "none"},
           "data": {"num_covers": 40, "max_eval_examples": 2},
           "stages": [{"type": "sft", "name": "sft", "blind_control": False, **stage},
                      {"type": "dpo", "name": "dpo", **stage}]}
    Path(path).write_text(yaml.safe_dump(raw))
    return Path(path)


def read_ledger(path):
    """(stage, step) -> ids of the step's micro-batches; a step written twice (replayed after a resume)
    must have trained on the same ids both times."""
    steps = {}
    for line in Path(path).read_text().splitlines():
        entry = json.loads(line)
        key = (entry["stage"], entry["step"])
        assert steps.setdefault(key, entry["ids"]) == entry["ids"], f"step {key} replayed on other samples"
        steps[key] = entry["ids"]
    return steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the children (OMP_NUM_THREADS=1): exact comparison
    os.environ["VLM_ALIGN_LEDGER"] = str(folder / "ledger.jsonl")
    try:
        run_recipe(load_recipe(write_recipe(folder / "r.yaml", folder / "out")))
    finally:
        del os.environ["VLM_ALIGN_LEDGER"]
        torch.set_num_threads(threads)
    return folder


def _launch(recipe, out, ledger, kill_at, resume):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VLM_ALIGN_LEDGER": str(ledger),
           "KILL_AT": kill_at if kill_at != "random" else "none:0:none"}
    cmd = [sys.executable, "-c", CHILD, str(ROOT / "launch" / "run.py"), str(recipe), f"output_dir={out}",
           f"resume={'true' if resume else 'false'}"]
    log = open(out.parent / "log", "a")
    child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent)
    if kill_at == "random":  # from outside, at a random moment once DPO's step-5 checkpoint exists
        deadline = time.time() + 300
        while child.poll() is None and not (out / "dpo/checkpoints/step-000005/manifest.json").exists():
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(random.uniform(0, 0.5))
        child.send_signal(signal.SIGKILL)
    code = child.wait(timeout=300)
    log.close()
    return code


def _kill_and_resume(tmp_path, uninterrupted, kills):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    recipe = write_recipe(tmp_path / "r.yaml", out)
    for i, kill_at in enumerate(kills):
        code = _launch(recipe, out, ledger, kill_at, resume=i > 0)
        log = (tmp_path / "log").read_text()
        assert code in ((-signal.SIGKILL, 0) if kill_at == "random" else (-signal.SIGKILL,)), log[-3000:]
        if kill_at == "sft:2:manifest":  # killed during the write: staged folder left, step 1 is the newest
            assert (out / "sft/checkpoints/.step-000002.tmp/optimizer.pt").exists()
            assert ckpt.latest_checkpoint(out / "sft/checkpoints").name == "step-000001"
    assert _launch(recipe, out, ledger, "none:0:none", resume=True) == 0, (tmp_path / "log").read_text()[-3000:]

    reference = uninterrupted / "out"
    for stage in ("sft", "dpo"):
        a, b = (load_file(str(folder / stage / "adapter_model.safetensors")) for folder in (reference, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    opt_a, opt_b = (ckpt.safe_load(folder / "dpo/checkpoints/step-000006/optimizer.pt") for folder in (reference, out))
    assert opt_a["state"].keys() == opt_b["state"].keys()
    assert all(torch.equal(v, opt_b["state"][k][n]) for k, s in opt_a["state"].items() for n, v in s.items())
    mine, theirs = (json.loads((folder / "report.json").read_text()) for folder in (out, reference))
    for x, y in zip(mine["stages"], theirs["stages"], strict=True):
        assert x["eval"] == y["eval"] and x["steps"] == y["steps"] == 6
        assert [h.get("loss") for h in x["history"]] == [h.get("loss") for h in y["history"]]
    steps, expected = read_ledger(ledger), read_ledger(uninterrupted / "ledger.jsonl")
    assert steps == expected and len(steps) == 12
    assert Counter(i for ids in steps.values() for i in ids) == Counter(i for ids in expected.values() for i in ids)


def test_sigkill_during_a_checkpoint_write_and_mid_step_resumes_exactly(tmp_path, uninterrupted):
    _kill_and_resume(tmp_path, uninterrupted, QUICK)


@pytest.mark.slow
def test_sigkill_at_seven_moments_resumes_exactly(tmp_path, uninterrupted):
    _kill_and_resume(tmp_path, uninterrupted, FULL)
