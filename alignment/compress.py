"""BitDelta compression of a trained stage: `vlm-align compress RUN_DIR/STAGE` and what it runs.

The math (signs, scales, distillation) is `alignment.bitdelta`; the adapter that serves a 1-bit delta beside the
base is `alignment.adapters.bitdelta`. This module puts them to work on a policy: a LoRA adapter's deltas made
1-bit (`compress_adapter`), a run's stage compressed into an adapter folder (`compress_stage`), and the command.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn import functional as F

from alignment.adapters.bitdelta import BitDeltaAdapters
from alignment.bitdelta import adapter_deltas, distil_scales, logit_mse, sizes
from alignment.errors import ConfigError
from alignment.policy import ADAPTER_FILE, BASE_WEIGHTS_CONFIG, BASE_WEIGHTS_FILE, saved_method
from alignment.runs import instruction_of, load_base, open_stage

COMPRESSIBLE = ("lora", "qlora", "lora_fa")  # adapters whose update is a weight delta scaling * B @ A
COMPRESSED_NAME = "bitdelta"


def compress_adapter(policy, adapter: str, batches: Sequence[dict], steps: int = 200, lr: float = 1e-4,
                     name: str = "bitdelta", autocast: Callable | None = None, scales: str = "matrix"):
    """BitDelta of LoRA adapter `adapter` of `policy` (a `MultimodalPolicy`): its deltas to 1-bit with
    alpha_0 = mean |delta| (per matrix, or per row with `scales="row"`), then `steps` of scale distillation on `batches` (collated with labels, on the
    policy's device) against the adapter's own logits. Returns `(adapters, stats)`: a `BitDeltaAdapters`
    over `policy.base_model` holding adapter `name` (save it with `adapters.save(name, folder)`), and
    {"targets", "mse_base", "mse_init", "mse_distilled", "losses", **sizes}: logit MSE to the fine-tune
    of the bare base, of the 1-bit deltas at alpha_0 and after distillation."""
    autocast = autocast or nullcontext
    deltas = adapter_deltas(policy.base_model, adapter)
    policy.set_adapter(adapter)
    policy.eval()
    teachers, masks = [], []
    with torch.no_grad(), autocast():
        for batch in batches:
            logits, labels, _ = policy.windowed_logits(batch)
            teachers.append(logits.detach())
            masks.append(F.pad(labels[:, 1:] != -100, (0, 1)))  # position j's logits predict labels[:, j+1]
    onebit = BitDeltaAdapters(policy.base_model)  # beside the policy's adapters: the teacher stays loaded
    onebit.from_deltas(name, deltas, scales)
    del deltas
    with policy.model.disable_adapter():  # the student: base + 1-bit deltas
        features = None
        if not onebit.touches_vision(name):  # the base's image features then serve every step
            with torch.no_grad(), autocast():
                features = [policy.encode_images(b) if "pixel_values" in b else None for b in batches]

        def student(i: int) -> torch.Tensor:
            with autocast():
                return policy.windowed_logits(batches[i], features[i] if features else None)[0]

        mse_base = logit_mse(student, teachers, masks)  # onebit inactive: the bare base
        onebit.set_active(name)
        mse_init = logit_mse(student, teachers, masks)
        params = list(onebit.scales_of(name).values())
        for param in params:
            param.requires_grad_(True)
        losses = distil_scales(student, teachers, masks, params, steps=steps, lr=lr) if steps > 0 else []
        for param in params:
            param.requires_grad_(False)
        mse_distilled = logit_mse(student, teachers, masks)
        onebit.set_active(None)
    stats = {"targets": len(params), "mse_base": mse_base, "mse_init": mse_init, "mse_distilled": mse_distilled,
             "losses": losses, "scales": scales, **sizes(onebit.shapes_of(name), scales)}
    return onebit, stats


def compress_stage(recipe, index: int, out: Path, steps: int = 200, lr: float = 1e-4, samples: int = 64,
                   batch_size: int = 8, scales: str = "row") -> dict:
    """BitDelta of the stage's LoRA adapter (`compress_adapter`), its scales distilled on the stage's first
    `samples` training examples (collated as the stage trains on them); writes adapter folder `out` (with the
    base weights the stage's folder carries). Returns the stats."""
    from alignment.data import collate_preference, collate_sft
    from alignment.recipe import build_data, data_task, make_accelerator
    from alignment.stages.common import to_device

    config = recipe.stages[index]
    folder = Path(recipe.output_dir) / config.name
    if config.type not in ("sft", "dpo", "ppo", "grpo"):
        raise ConfigError(f"stage {config.name!r} is a {config.type} stage; compress a policy stage (sft, dpo, ppo, "
                          "grpo)")
    method = saved_method(folder)
    if method == "full":
        raise ConfigError(f"{folder} holds a full fine-tune; compressing one is not supported yet (its embeddings "
                          "and norms would travel in full precision beside the 1-bit linears); "
                          "`alignment.bitdelta.weight_deltas` gives its linears' deltas")
    if method not in COMPRESSIBLE:
        raise ConfigError(f"{folder} holds a {method} adapter; BitDelta compresses a weight delta (scaling * B @ A): "
                          f"a stage trained with lora.method {' / '.join(COMPRESSIBLE)}")
    accelerator = make_accelerator(recipe)
    policy = load_base(recipe, accelerator.device)
    with contextlib.redirect_stdout(sys.stderr):
        train = build_data(recipe, config, policy.processor)[0][:samples]
    if not train:
        raise ConfigError(f"stage {config.name!r} has no training examples to distil the scales on")
    collate = collate_sft if data_task(config) == "sft" else collate_preference
    kwargs = {"instruction": instruction_of(recipe), "max_length": recipe.data.max_length}
    batches = [to_device(collate(train[i : i + batch_size], policy.processor, **kwargs), policy.device)
               for i in range(0, len(train), batch_size)]
    policy.load_adapter("policy", folder, trainable=False)
    onebit, stats = compress_adapter(policy, "policy", batches, steps=steps, lr=lr, name=COMPRESSED_NAME,
                                     autocast=accelerator.autocast, scales=scales)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (BASE_WEIGHTS_FILE, BASE_WEIGHTS_CONFIG):
        (out / stale).unlink(missing_ok=True)
    onebit.configs[COMPRESSED_NAME].update({
        "base_model_name_or_path": recipe.model.name, "source": str(folder), "source_method": method,
        "distillation": {"steps": steps, "lr": lr, "samples": len(train), "batch_size": batch_size,
                         "mse_base": stats["mse_base"], "mse_init": stats["mse_init"],
                         "mse_distilled": stats["mse_distilled"]},
        "bf16_delta_bytes": stats["bf16_bytes"], "onebit_bytes": stats["onebit_bytes"]})
    onebit.save(COMPRESSED_NAME, out)
    for carried in (BASE_WEIGHTS_FILE, BASE_WEIGHTS_CONFIG):  # a projector stage's weights travel along
        if (folder / carried).exists():
            shutil.copyfile(folder / carried, out / carried)
    stats.update(method=method, samples=len(train), source_file_bytes=(folder / ADAPTER_FILE).stat().st_size,
                 file_bytes=(out / ADAPTER_FILE).stat().st_size)
    return stats


def command(args) -> int:
    """`vlm-align compress` (arguments from `alignment.cli`'s parser)."""
    recipe, index, _ = open_stage(args.stage, args.recipe)
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    for flag, value in (("--lr", args.lr), ("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    config = recipe.stages[index]
    out = Path(args.out) if args.out else Path(recipe.output_dir) / f"{config.name}-{COMPRESSED_NAME}"
    if out.resolve() == Path(args.stage).resolve():
        raise ConfigError("--out must not be the stage's own folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new folder (or pass --overwrite)")
    stats = compress_stage(recipe, index, out, steps=args.steps, lr=args.lr, samples=args.samples,
                           batch_size=args.batch_size, scales=args.scales)
    print(f"compressed {config.name} ({stats['method']}, {stats['targets']} linear layers, one scale per "
          f"{args.scales}) into {out}")
    print(f"  delta: bf16 {stats['bf16_bytes']:,} bytes -> 1-bit {stats['onebit_bytes']:,} bytes "
          f"({stats['ratio']:.4f}, {1 / stats['ratio']:.1f}x smaller)")
    print(f"  files: {stats['method']} adapter {stats['source_file_bytes']:,} bytes, 1-bit adapter "
          f"{stats['file_bytes']:,} bytes")
    print(f"  logit MSE to the fine-tune on {stats['samples']} training examples: base {stats['mse_base']:.4g}, "
          f"1-bit at mean|delta| {stats['mse_init']:.4g}, distilled {stats['mse_distilled']:.4g} "
          f"({args.steps} steps, lr {args.lr:g})")
    print(f"serve it: vlm-align eval {args.stage} --adapters {out}")
    return 0
