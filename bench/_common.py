"""Helpers the benchmarks share: environment, machine line, tables, JSON, peak step memory,
vision-tower image counting. Benchmarks are never part of the test suite."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path


def quiet_offline_env() -> None:
    """No hub, no telemetry, few log lines; must run before transformers/trl are imported."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "WANDB_DISABLED": "true",
    }.items():
        os.environ.setdefault(key, value)


def machine() -> str:
    """One line naming the machine the figures come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}; {os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}; {device}; "
            f"torch {torch.__version__}; python {platform.python_version()}")


def today() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def versions(*names: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[list], header: list[str]) -> str:
    """Print (and return) a plain Markdown table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def peak_step_memory_mb(step) -> tuple[float, object]:
    """Run `step()` under torch.profiler with memory profiling; returns (peak MiB, step's result).

    The peak is the highest running sum of the torch CPU allocator's allocations minus frees during
    the step, above what was allocated when it started (weights, optimizer state and earlier tensors
    are not counted; activations, gradients, temporaries and anything newly allocated are)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20, result


class ImageCounter:
    """Counts images through a vision tower: a forward hook adds the batch size of its pixel input."""

    def __init__(self, tower):
        self.images = 0
        self.calls = 0
        self.handle = tower.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        pixels = args[0] if args else kwargs.get("pixel_values")
        self.calls += 1
        self.images += int(pixels.shape[0]) if pixels is not None else 0

    def reset(self) -> None:
        self.images = self.calls = 0

    def remove(self) -> None:
        self.handle.remove()
