"""One run owns an `output_dir` at a time.

A scheduler's requeue, or a user's second `resume=true`, can start a run into a folder a live run is
still writing; both would train and checkpoint into it. The main process of a run holds
`<output_dir>/run.lock` for the run's life: a JSON line naming its pid, host and start time, whose
modification time a background thread refreshes every `HEARTBEAT_S` seconds. A second run finds it
and stops with one error line, unless its owner is gone: a pid that no longer runs on this host, or
(for a lock written on another host, whose pids cannot be checked) a heartbeat older than `STALE_S`.
A lock left by a killed run is then taken over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from alignment.errors import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunLockError(ConfigError):
    """Another live run holds the output_dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(path: Path) -> dict | None:
    """The live owner recorded in lock file `path`, or None when there is none (absent, unreadable,
    its pid gone on this host, or its heartbeat stale)."""
    try:
        record = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None
    if record.get("host") == socket.gethostname():
        return record if isinstance(record.get("pid"), int) and _alive(record["pid"]) and \
            record["pid"] != os.getpid() else None
    return record if age < STALE_S else None


def _acquire(path: Path) -> None:
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = holder(path)
            if owner is not None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
                raise RunLockError(
                    f"output_dir {path.parent} is in use by a live run (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, started {started}): wait for it to end, or choose another "
                    "output_dir=") from None
            path.unlink(missing_ok=True)  # its owner is gone: take it over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        return
    raise RunLockError(f"output_dir {path.parent}: another run took {LOCK_FILE} at the same moment; try again")


@contextmanager
def run_lock(output_dir: str | os.PathLike, enabled: bool = True):
    """Hold `<output_dir>/run.lock` inside (see the module docstring); `enabled=False` (a run's other
    ranks) does nothing."""
    if not enabled:
        yield
        return
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _acquire(path)
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                return

    thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
