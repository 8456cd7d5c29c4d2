"""One run owns an output_dir: a second run into a live run's folder is refused with one error line;
after the first is killed (kill -9) the next run takes the lock over and proceeds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.runlock import LOCK_FILE, STALE_S, RunLockError, holder, run_lock

ROOT = Path(__file__).resolve().parent.parent
HOLD = "import sys, time; from alignment.runlock import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(120)\n"


def hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_run_into_a_live_runs_folder_is_refused_then_proceeds_after_kill_9(tmp_path, capsys):
    out = tmp_path / "run"
    owner = hold_lock_in_another_process(out)
    try:
        args = ["train", "recipes/sft_bookcover.yaml", f"output_dir={out}", "resume=true", "stages.0.max_steps=1",
                "stages.0.eval_examples=2", "data.num_covers=40"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: output_dir {out} is in use by a live run (pid {owner.pid}")
        assert not (out / "report.json").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == owner.pid  # left behind by the killed run
    assert main(args) == 0  # taken over
    assert (out / "report.json").exists() and not (out / LOCK_FILE).exists()  # released at the end


def test_lock_of_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": time.time()}))
    assert holder(path)["host"] == "another-host"
    with pytest.raises(RunLockError, match="on another-host"):
        with run_lock(tmp_path):
            pass
    old = time.time() - STALE_S - 5
    os.utime(path, (old, old))
    assert holder(path) is None
    with run_lock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
