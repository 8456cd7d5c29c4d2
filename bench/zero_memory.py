"""What each process holds under DDP, ZeRO-2 and ZeRO-3: a ~1.1B-parameter Mllama, 4-bit, 2 CPU processes.

    python bench/zero_memory.py [--out /tmp/vlm-align-bench/zero_memory.json] [--kinds dpo,ppo]
                                [--baseline-tree /path/to/an/older/checkout]

Builds the Mllama of bench/ppo_memory.py (text hidden 2048, 16+2 layers, MLP 8192; tiny vision tower
and tokenizer; random weights) once, then launches `launch/run.py` on 2 processes per engine
(`launch/accelerate/{ddp,deepspeed_zero2,deepspeed_zero3}_cpu.yaml`) for two DPO steps (after one SFT
step) and two PPO iterations (after one SFT and one reward step), the second one timed, 4-bit, LoRA r16 on the language model.
From each run's report.json: the bytes each process held in the measured stage (parameters, trained
gradients, Adam's moments, ZeRO's fp32 master weights; `distributed.per_rank`) and its s/step.

`--baseline-tree`: also run DDP from another checkout (e.g. the commit before the engine, whose loop
summed gradients with one all_reduce per tensor) for its s/step on the same model and batch.
Timing on a shared 2-core machine is noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

quiet_offline_env()

ENGINES = {"ddp": "launch/accelerate/ddp_cpu.yaml", "zero2": "launch/accelerate/deepspeed_zero2_cpu.yaml",
           "zero3": "launch/accelerate/deepspeed_zero3_cpu.yaml"}
RECIPES = {"dpo": ("dpo_bookcover.yaml", "dpo", 2), "ppo": ("ppo_bookcover.yaml", "ppo", 3)}


def run(tree: Path, config: str, kind: str, model: Path, out: Path) -> dict:
    """One 2-process launch of `kind`'s recipe from checkout `tree`; the measured stage's report entry."""
    recipe, stage, stages = RECIPES[kind]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config),
           str(tree / "launch" / "run.py"), str(ROOT / "recipes" / recipe), f"output_dir={out}",
           f"model.name={model}", "model.quantization=4bit", "model.gradient_checkpointing=true",
           "data.num_covers=40", "data.max_eval_examples=1", "report_to=[none]"]
    for i in range(stages):  # the measured (last) stage runs 2 steps: its second is timed
        cmd += [f"stages.{i}.max_steps={2 if i == stages - 1 else 1}", f"stages.{i}.batch_size=2", f"stages.{i}.grad_accum=1",
                f"stages.{i}.eval_examples=1", f"stages.{i}.max_new_tokens=2", f"stages.{i}.warmup_steps=0",
                f"stages.{i}.lora.r=16", f"stages.{i}.lora.preset=language"]
    if kind == "ppo":
        cmd += ["stages.2.ppo_epochs=1", "stages.2.num_minibatches=1", "stages.2.max_new_tokens=8"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if result.returncode != 0:
        raise RuntimeError(f"{config} {kind} failed:\n{result.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return next(s for s in report["stages"] if s["name"] == stage)


def held_mb(entry: dict) -> dict:
    """Rank 0's bytes by kind, in MiB (the ranks hold the same amounts here)."""
    rank = entry.get("distributed", {}).get("per_rank", [{}])[0]
    keys = ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "master_weight_bytes")
    out = {k.replace("_bytes", "_mb"): (rank.get(k) or 0) / 2**20 for k in keys}
    out["total_mb"] = sum(out.values())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/vlm-align-bench/zero_memory.json")
    parser.add_argument("--kinds", default="dpo,ppo")
    parser.add_argument("--engines", default="ddp,zero2,zero3")
    parser.add_argument("--baseline-tree", default=None)
    args = parser.parse_args(argv)
    from ppo_memory import build_model

    work = Path(tempfile.mkdtemp(prefix="zero-memory-"))
    parameters = build_model(work / "model", hidden=2048, layers=16, intermediate=8192)
    results, rows = [], []
    runs = [(engine, ROOT, ENGINES[engine]) for engine in args.engines.split(",")]
    if args.baseline_tree:
        runs.append(("ddp (baseline tree)", Path(args.baseline_tree).resolve(), ENGINES["ddp"]))
    for kind in args.kinds.split(","):
        for engine, tree, config in runs:
            entry = run(tree, config, kind, work / "model", work / f"{kind}-{len(results)}")
            steps = [h for h in entry["history"] if "loss" in h]
            result = {"kind": kind, "engine": engine, "s_per_step": 1.0 / steps[-1]["samples_per_s"] * 2 * 2,
                      "loss_first": steps[0]["loss"], **held_mb(entry)}
            results.append(result)
            rows.append([kind, engine, f"{result['parameter_mb']:.0f}", f"{result['gradient_mb']:.1f}",
                         f"{result['optimizer_state_mb']:.1f}", f"{result['master_weight_mb']:.1f}",
                         f"{result['total_mb']:.0f}", f"{result['s_per_step']:.1f}", f"{result['loss_first']:.4f}"])
            print(rows[-1], flush=True)
    for kind in args.kinds.split(","):
        ddp = next((r for r in results if r["kind"] == kind and r["engine"] == "ddp"), None)
        for r in results:
            if ddp and r["kind"] == kind:
                r["total_vs_ddp"] = r["total_mb"] / ddp["total_mb"]
    print_table(rows, ["step", "engine", "params MiB", "grads MiB", "Adam MiB", "fp32 masters MiB",
                       "total MiB / rank", "s/step", "first loss"])
    payload = {"machine": machine(), "date": today(), "versions": versions("torch", "transformers", "deepspeed",
                                                                         "accelerate", "bitsandbytes"),
               "model_parameters": parameters, "processes": 2, "batch_per_process": 2, "results": results,
               "goal": "ZeRO-3 total per rank <= 0.6x DDP (issue 17)"}
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
