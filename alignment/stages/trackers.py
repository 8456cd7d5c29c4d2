"""Where a stage's scalars go (`report_to`): TensorBoard under `<output_dir>/runs/<stage>`, and optionally wandb
or trackio (Hugging Face's local-first tracker). One `Trackers` per stage on the main process; training
scalars at each logged step, evaluation scalars at the stage's last step."""

from __future__ import annotations

from pathlib import Path

from alignment.summary import scalar_metrics

PROJECT = "vlm-align"


class Trackers:
    """Scalars to every backend of `report_to`: TensorBoard under `folder`, wandb and trackio (optional)."""

    def __init__(self, folder: Path, report_to, run_name: str):
        self.tensorboard = self.wandb = self.trackio = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=PROJECT, name=f"{run_name}/{folder.name}", dir=str(folder.parent),
                                    reinit=True)
        if "trackio" in report_to:  # local: under $TRACKIO_DIR (default ~/.cache/huggingface/trackio)
            import trackio

            with _quiet_stdout():  # its banner; one line of ours instead
                self.trackio = trackio.init(project=PROJECT, name=f"{run_name}/{folder.name}", embed=False,
                                            auto_log_cpu=False, auto_log_gpu=False)
            print(f"[{folder.name}] trackio: project {PROJECT!r}, run {run_name}/{folder.name} "
                  f"(see it with `trackio show --project {PROJECT}`)")

    def add_scalar(self, key: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({key: value}, step=step)
        if self.trackio is not None:
            self.trackio.log({key: value}, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.trackio is not None:
            with _quiet_stdout():
                self.trackio.finish()


def _quiet_stdout():
    """A library's banner lines hidden (shown with --verbose)."""
    import contextlib
    import io

    from alignment.quiet import verbose

    return contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO())


def open_trackers(folder: Path, report_to=("tensorboard",), run_name: str = "run") -> Trackers | None:
    """The stage's `Trackers`, or None with `report_to: none`."""
    return Trackers(folder, report_to, run_name) if set(report_to) - {"none"} else None


def log_eval_scalars(writer, stage: str, step: int, metrics: dict | None, test: dict | None) -> None:
    """A stage's evaluation as scalars at its last step: `<stage>/eval/<metric>` (val) and
    `<stage>/test/<metric>`; a split with no value (no examples) writes nothing."""
    if writer is None:
        return
    for split, block in (("eval", metrics), ("test", test)):
        for key, value in scalar_metrics(block).items():
            writer.add_scalar(f"{stage}/{split}/{key}", value, step)
    writer.flush()
