"""Reliability: the README's bad-input catalogue, one test per row; non-finite and empty steps;
checkpoints kept; SIGTERM; determinism.

CLI rows run `train_main` (what `launch/run.py` calls) and check what the user sees: exit code 2
and one `error: ...` line naming the file, row or key and what to do, no traceback; two rows also
run `python launch/run.py` in a subprocess, with and without --debug. Loop rows run the real loop
on a toy stage (tests/_toy_stage.py). Image-path rows are also covered by tests/test_data_validate.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.cli import train_main
from alignment.recipe import load_recipe, run_recipe
from alignment.stages import checkpoint as ckpt
from alignment.stages.base import NonFiniteLossError, rank_seed
from tests._toy_stage import toy_stage

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def write_recipe(path, out, stages=("sft",), data=None, top=None, **stage):
    """A tiny recipe file: 40 covers, 6 steps of 4, checkpoints every 2 steps, 2 eval examples."""
    raw = {"name": "tiny", "output_dir": str(out), "seed": 0,
           "model": {"name": "tiny-mllama", "quantization": "none"},
           "data": {"num_covers": 40, "max_eval_examples": 2, **(data or {})},
           "stages": [{"type": kind, "name": kind, "max_steps": 6, "batch_size": 4, "save_every": 2,
                       "warmup_steps": 0, "eval_examples": 2, "eval_batch_size": 2, "max_new_tokens": 2,
                       **({"blind_control": False} if kind == "sft" else {}), **stage} for kind in stages],
           **(top or {})}
    Path(path).write_text(yaml.safe_dump(raw))
    return Path(path)


def cli(capsys, *argv):
    """`train_main(argv)` in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = train_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *needles):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def final_losses(report):
    return [h.get("loss") for stage in report["stages"] for h in stage["history"]]


# ----------------------------------------------------------------------------- catalogue: recipe
def test_cli_subprocess_one_line_error_and_debug_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - {type: sft, learning_rat: 0.1}\n")
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), str(path)]
    plain = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plain.stderr.splitlines() == [plain.stderr.strip()] and plain.returncode == 2, plain.stderr
    assert_one_line_error(plain.returncode, plain.stderr, str(path), "unknown key(s) ['learning_rat']", "'lr'")
    debug = subprocess.run(cmd + ["--debug"], env=env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


RECIPE_ROWS = {
    "wrong type": ("stages:\n  - {type: sft, batch_size: big}\n", "stages.0.batch_size: expected int, got 'big'"),
    "wrong type (bool for int)": ("stages:\n  - {type: sft, max_steps: true}\n", "stages.0.max_steps: expected int"),
    "unknown key": ("outptu_dir: x\nstages:\n  - {type: sft}\n", "unknown key(s) ['outptu_dir']; valid keys"),
    "unknown stage type": ("stages:\n  - {type: rlhf}\n", "unknown stage type 'rlhf'; valid: ['dpo', 'grpo', 'ppo'"),
    "zero lr": ("stages:\n  - {type: sft, lr: 0}\n", "lr: must be > 0, got 0.0"),
    "negative lr": ("stages:\n  - {type: dpo, lr: -1.0e-4}\n", "lr: must be > 0, got -0.0001"),
    "zero batch size": ("stages:\n  - {type: sft, batch_size: 0}\n", "batch_size: must be > 0, got 0"),
    "negative batch size": ("stages:\n  - {type: dpo, batch_size: -4}\n", "batch_size: must be > 0, got -4"),
    "not YAML": ("stages: [\n", "not valid YAML"),
    "loss_weights not matching a list loss_type": (
        "stages:\n  - {type: dpo, loss_type: [sigmoid, bco_pair, sft], loss_weights: [0.8, 0.2]}\n",
        "stages.dpo.loss_weights: 2 weight(s) for the 3 loss types ['sigmoid', 'bco_pair', 'sft']"),
    "loss_weights with a single loss_type": (
        "stages:\n  - {type: dpo, loss_type: sigmoid, loss_weights: [1.0]}\n",
        "stages.dpo.loss_weights: weights a list loss_type"),
    "negative loss weight": (
        "stages:\n  - {type: dpo, loss_type: [sigmoid, sft], loss_weights: [1.0, -0.5]}\n",
        "stages.dpo.loss_weights: must be >= 0, got -0.5 (for sft)"),
    "unknown loss type": ("stages:\n  - {type: dpo, loss_type: simpoo}\n",
                          "stages.dpo.loss_type: unknown loss type 'simpoo'; valid: ['apo_down', 'apo_zero', 'bco_pair'"),
    "reference-free loss with a reference pass": (
        "stages:\n  - {type: dpo, loss_type: simpo, precompute_ref_logprobs: true}\n",
        "stages.dpo.precompute_ref_logprobs: loss_type simpo is reference-free: there is no reference to precompute"),
}


@pytest.mark.parametrize("row", RECIPE_ROWS, ids=list(RECIPE_ROWS))
def test_catalogue_recipe_rows(tmp_path, capsys, row):
    text, needle = RECIPE_ROWS[row]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert_one_line_error(*cli(capsys, path), str(path), needle)


def test_catalogue_bad_override(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out")
    assert_one_line_error(*cli(capsys, path, "stages.0.lr=[1"), "override 'stages.0.lr=[1'", "not a valid YAML value")
    assert_one_line_error(*cli(capsys, path, "stages.3.lr=1"), "stages.3 does not exist")


def test_catalogue_output_dir_not_writable(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")  # root ignores permissions: use a file as parent
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "file" / "out")
    assert_one_line_error(*cli(capsys, path), f"output_dir {tmp_path / 'file' / 'out'} is not writable",
                          "choose another output_dir=")


# ----------------------------------------------------------------------------- catalogue: data
def _png(path, color=(200, 10, 10)):
    from PIL import Image

    Image.new("RGB", (16, 16), color).save(path)


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def qa(image, answer="Kenji Sato"):
    return {"image": image, "questions": ["Who wrote this book?"], "answers": [answer]}


def make_data(folder: Path, row: str):
    """Write a data file whose line 2 (line 1 for too_long) has the problem; (data config, stage type)."""
    folder.mkdir()
    _png(folder / "a.png")
    data, kind, rows = {"source": str(folder / "rows.jsonl"), "eval_fraction": 0.0}, "sft", None
    if row == "corrupt image bytes":
        (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        rows = [qa("a.png"), qa("bad.png")]
    elif row == "missing image file":
        rows = [qa("a.png"), qa("gone.png")]
    elif row == "image path escaping the data folder":
        _png(folder.parent / "secret.png")
        rows = [qa("a.png"), qa("../secret.png")]
    elif row == "empty answer":
        rows = [qa("a.png"), qa("a.png", answer="")]
    elif row == "chosen == rejected":
        kind = "dpo"
        pair = {"image": "a.png", "question": "Who wrote this book?", "chosen": "Kenji Sato"}
        rows = [pair | {"rejected": "Maria Lopez"}, pair | {"rejected": "Kenji Sato"}]
    elif row == "longer than max_length":
        rows, data["max_length"] = [qa("a.png"), qa("a.png")], 8
    elif row == "wrong column names":
        rows = [{"img": "a.png", "question_text": "Who wrote this book?", "reply": "Kenji Sato"}]
    _rows(folder / "rows.jsonl", rows)
    return data, kind


DATA_ROWS = {
    "corrupt image bytes": ("rows.jsonl: line 2, field 'image'", "cannot be decoded as an image", "Re-encode"),
    "missing image file": ("rows.jsonl: line 2, field 'image'", "gone.png does not exist", "Fix the path"),
    "image path escaping the data folder": ("rows.jsonl: line 2, field 'image'", "outside the data folder",
                                            "Keep images inside the data folder"),
    "empty answer": ("rows.jsonl: line 2, field 'answers[0]'", "empty answer", "Fill in the answer",
                     "data.on_error=skip"),
    "chosen == rejected": ("rows.jsonl: line 2, field 'rejected'", "chosen == rejected", "two different answers"),
    "longer than max_length": ("rows.jsonl: line 1, field 'answers[0]'", "over max_length=8",
                               "Raise data.max_length", "data.on_error=skip"),
    "wrong column names": ("rows.jsonl: cannot tell the data format from the columns ['img', 'question_text'",
                           "or set data.format"),
}


@pytest.mark.parametrize("row", DATA_ROWS, ids=list(DATA_ROWS))
def test_catalogue_data_rows(tmp_path, capsys, row):
    data, kind = make_data(tmp_path / "data", row)
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", stages=(kind,), data=data)
    assert_one_line_error(*cli(capsys, path), *DATA_ROWS[row])
    assert not (tmp_path / "out" / kind).exists()  # refused before any training


def test_catalogue_data_row_through_launch_run_py(tmp_path):
    data, kind = make_data(tmp_path / "data", "corrupt image bytes")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data=data)
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), str(path)], env=env(),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, *DATA_ROWS["corrupt image bytes"])


# ----------------------------------------------------------------------------- catalogue: data size
def five_rows(folder: Path, covers: int = 5) -> dict:
    """A newcomer's first data set: five rows on `covers` images; the data config (eval_fraction 0.15)."""
    folder.mkdir()
    for i in range(covers):
        _png(folder / f"c{i}.png", (40 * i, 10, 10))
    _rows(folder / "rows.jsonl", [qa(f"c{i % covers}.png", answer=f"Author {i}") for i in range(5)])
    return {"source": str(folder / "rows.jsonl"), "eval_fraction": 0.15}


@pytest.mark.parametrize("dry_run", [True, False], ids=["--dry-run", "real run"])
def test_catalogue_batch_larger_than_the_data(tmp_path, capsys, dry_run):
    """batch_size 32 (the recipes' size) on five rows: one error line, exit 2, from --dry-run (which said
    "dry run ok" before the run died with a traceback, exit 1) and from a real run; nothing trained."""
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data=five_rows(tmp_path / "data"), batch_size=32)
    capsys.readouterr()
    code = train_main([str(path)] + (["--dry-run"] if dry_run else []))
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, "stages.0.batch_size: 32 is more than the 4 training examples of stage 'sft'",
                          "set stages.0.batch_size=4")
    assert "dry run ok" not in out and "[sft] data: 4 train, 1 val" in out  # five rows: one held out for val
    assert not (tmp_path / "out" / "sft").exists()


def test_catalogue_no_val_examples(tmp_path, capsys):
    """Five rows on one image (no second image to hold out): no val split. The run trains, says so in one
    warning line, and no val metric appears as 0.0: not on the console, not in report.json, not in the card."""
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data=five_rows(tmp_path / "data", covers=1),
                        max_steps=2)
    capsys.readouterr()
    assert train_main([str(path)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: no val examples")]
    assert len(warnings) == 1 and "split: val" in warnings[0] and "data.eval_fraction" in warnings[0], out
    assert "[sft] data: 5 train, 0 val, 0 test" in out and "sft [val]" not in out
    stage = json.loads((tmp_path / "out" / "report.json").read_text())["stages"][0]
    assert "eval" not in stage and "test" not in stage and stage["steps"] == 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No val examples, so no val metrics" in card and "| metric | val | test |" not in card
    from alignment.cli import main

    assert main(["eval", str(tmp_path / "out" / "sft")]) == 2  # `vlm-align eval` says so too, never 0.0
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar
    assert err.startswith("error: ") and "has no val examples" in err, err


def test_catalogue_image_over_40_megapixels(tmp_path, capsys, monkeypatch):
    """One warning line names the largest image and the resize tiny-mllama's processor applies anyway
    (the threshold is lowered here so that the test's images stay small)."""
    from alignment.data import images

    monkeypatch.setattr(images, "LARGE_IMAGE_PIXELS", 30 * 30)
    from PIL import Image

    data = five_rows(tmp_path / "data")  # 16x16 images: small
    Image.new("RGB", (64, 48)).save(tmp_path / "data" / "c1.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "c3.png")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", data=data)
    assert train_main([str(path), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: image")]
    assert lines == ["warning: image c1.png is 64x48 (0 megapixels) and 1 more; the model's processor resizes it to "
                     "fit 1 tile of 112x112 anyway: shrink such images beforehand to save memory and time"], lines


# ----------------------------------------------------------------------------- catalogue: loop
def test_all_labels_masked_step_contributes_nothing(tmp_path, capsys):
    """Step 2's batch has no counted token: no NaN, the step is skipped (Adam's momentum must not move w)."""
    stage = toy_stage(tmp_path, max_steps=3, masked_calls={2})
    stage.train()
    w = [load_file(str(tmp_path / "toy/checkpoints" / f"step-00000{s}/adapters/policy/adapter_model.safetensors"))["w"]
         for s in (2, 3)]
    assert {k: v for k, v in stage.history[1].items() if k != "samples_per_s"} == {
        "step": 2, "skipped_empty": 1, "lr": 0.1}
    assert all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in stage.history)
    assert stage.nonfinite_steps == 0 and "no counted tokens or pairs in the batch; step skipped" in capsys.readouterr().out
    one = toy_stage(tmp_path / "one", max_steps=1)
    one.train()
    assert torch.equal(w[0], one.policy.w.detach()) and not torch.equal(w[0], w[1])
    # the SFT loss itself counts 0 tokens and sums to 0 (not NaN) on an all-masked batch
    from alignment.losses import sft_loss_sum

    nll, count = sft_loss_sum(torch.randn(2, 5, 7), torch.full((2, 5), -100))
    assert nll.item() == 0.0 and count.item() == 0


def test_nan_loss_is_skipped_counted_and_stops_after_n_in_a_row(tmp_path, capsys):
    """Calls 2 and 5-7 are NaN, max_nonfinite_steps=3: step 2 is skipped, steps 5-7 stop the run at 7;
    the newest checkpoint (step 6) holds the weights of the last good step (4)."""
    stage = toy_stage(tmp_path, max_steps=10, save_every=2, max_nonfinite_steps=3, nan_calls={2, 5, 6, 7})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite steps at step 7; the last good "
                                                 r"checkpoint is kept in .*toy/checkpoints \(lower lr"):
        stage.train()
    out = capsys.readouterr().out
    assert "step 2: non-finite loss (nan)" in out and "step skipped (1 in a row)" in out
    assert "step skipped (3 in a row)" in out
    assert [h["step"] for h in stage.history if h.get("skipped")] == [2, 5, 6]
    last = ckpt.latest_checkpoint(tmp_path / "toy" / "checkpoints")
    assert last.name == "step-000006" and [p.name for p in ckpt.complete_checkpoints(last.parent)] == [
        "step-000004", "step-000006"]
    kept = load_file(str(last / "adapters/policy/adapter_model.safetensors"))["w"]
    at_4 = load_file(str(last.parent / "step-000004/adapters/policy/adapter_model.safetensors"))["w"]
    assert torch.isfinite(kept).all() and torch.equal(kept, at_4) and torch.equal(kept, stage.policy.w.detach())


def test_nan_loss_through_the_cli(tmp_path, capsys, monkeypatch):
    from alignment.stages.sft import SFTStage

    original, calls = SFTStage.train_step, []

    def nan_from_step_2(self, batch):
        calls.append(1)
        loss, metrics = original(self, batch)
        return (loss * float("nan") if len(calls) >= 2 else loss), metrics

    monkeypatch.setattr(SFTStage, "train_step", nan_from_step_2)
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "out", max_steps=4, save_every=1, max_nonfinite_steps=2)
    assert_one_line_error(*cli(capsys, path), "stage 'sft': 2 consecutive non-finite steps at step 3",
                          "the last good checkpoint is kept in", "lower lr or check the data")
    folder = tmp_path / "out/sft/checkpoints"
    good, skipped = (load_file(str(folder / f"step-00000{s}/adapters/policy/adapter_model.safetensors")) for s in (1, 2))
    assert all(torch.equal(good[k], skipped[k]) and torch.isfinite(good[k]).all() for k in good)


def test_resume_with_no_checkpoint_starts_fresh_with_a_notice(tmp_path, capsys):
    stage = toy_stage(tmp_path, resume=True)
    assert stage.train() == 6 and len(stage.history) == 6
    assert "resume=true but no complete checkpoint in" in capsys.readouterr().out


@pytest.mark.parametrize("changed", [{"batch_size": 4}, {"world_size": 2}, {"lr": 0.2}],
                         ids=["batch size", "world size", "recipe"])
def test_resume_with_a_checkpoint_of_other_settings_is_refused(tmp_path, changed):
    saved = {"batch_size": 2, "world_size": 1, "lr": 0.1}
    toy_stage(tmp_path, fingerprint=saved).train()
    before = sorted(p.name for p in (tmp_path / "toy/checkpoints").iterdir())
    key, value = next(iter(changed.items()))
    with pytest.raises(ckpt.CheckpointError, match=rf"step-000006 was written by a different recipe \(changed: "
                                                   rf"{key} {saved[key]!r} -> {value!r}\); resume with the same"):
        toy_stage(tmp_path, resume=True, fingerprint=saved | changed).train()
    assert sorted(p.name for p in (tmp_path / "toy/checkpoints").iterdir()) == before  # nothing lost


@pytest.mark.parametrize("name", ["optimizer.pt", "rng-rank0.pt", "state.json"])
def test_corrupt_checkpoint_file_is_a_clear_error(tmp_path, name):
    """Same size, garbage bytes: the manifest still matches, loading fails and names the file."""
    toy_stage(tmp_path).train()
    path = tmp_path / "toy/checkpoints/step-000006" / name
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(ckpt.CheckpointError) as info:
        toy_stage(tmp_path, resume=True).train()
    message = str(info.value)
    assert str(path) in message and f"delete {path.parent} to resume from an older checkpoint" in message
    assert "\n" not in message and path.exists()


def test_truncated_checkpoint_file_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    toy_stage(tmp_path, max_steps=4).train()
    path = tmp_path / "toy/checkpoints/step-000004/optimizer.pt"
    path.write_bytes(path.read_bytes()[:-10])
    stage = toy_stage(tmp_path, resume=True, max_steps=4)
    stage.calls = 0
    assert stage.train() == 4 and stage.calls == 2  # steps 3 and 4 again, from step 2
    out = capsys.readouterr().out
    assert "ignoring incomplete checkpoint(s) ['step-000004']" in out and "resumed from" in out


def test_checkpoints_are_staged_and_the_last_n_kept(tmp_path):
    stage = toy_stage(tmp_path, max_steps=5, save_every=1, keep_checkpoints=3)
    stage.train()
    root = tmp_path / "toy/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004", "step-000005"]
    for folder in root.iterdir():
        manifest = json.loads((folder / "manifest.json").read_text())["files"]
        assert set(manifest) == {"adapters/policy/adapter_model.safetensors", "optimizer.pt", "rng-rank0.pt",
                                 "state.json"} and ckpt.is_complete(folder)
    shutil.copytree(root / "step-000005", root / ".step-000006.tmp")  # a write killed before its rename
    (root / "step-000007").mkdir()  # a folder without a manifest
    assert ckpt.latest_checkpoint(root) == root / "step-000005"


def test_sigterm_in_the_loop_checkpoints_then_exits_143(tmp_path, capsys):
    """Library level: SIGTERM during step 3 -> checkpoint of step 3, exit 143; resume == uninterrupted."""
    straight = toy_stage(tmp_path / "straight")
    straight.train()
    stage = toy_stage(tmp_path, on_call=lambda n: n == 3 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as info:
        stage.train()
    assert info.value.code == 143 and ckpt.latest_checkpoint(tmp_path / "toy/checkpoints").name == "step-000003"
    assert "SIGTERM: checkpoint of step 3 saved" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is not stage._stop  # the loop's handler is removed after it
    resumed = toy_stage(tmp_path, resume=True)
    resumed.train()
    assert torch.equal(resumed.policy.w, straight.policy.w)
    assert [h.get("loss") for h in resumed.history] == [h.get("loss") for h in straight.history]


def test_per_rank_seeds_differ(tmp_path):
    seeds = {rank_seed(seed, rank) for seed in range(3) for rank in range(8)}
    assert len(seeds) == 24
    toy_stage(tmp_path, max_steps=1).train()
    assert torch.initial_seed() == rank_seed(0, 0)


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny SFT run (6 steps, checkpoints every 2): (recipe path, output dir)."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_recipe(folder / "r.yaml", folder / "out")
    run_recipe(load_recipe(path))
    return path, folder / "out"


SLOW_CHILD = """
import runpy, sys, time
from alignment.stages.base import Stage
step = Stage._optimizer_step
def slow(self, *args):
    time.sleep(0.5)  # so that SIGTERM lands mid-run
    return step(self, *args)
Stage._optimizer_step = slow
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, reference):
    """`python launch/run.py` (steps slowed) given SIGTERM once the step-2 checkpoint exists."""
    folder = tmp_path_factory.mktemp("sigterm")
    out = folder / "out"
    cmd = [sys.executable, "-c", SLOW_CHILD, str(ROOT / "launch" / "run.py"), str(reference[0]), f"output_dir={out}"]
    with open(folder / "log", "w") as log:
        child = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        deadline = time.time() + 300
        while not (out / "sft/checkpoints/step-000002/manifest.json").exists() and child.poll() is None:
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=300)
    return out, code, (folder / "log").read_text()


def test_sigterm_writes_a_complete_checkpoint_exits_143_and_resumes_exactly(tmp_path, reference, interrupted):
    out, code, log = interrupted
    assert code == 143, log[-3000:]
    latest = ckpt.latest_checkpoint(out / "sft/checkpoints")
    step = int(latest.name.split("-")[1])
    assert 2 < step < 6 and f"SIGTERM: checkpoint of step {step} saved" in log and "Traceback" not in log
    assert not (out / "sft/adapter_model.safetensors").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    report = run_recipe(load_recipe(reference[0], ["resume=true", f"output_dir={resumed}"]))
    expected = json.loads((reference[1] / "report.json").read_text())
    assert final_losses(report) == final_losses(expected)
    a, b = (load_file(str(folder / "sft/adapter_model.safetensors")) for folder in (reference[1], resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = (ckpt.safe_load(folder / "sft/checkpoints/step-000006/optimizer.pt") for folder in (reference[1], resumed))
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[n], opt_b["state"][key][n]) for n in state)


def test_corrupt_optimizer_through_the_cli_names_the_file(tmp_path, capsys, reference, interrupted):
    copy = tmp_path / "out"
    shutil.copytree(interrupted[0], copy)
    latest = ckpt.latest_checkpoint(copy / "sft/checkpoints")
    (latest / "optimizer.pt").write_bytes(b"\1" * (latest / "optimizer.pt").stat().st_size)
    line = assert_one_line_error(*cli(capsys, reference[0], "resume=true", f"output_dir={copy}"),
                                 f"{latest / 'optimizer.pt'} cannot be loaded safely",
                                 f"delete {latest} to resume from an older checkpoint")
    assert len(line) < 600 and (latest / "optimizer.pt").exists()


def test_resume_of_a_finished_stage_with_another_batch_size_is_refused(tmp_path, capsys, reference):
    copy = tmp_path / "out"
    shutil.copytree(reference[1], copy)
    assert_one_line_error(*cli(capsys, reference[0], "resume=true", f"output_dir={copy}", "stages.0.batch_size=2"),
                          "step-000006 was written by a different recipe (changed: batch_size 4 -> 2)",
                          "choose a new output_dir")


def test_rerun_without_resume_does_not_overwrite_an_earlier_run(capsys, reference):
    before = (reference[1] / "report.json").read_text()
    assert_one_line_error(*cli(capsys, reference[0]), f"output_dir {reference[1]} already holds a run",
                          "set resume=true to continue it")
    assert (reference[1] / "report.json").read_text() == before


def test_same_seed_gives_identical_report_metrics(tmp_path, reference):
    report = run_recipe(load_recipe(reference[0], [f"output_dir={tmp_path / 'again'}"]))
    expected = json.loads((reference[1] / "report.json").read_text())
    for mine, theirs in zip(report["stages"], expected["stages"], strict=True):
        assert mine["eval"] == theirs["eval"]
        assert {k: v for k, v in mine["train"].items() if k != "samples_per_s"} == {
            k: v for k, v in theirs["train"].items() if k != "samples_per_s"}
        assert [{k: v for k, v in h.items() if k != "samples_per_s"} for h in mine["history"]] == [
            {k: v for k, v in h.items() if k != "samples_per_s"} for h in theirs["history"]]
