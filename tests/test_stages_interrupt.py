"""Ctrl-C (SIGINT) as SIGTERM (`alignment/stages/interrupt.py`): a checkpoint of the step under way, exit
130, one line with the command that continues; that command resumes from the step and ends as an
uninterrupted run. Loop rows on the toy stage (tests/_toy_stage.py); one real `python launch/run.py`
run on tiny-mllama interrupted from outside, with `save_every` beyond the run's length (before, such a
run saved nothing and printed a KeyboardInterrupt traceback)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.recipe import load_recipe, run_recipe
from alignment.stages import checkpoint as ckpt
from alignment.stages.interrupt import Interrupted, interruptible, resume_command
from tests._toy_stage import toy_stage

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_sigint_in_the_loop_checkpoints_the_step_exits_130_and_resume_continues(tmp_path, capfd):
    """Ctrl-C during step 3 of 6 with save_every 50: the step finishes, its checkpoint is written, the
    stage exits 130 with one line; the handlers are restored; resume=true runs steps 4-6 and ends on
    the uninterrupted run's weights and losses."""
    straight = toy_stage(tmp_path / "straight", save_every=50)
    straight.train()
    stage = toy_stage(tmp_path, save_every=50, on_call=lambda n: n == 3 and os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as info:
        stage.train()
    assert info.value.code == 130 and isinstance(info.value, Interrupted)
    assert ckpt.latest_checkpoint(tmp_path / "toy/checkpoints").name == "step-000003"
    captured = capfd.readouterr()  # the handler's notice goes to file descriptor 2
    lines = [line for line in captured.out.splitlines() if "interrupted at step" in line]
    assert lines == [f"[toy] interrupted at step 3; continue with resume=true: {resume_command(tmp_path)} "
                     f"(checkpoint of step 3 saved in {tmp_path / 'toy/checkpoints'})"]
    assert "SIGINT: finishing this step, then a checkpoint" in captured.err and "Traceback" not in captured.err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is not stage._stop
    resumed = toy_stage(tmp_path, save_every=50, resume=True)
    assert resumed.train() == 6 and "resumed from" in capfd.readouterr().out
    assert torch.equal(resumed.policy.w, straight.policy.w)
    assert [h.get("loss") for h in resumed.history] == [h.get("loss") for h in straight.history]


def test_a_second_ctrl_c_stops_at_once_without_that_steps_checkpoint(tmp_path, capfd):
    """Two Ctrl-C during step 3: exit 130 from inside the step; the newest checkpoint is step 2's."""

    def twice(call):
        if call == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    stage = toy_stage(tmp_path, save_every=2, on_call=twice)
    with pytest.raises(SystemExit) as info:
        stage.train()
    assert info.value.code == 130 and len(stage.history) == 2
    assert ckpt.latest_checkpoint(tmp_path / "toy/checkpoints").name == "step-000002"
    assert "second Ctrl-C: stopping without a checkpoint of this step" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("saved", [True, False], ids=["after the recipe is saved", "before"])
def test_outside_a_loop_a_signal_stops_at_once_with_one_line(tmp_path, capsys, saved):
    """SIGINT / SIGTERM outside a training loop (loading, evaluation): `Interrupted` at once, 130 / 143,
    one line: the command to continue, or that there is nothing to continue yet."""
    if saved:
        (tmp_path / "recipe.yaml").write_text("name: x\n")
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with pytest.raises(SystemExit) as info, interruptible(tmp_path):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
        assert info.value.code == code
        out = capsys.readouterr().out.splitlines()
        expected = (f"interrupted; continue with resume=true: {resume_command(tmp_path)} (from the newest complete "
                    "checkpoint)") if saved else "interrupted before the run started; nothing to continue (run the same command again)"
        assert out == [expected]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_command_names_the_saved_recipe_and_the_program(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    assert resume_command(tmp_path, argv0="launch/run.py") == f"python launch/run.py {recipe} resume=true"
    assert resume_command(tmp_path, argv0="/usr/bin/vlm-align") == f"vlm-align train {recipe} resume=true"
    assert resume_command(tmp_path, world_size=2).startswith("accelerate launch <the same launch options> "
                                                             f"launch/run.py {recipe} resume=true")
    assert shlex.split(resume_command(Path("/tmp/a b"), argv0="run.py"))[2] == "/tmp/a b/recipe.yaml"


# ----------------------------------------------------------------------------- a real run
def write_recipe(path, out):
    """Tiny SFT on tiny-mllama: 6 steps of 4, save_every 50 (no checkpoint before the last step)."""
    raw = {"name": "ctrl-c", "output_dir": str(out), "seed": 0,
           "model": {"name": "tiny-mllama", "quantization": "none"},
           "data": {"num_covers": 40, "max_eval_examples": 2},
           "stages": [{"type": "sft", "name": "sft", "max_steps": 6, "batch_size": 4, "save_every": 50,
                       "warmup_steps": 0, "eval_examples": 2, "eval_batch_size": 2, "max_new_tokens": 2,
                       "blind_control": False}]}
    Path(path).write_text(yaml.safe_dump(raw))
    return Path(path)


SLOW_CHILD = """
import runpy, sys, time
from alignment.stages.base import Stage
step = Stage._optimizer_step
def slow(self, *args):
    time.sleep(0.5)  # so that Ctrl-C lands mid-run
    return step(self, *args)
Stage._optimizer_step = slow
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_on_launch_run_py_checkpoints_exits_130_and_the_printed_command_continues(tmp_path):
    """`python launch/run.py` given SIGINT after its second step (save_every 50): exit 130, no
    traceback, a checkpoint of the step it was on, one line with the command; that command, run as
    printed, continues from that step and ends on the uninterrupted run's adapter and losses."""
    reference = tmp_path / "reference"
    straight = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", reference)))

    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VLM_ALIGN_LEDGER": str(ledger)}
    cmd = [sys.executable, "-c", SLOW_CHILD, "launch/run.py", str(tmp_path / "r.yaml"), f"output_dir={out}"]
    with open(tmp_path / "log", "w") as log:
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + 300
        while child.poll() is None and len(ledger.read_text().splitlines() if ledger.exists() else []) < 2:
            assert time.time() < deadline, "no second step after 300 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=300)
    log = (tmp_path / "log").read_text()
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "interrupted at step" in line]
    assert len(lines) == 1, log[-3000:]
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert 2 <= step < 6 and ckpt.latest_checkpoint(out / "sft/checkpoints").name == f"step-{step:06d}"
    command = lines[0].split("continue with resume=true: ")[1].split(" (checkpoint")[0]
    assert command == f"python launch/run.py {out / 'recipe.yaml'} resume=true"

    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, *argv[1:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {out / 'sft/checkpoints'}/step-{step:06d} at step {step}" in resumed.stdout
    report = json.loads((out / "report.json").read_text())
    assert [h["loss"] for h in report["stages"][0]["history"]] == [h["loss"] for h in straight["stages"][0]["history"]]
    a, b = (load_file(str(folder / "sft/adapter_model.safetensors")) for folder in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
