"""A finished run's folder, as the commands after `train` open it (`eval`, `generate`, `merge`, `compress`).

`RUN_DIR/recipe.yaml` (written by `train`) holds the run's settings: base model, quantization, instruction,
data. `RUN_DIR/STAGE/` holds a stage's adapter. `--adapters a,b` names adapter folders to load together on one
base (the multi-tenant case: several fine-tunes, e.g. their 1-bit deltas, served from one base).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from alignment.adapters.base import read_config
from alignment.adapters.menu import method_of_peft_type
from alignment.errors import ConfigError
from alignment.policy import ADAPTER_FILE, MultimodalPolicy
from alignment.recipe import RECIPE_FILE, load_recipe, model_dtype


def open_stage(target: str | os.PathLike, recipe_path: str | None = None, overrides=()):
    """(recipe with `overrides`, stage index, saved recipe) for `RUN_DIR/STAGE`; output_dir = RUN_DIR."""
    folder = Path(target)
    if (folder / RECIPE_FILE).exists() and not recipe_path:  # RUN_DIR itself: name its stages
        stages = [stage.name for stage in load_recipe(folder / RECIPE_FILE).stages]
        finished = [name for name in stages if (folder / name / ADAPTER_FILE).exists()]
        raise ConfigError(f"{folder} is a run folder; give one of its stages as RUN_DIR/STAGE: "
                          + ", ".join(str(folder / name) for name in (finished or stages))
                          + ("" if finished else " (none has finished)"))
    run_dir = folder.parent
    recipe_file = Path(recipe_path) if recipe_path else run_dir / RECIPE_FILE
    if not recipe_file.exists():
        raise ConfigError(f"{run_dir} has no {RECIPE_FILE} (the resolved recipe `vlm-align train` saves); "
                          "give RUN_DIR/STAGE of a run, or pass --recipe with the recipe the run was trained with")
    saved = load_recipe(recipe_file)
    recipe = load_recipe(recipe_file, list(overrides))
    saved.output_dir = recipe.output_dir = str(run_dir)
    names = [s.name for s in recipe.stages]
    if folder.name not in names:
        raise ConfigError(f"{folder.name!r} is not a stage of the run in {run_dir}; its stages: {names}")
    if not (folder / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_FILE}: stage {folder.name!r} has not finished")
    return recipe, names.index(folder.name), saved


def load_base(recipe, device=None) -> MultimodalPolicy:
    """The run's base model (quantised as it was trained) as a `MultimodalPolicy`, on `device`."""
    import torch

    policy = MultimodalPolicy.from_pretrained(recipe.model.name, quantization=recipe.model.quantization,
                                              dtype=model_dtype(recipe), trust_remote_code=recipe.model.trust_remote_code,
                                              min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels,
                                              chat_template=recipe.model.chat_template)
    if recipe.model.quantization == "none":
        policy.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return policy


def instruction_of(recipe) -> str:
    """The instruction the run's prompts carried (the recipe's, else the default)."""
    from alignment.data.catalog import DEFAULT_INSTRUCTION

    return recipe.data.instruction or DEFAULT_INSTRUCTION


def adapter_folders(spec: str) -> dict[str, Path]:
    """`--adapters a,b` -> {adapter name: folder}: names from the folders' names (made unique, and safe as
    module keys), every folder checked to hold an adapter, and all of one kind (one base holds adapters
    of one PEFT type or one own method)."""
    folders = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if not folders:
        raise ConfigError("--adapters: give one or more adapter folders, separated by commas")
    named: dict[str, Path] = {}
    kinds: dict[str, str] = {}
    for folder in folders:
        if not (folder / ADAPTER_FILE).exists():
            raise FileNotFoundError(f"--adapters: no {ADAPTER_FILE} in {folder}")
        peft_type = read_config(folder).get("peft_type", "")
        kind = method_of_peft_type(peft_type) or f"PEFT {peft_type or 'LORA'}"
        if kind == "base_weights":
            raise ConfigError(f"--adapters: {folder} holds a projector stage's base weights, not an adapter")
        base = re.sub(r"\W", "_", folder.name) or "adapter"
        name, n = base, 2
        while name in named:
            name, n = f"{base}_{n}", n + 1
        named[name], kinds[name] = folder, kind
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{named[n]} ({k})" for n, k in kinds.items())
        raise ConfigError(f"--adapters: one base serves adapters of one kind at a time; got {listed}")
    return named


def load_adapters(policy: MultimodalPolicy, folders: dict[str, Path]) -> None:
    """Load every folder of `adapter_folders` as a frozen adapter of its name."""
    for name, folder in folders.items():
        policy.load_adapter(name, folder, trainable=False)
    policy.eval()
