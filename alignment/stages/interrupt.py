"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM: a checkpoint first, then exit 130 / 143, one line.

Inside a stage's training loop the first stop signal only asks the loop to stop (`StopRequest`):
it finishes the step under way, writes a complete checkpoint of it and raises `Interrupted`, after
one line saying the step and the command that continues the run. A second Ctrl-C while that step
runs stops at once, without that step's checkpoint (a later resume starts from the newest complete
one). Anywhere else in a run (loading, data, evaluation), `interruptible` turns the signal into
`Interrupted` at once, with the same kind of line. `Interrupted` is a `SystemExit`: no traceback,
and the process exits with 128 + the signal's number, as a shell reports a signal.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


class Interrupted(SystemExit):
    """SIGINT or SIGTERM arrived; exits with `EXIT_CODES[signum]`. `announced`: its line is printed."""

    def __init__(self, code: int, announced: bool = True):
        super().__init__(code)
        self.announced = announced


def resume_command(output_dir: str | os.PathLike, world_size: int = 1, argv0: str | None = None) -> str:
    """The command that continues the run in `output_dir`: its saved, resolved recipe (every override
    applied) with resume=true, through the program that started it (`python launch/run.py` or
    `vlm-align train`; several processes: `accelerate launch` with the same options)."""
    recipe = shlex.quote(str(Path(output_dir) / "recipe.yaml"))
    argv0 = sys.argv[0] if argv0 is None else argv0
    if world_size > 1:
        return f"accelerate launch <the same launch options> launch/run.py {recipe} resume=true"
    program = f"python {shlex.quote(argv0)}" if Path(argv0).name == "run.py" else "vlm-align train"
    return f"{program} {recipe} resume=true"


def interrupted_line(signum: int, step: int, checkpoints: Path, command: str) -> str:
    """The one line a stage prints after the checkpoint of `step` (SIGTERM's keeps its old wording)."""
    if signum == signal.SIGTERM:
        return f"SIGTERM: checkpoint of step {step} saved in {checkpoints}; continue with resume=true: {command}"
    return f"interrupted at step {step}; continue with resume=true: {command} (checkpoint of step {step} saved in {checkpoints})"


class StopRequest:
    """A signal handler that records the first stop signal (`signum`, None until one arrives) for a
    loop to act on at its next step boundary; a second SIGINT raises `Interrupted(130)` at once."""

    def __init__(self, where: str = ""):
        self.where = where  # names the loop in the notices (e.g. the stage)
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            _notice(f"{self.where}{signal.Signals(signum).name}: finishing this step, then a checkpoint"
                    + (" (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT:
            _notice(f"{self.where}second Ctrl-C: stopping without a checkpoint of this step; resume=true "
                    "continues from the newest complete checkpoint")
            raise Interrupted(EXIT_CODES[signal.SIGINT])


@contextmanager
def handling(handler):
    """`handler` for SIGINT and SIGTERM inside, the previous handlers restored after. Signals reach the
    main thread only: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def interruptible(output_dir: str | os.PathLike, world_size: int = 1, announce: bool = True, dry_run: bool = False):
    """A run's body: SIGINT / SIGTERM outside a training loop raise `Interrupted` at once (no
    KeyboardInterrupt traceback), and one line (where `announce`: the main process) says how to
    continue; an `Interrupted` a loop already announced passes through as it is."""

    def stop_now(signum, frame):
        raise Interrupted(EXIT_CODES[signum], announced=False)

    try:
        with handling(stop_now):
            yield
    except Interrupted as stop:
        if not stop.announced and announce:
            print(_outside_line(Path(output_dir), world_size, dry_run), flush=True)
        stop.announced = True
        raise


def _outside_line(output_dir: Path, world_size: int, dry_run: bool) -> str:
    """What to do after a stop outside a training loop: continue from the newest checkpoint, or, before
    the run saved its recipe (or in a dry run), nothing to continue."""
    if dry_run:
        return "interrupted (dry run: nothing to continue)"
    if not (output_dir / "recipe.yaml").is_file():
        return "interrupted before the run started; nothing to continue (run the same command again)"
    return (f"interrupted; continue with resume=true: {resume_command(output_dir, world_size)} "
            "(from the newest complete checkpoint)")


def _notice(line: str) -> None:
    """Write `line` to stderr from a signal handler: straight to the file descriptor, since the handler
    may run while the main thread is inside a write to `sys.stderr` (a nested write would fail). On a
    terminal it starts on a new line, below the progress bar."""
    try:
        os.write(2, (("\n" if os.isatty(2) else "") + line + "\n").encode())
    except OSError:
        pass
