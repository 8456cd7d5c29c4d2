"""Learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, max_steps: int, peak_lr: float, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup to `peak_lr` over
    `warmup_steps`, then cosine or linear decay to `min_lr_ratio * peak_lr` at `max_steps`, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1 - progress
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; use cosine, linear or constant")
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * decay)
