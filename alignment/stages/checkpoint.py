"""Atomic checkpoints: staged in a temporary folder, fsynced, renamed, manifest written last.

Layout of `<stage dir>/checkpoints/step-000050/`: `adapters/<name>/` (PEFT format, safetensors),
`optimizer.pt`, `rng-rank<r>.pt`, `state.json`, and `manifest.json` (files and sizes) written last.
A folder without a valid manifest is incomplete and never resumed from. LOMO and MeZO keep no
optimizer state (`optimizer.pt` then holds their parameter groups only): a resume needs the weights,
the RNG state and the step, from which MeZO derives its perturbation seeds. Optimizer and RNG state are
read with `torch.load(weights_only=True)`: a planted pickle cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def staging_dir(root: Path, step: int) -> Path:
    return root / f".step-{step:06d}.tmp"


def final_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def write_manifest(folder: Path) -> None:
    """List every file with its size, fsync everything, then write the manifest last."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    _fsync_tree(folder)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MANIFEST)


def publish(root: Path, step: int, keep: int) -> Path:
    """Rename the staged folder into place and prune all but the `keep` newest complete ones."""
    staged, final = staging_dir(root, step), final_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in manifest.get("files", {}).items())


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return [p for p in sorted(root.glob("step-*")) if p.is_dir() and is_complete(p)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_state(folder: Path) -> dict:
    """`state.json` of a complete checkpoint, or a `CheckpointError` naming it and what to do."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not {"step", "stream", "fingerprint"} <= set(state):
            raise ValueError("keys step, stream, fingerprint missing")
        return state
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); delete {folder} to resume from an older "
                              "checkpoint") from None


# Settings a resume may raise: the run goes on to the new value (HF Trainer's resume with a larger
# max_steps does the same). The learning-rate schedule's length is `max_steps` itself (`lr_at`): from
# the checkpoint's step on, the schedule is that of the longer run; its shape keys (lr_schedule,
# warmup_steps, min_lr_ratio, lr) change what the steps already taken meant, and stay refused.
EXTENDABLE = ("max_steps",)


def extended(saved: dict, current: dict) -> dict[str, tuple]:
    """`{key: (saved, current)}` for each key of `EXTENDABLE` that `current` raises above `saved`."""
    return {k: (saved[k], current[k]) for k in EXTENDABLE
            if isinstance(saved.get(k), int) and isinstance(current.get(k), int) and current[k] > saved[k]}


def check_fingerprint(folder: Path, saved: dict, current: dict) -> dict[str, tuple]:
    """Refuse a checkpoint written with other settings (recipe, batch size, world size, data, model),
    except a raised `EXTENDABLE` key: returns those `{key: (saved, current)}` (empty: the same settings)."""
    longer = extended(saved, current)
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k not in longer)
    if not changed:
        return longer
    detail = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}"[:80] for k in changed)
    raise CheckpointError(
        f"{folder} was written by a different recipe (changed: {detail}); resume with the same "
        "recipe, batch size and number of processes (only a larger max_steps may change), or choose a new output_dir"
    )


def extension_notice(stage: str, longer: dict[str, tuple], step: int) -> str:
    """The line a resume that extends a stage prints."""
    old, new = longer["max_steps"]
    return (f"[{stage}] extending: max_steps {old} -> {new}; training on from step {step} to {new}, the "
            f"learning-rate schedule now that of a {new}-step run from step {step + 1} on")


def safe_load(path: Path):
    """`torch.load(weights_only=True)` with a clear error for a missing or corrupt file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing; delete {path.parent} to resume from an older checkpoint") from error
    except Exception as error:  # corrupt bytes, or a pickle that needs more than tensors
        raise CheckpointError(
            f"{path} cannot be loaded safely ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}); "
            f"delete {path.parent} to resume from an older checkpoint"
        ) from error
