"""A quiet terminal: a shortened `dpo_bookcover` prints only our lines and our progress bars; the libraries'
known-harmless noise is hidden where it arises and comes back with --verbose."""

import os
import re
import subprocess
import sys
from pathlib import Path

from alignment.quiet import VERBOSE_ENV, without_library_progress_bars

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["data.num_covers=60", "stages.0.max_steps=2", "stages.1.max_steps=2", "stages.0.batch_size=4",
         "stages.1.batch_size=4", "stages.0.eval_examples=4", "stages.1.eval_examples=4"]
OUR_BARS = re.compile(r"^(sft|dpo): +\d+%\|")  # the training loop's tqdm bars


def test_dpo_bookcover_stderr_holds_our_progress_bars_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(VERBOSE_ENV, None)
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), str(ROOT / "recipes" / "dpo_bookcover.yaml"),
                           f"output_dir={tmp_path / 'out'}", *SHORT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", done.stderr) if line.strip()]
    assert lines and all(OUR_BARS.match(line) for line in lines), [line for line in lines if not OUR_BARS.match(line)]
    assert "warning" not in done.stdout.lower() and "Loading weights" not in done.stdout
    assert "done: dpo_bookcover" in done.stdout


def test_library_progress_bars_are_off_inside_and_back_after(monkeypatch):
    from transformers.utils import logging

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert logging.is_progress_bar_enabled()
    with without_library_progress_bars():
        assert not logging.is_progress_bar_enabled()
    assert logging.is_progress_bar_enabled()
    monkeypatch.setenv(VERBOSE_ENV, "1")  # --verbose: everything shows
    with without_library_progress_bars():
        assert logging.is_progress_bar_enabled()
