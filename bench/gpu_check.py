"""GPU check: Llama-3.2-11B-Vision's geometry at full width (random weights), loaded 4-bit (QLoRA,
bf16 compute, gradient checkpointing) through the same code a user's run takes; one DPO step at
batch 1 (one pair, 600x900 cover: 4 tiles) and one PPO iteration; peak GPU memory and tokens/s.

    python bench/gpu_check.py --width full            # on a GPU (bench/gpu_check.sh; about 5 min on an H100)
    python bench/gpu_check.py --width small           # the same path at the stand-in's width, on CPU

Prints a table and writes JSON (`--out`, default /tmp/vlm-align-bench/gpu_check.json). Goal (issue 16):
an 11B QLoRA DPO step under 16 GB at batch 1.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

quiet_offline_env()


def peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process so far


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def recipe_for(kind: str, model: str, out: Path):
    """The 11B recipe's settings (4-bit, bf16, checkpointing, LoRA multimodal r16 dropout 0.05), one
    stage run for one optimizer step at batch 1, on 600x900 synthetic covers."""
    from alignment.recipe import recipe_from_dict

    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "preset": "multimodal"}
    common = {"batch_size": 1, "grad_accum": 1, "eval_examples": 1, "eval_batch_size": 1, "max_new_tokens": 8,
              "save_every": 100, "lora": lora}
    if kind == "dpo":
        stages = [{"type": "dpo", "name": "dpo", "max_steps": 2, "lr": 5e-6, **common}]
    else:
        stages = [{"type": "reward", "name": "reward", "max_steps": 1, "lr": 5e-5, **common},
                  {"type": "ppo", "name": "ppo", "max_steps": 2, "num_minibatches": 1, "ppo_epochs": 2,
                   "temperature": 0.7, "missing_eos_penalty": 1.0, "eval_kl_samples": 1, **common}]
    return recipe_from_dict({
        "name": f"gpu_check_{kind}", "output_dir": str(out / kind), "report_to": ["none"],
        "model": {"name": model, "quantization": "4bit", "dtype": "bfloat16", "gradient_checkpointing": True},
        "data": {"num_covers": 12, "image_size": 600, "image_height": 900, "max_eval_examples": 1, "max_length": 512},
        "stages": stages}, "gpu_check")


def timed_stage(report: dict, name: str) -> dict:
    stage = next(s for s in report["stages"] if s["name"] == name)
    steps = [h for h in stage["history"] if "loss" in h]
    last = steps[-1]
    return {"loss_first": steps[0]["loss"], "samples_per_s": last["samples_per_s"],
            "s_per_step": 1.0 / last["samples_per_s"] if last["samples_per_s"] else None}


class StageMemory:
    """GPU memory by phase of every stage run inside it (CUDA only): the peak before the stage's first
    optimizer step (loading the 4-bit base, adapters, reference passes), what is allocated when that step
    starts, and the peak over its optimizer steps. MiB, keyed by stage name."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    def __enter__(self) -> StageMemory:
        import torch

        from alignment.stages.base import Stage

        self._original = original = Stage._optimizer_step
        phases = self.stages

        def measured(stage, *args, **kwargs):
            name = stage.config.name
            if name not in phases:
                phases[name] = {"before_first_step_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                                "allocated_at_first_step_mb": torch.cuda.memory_allocated() / 2**20}
                torch.cuda.reset_peak_memory_stats()
            record = original(stage, *args, **kwargs)
            phases[name]["step_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            return record

        Stage._optimizer_step = measured
        return self

    def __exit__(self, *exc) -> None:
        from alignment.stages.base import Stage

        Stage._optimizer_step = self._original


def one_pair_batch(recipe, model: str) -> dict:
    """Rows, longest row's tokens, images, tiles used and vision tokens per image of one DPO micro-batch."""
    from alignment.data import collate_preference
    from alignment.models import load_processor
    from alignment.recipe import build_data

    processor = load_processor(model)
    batch = collate_preference(build_data(recipe, recipe.stages[0], processor)[0][:1], processor)
    images = processor.image_processor
    per_tile = (images.size["height"] // 14) ** 2 + 1
    return {"rows": int(batch["input_ids"].shape[0]), "tokens": int(batch["attention_mask"].sum(-1).max()),
            "images": int(batch["pixel_values"].shape[0]), "tiles_used": int(batch["aspect_ratio_mask"].sum()),
            "vision_tokens_per_image": per_tile * images.max_image_tiles}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", choices=("full", "small"), default="full")
    parser.add_argument("--out", default="/tmp/vlm-align-bench/gpu_check.json")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    from alignment.models.standins import build_standin
    from alignment.recipe import make_accelerator, run_recipe

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    folder = build_standin("standin-mllama", work / "model", full_width=args.width == "full",
                           device=str(device), dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    built_s = time.time() - start
    rows, results = [], {}
    for kind, name in (("dpo", "dpo"), ("ppo", "ppo")):
        recipe = recipe_for(kind, str(folder), work / "runs")
        accelerator = make_accelerator(recipe)
        gc.collect()  # the previous run's model goes before this run's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak(device)
        tick = time.time()
        with StageMemory() if device.type == "cuda" else nullcontext() as phases:
            report = run_recipe(recipe, accelerator=accelerator)
        seconds = time.time() - tick
        timing = timed_stage(report, name)
        peak = peak_memory_mb(device)  # on CUDA: since the last stage's first step (StageMemory resets it)
        result = {**timing, "stage_run_s": seconds}
        if phases is not None:  # the run's peak: any stage's loading, steps, or the last one's evaluation
            result["memory_by_stage"] = phases.stages
            peak = phases.stages[name]["step_peak_mb"]
            result["run_peak_mb"] = max([torch.cuda.max_memory_allocated() / 2**20]
                                        + [v for phase in phases.stages.values() for v in phase.values()])
        result["peak_memory_mb"] = peak
        if kind == "dpo":  # one step's tokens at this geometry: text rows, images, tiles, vision tokens
            batch = one_pair_batch(recipe, str(folder))
            result["batch"] = batch
            result["text_tokens_per_s"] = batch["rows"] * batch["tokens"] / timing["s_per_step"]
            result["vision_tokens_per_s"] = batch["images"] * batch["vision_tokens_per_image"] / timing["s_per_step"]
        results[kind] = result
        rows.append([kind, f"{peak:.0f}", f"{timing['s_per_step']:.2f}", f"{timing['samples_per_s']:.3f}",
                     f"{seconds:.0f}"])
        write_json(args.out, payload_of(args, device, built_s, results))  # kept if the next run dies
    print_table(rows, ["step", "step peak MiB (GPU alloc) / peak RSS (CPU)", "s/step", "samples/s", "stage s"])
    for kind, result in results.items():
        for stage, phase in result.get("memory_by_stage", {}).items():
            print(f"{kind}/{stage}: " + ", ".join(f"{key} {value:.0f}" for key, value in phase.items()))
    print(f"wrote {write_json(args.out, payload_of(args, device, built_s, results))}")
    return 0


def payload_of(args, device, built_s: float, results: dict) -> dict:
    """The JSON gpu_check writes: machine, versions, build time and each finished run's figures."""
    return {"machine": machine(), "date": today(),
            "versions": versions("torch", "transformers", "peft", "bitsandbytes"),
            "width": args.width, "device": device.type, "build_s": built_s, "results": results,
            "goal": "11B QLoRA DPO step < 16 GB at batch 1 (issue 16)"}


if __name__ == "__main__":
    raise SystemExit(main())
