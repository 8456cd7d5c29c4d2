"""Seed 004's comparison table of fine-tuning methods, measured on a VLM: tiny-mllama SFT on the book covers.

    python bench/methods_table.py [--steps 100] [--methods lora ia3 ...] [--out bench/results/methods_table_cpu.json]

Every arm is the same SFT stage (same covers, steps, batch, schedule) with one method of the menu
(`lora.method`) or full fine-tuning with one optimizer (`optimizer: adamw | lomo | mezo`), at three
learning rates; the lr with the best exact match on `val` is kept and its `test` exact match reported.
Each run is `vlm-align train` in a fresh process (its own peak RSS). Columns:
- trainable: parameters the method trains (counted on the built policy);
- state MB: parameter + gradient + optimizer-state bytes the run's report counts (the training memory that
  differs between methods; the process's peak RSS, mostly torch itself at this size, is given beside it);
- s/step: median of the run's logged steps (batch / samples per second);
- disk KB: the saved stage folder (adapter, head, configs; checkpoints excluded);
- gen x: greedy generation of 16 test prompts, time per generated token with the method's adapter on, over
  the same with every adapter off (= a merged LoRA's cost: merging adds nothing at inference);
- EM: exact match on test at the lr chosen on val.
BitDelta (a compression, not a trained method) is the best `lora` run compressed to 1 bit
(`vlm-align compress`), served from the base and evaluated on the same test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

# label -> (lora fields, optimizer, quantization, three learning rates)
ARMS = {
    "lora": ({"method": "lora"}, "adamw", "none", (5e-4, 2e-3, 5e-3)),
    "qlora": ({"method": "qlora"}, "adamw", "4bit", (5e-4, 2e-3, 5e-3)),
    "dora": ({"method": "dora"}, "adamw", "none", (5e-4, 2e-3, 5e-3)),
    "lora_fa": ({"method": "lora_fa"}, "adamw", "none", (2e-3, 5e-3, 1.5e-2)),
    "loha": ({"method": "loha"}, "adamw", "none", (2e-3, 5e-3, 1.5e-2)),
    "ia3": ({"method": "ia3"}, "adamw", "none", (5e-2, 1.5e-1, 4e-1)),
    "bitfit": ({"method": "bitfit", "preset": "all"}, "adamw", "none", (2e-3, 1e-2, 3e-2)),  # Llama blocks: no biases
    "prompt_tuning": ({"method": "prompt_tuning"}, "adamw", "none", (3e-2, 1e-1, 3e-1)),
    "prefix_tuning": ({"method": "prefix_tuning"}, "adamw", "none", (1e-3, 5e-3, 2e-2)),
    "bottleneck": ({"method": "bottleneck"}, "adamw", "none", (2e-3, 5e-3, 1.5e-2)),
    "tinytl": ({"method": "tinytl"}, "adamw", "none", (2e-3, 5e-3, 1.5e-2)),
    "full (AdamW)": ({"method": "full"}, "adamw", "none", (1e-4, 3e-4, 1e-3)),
    "full (LOMO)": ({"method": "full"}, "lomo", "none", (5e-2, 1.5e-1, 4e-1)),
    "full (MeZO)": ({"method": "full"}, "mezo", "none", (1e-3, 3e-3, 1e-2)),
}
MODEL = "tiny-mllama"


def recipe(arm: str, lr: float, steps: int, output_dir: Path) -> dict:
    lora, optimizer, quantization, _ = ARMS[arm]
    return {
        "name": "methods_table",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": MODEL, "quantization": quantization},
        "data": {"source": "synthetic_bookcover", "num_covers": 400, "max_eval_examples": 100},
        "stages": [{"type": "sft", "name": "sft", "max_steps": steps, "batch_size": 16, "lr": lr, "warmup_steps": 5,
                    "optimizer": optimizer, "save_every": steps, "eval_examples": 100, "eval_batch_size": 50,
                    "max_new_tokens": 16, "blind_control": False,
                    "lora": {"r": 16, "alpha": 32, "preset": "language", **lora}}],
    }


RUNNER = """
import json, resource, sys
from alignment.cli import main
code = main(["train", sys.argv[1]])
print("RESULT", json.dumps({"exit": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def train(arm: str, lr: float, steps: int, root: Path) -> dict:
    """One SFT run in a fresh process: its report's figures and the process's peak RSS."""
    import yaml

    out = root / f"{arm.replace(' ', '_').replace('(', '').replace(')', '')}-lr{lr:g}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe_in.yaml"
    path.write_text(yaml.safe_dump(recipe(arm, lr, steps, out)))
    tick = time.time()
    done = subprocess.run([sys.executable, "-c", RUNNER, str(path)], capture_output=True, text=True, cwd=ROOT)
    result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None or result["exit"] != 0 or not (out / "report.json").exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"arm": arm, "lr": lr, "failed": " | ".join(tail), "output_dir": str(out)}
    stage = json.loads((out / "report.json").read_text())["stages"][0]
    per_rank = stage["distributed"]["per_rank"][0]
    logged = [h for h in stage["history"] if h.get("samples_per_s")][2:] or stage["history"]
    folder = out / "sft"
    return {
        "arm": arm, "lr": lr, "output_dir": str(out), "wall_s": round(time.time() - tick, 1),
        "val_em": stage["eval"].get("exact_match"), "test_em": stage["test"].get("exact_match"),
        "loss_first": stage["train"].get("loss_first"), "loss_last": stage["train"].get("loss_last"),
        "s_per_step": round(median([16 / h["samples_per_s"] for h in logged]), 4),
        "state_mb": round(sum(per_rank.get(k, 0) for k in ("parameter_bytes", "gradient_bytes",
                                                              "optimizer_state_bytes")) / 2**20, 2),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "disk_kb": round(sum(f.stat().st_size for f in folder.rglob("*")
                             if f.is_file() and "checkpoints" not in f.parts) / 1024, 1),
    }


def trainable_parameters(arm: str) -> int:
    from alignment.policy import LoraSpec, MultimodalPolicy

    lora, _, quantization, _ = ARMS[arm]
    policy = MultimodalPolicy.from_pretrained(MODEL, quantization=quantization)
    policy.add_adapter("policy", LoraSpec(**{"r": 16, "alpha": 32, "preset": "language", **lora}))
    return sum(p.numel() for p in policy.trainable_parameters())


def generation_ratio(arm: str, folder: Path, reps: int = 5) -> float:
    """Greedy generation of 16 test prompts, seconds per generated token, with the stage's adapter over the
    same with every adapter off (per token: answers that stop sooner must not look faster)."""
    import torch

    from alignment.data import build_datasets, collate_prompts
    from alignment.policy import MultimodalPolicy

    _, _, quantization, _ = ARMS[arm]
    policy = MultimodalPolicy.from_pretrained(MODEL, quantization=quantization)
    policy.load_adapter("policy", folder, trainable=False)
    policy.eval()
    test = build_datasets(num_covers=400, seed=0, task="sft", test_split="test")[1][:16]
    batch = collate_prompts(test, policy.processor)

    def timed(off: bool) -> float:
        times = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            with torch.no_grad():
                if off:
                    with policy.reference():
                        tokens = policy.generate(batch, max_new_tokens=16)
                else:
                    tokens = policy.generate(batch, max_new_tokens=16)
            times.append((time.perf_counter() - start) / tokens.shape[1])
        return median(times[1:])

    return round(timed(False) / timed(True), 3)


def bitdelta(best_lora: dict, root: Path) -> dict:
    """The best lora run compressed to 1 bit, evaluated on test: EM and bytes."""
    stage = Path(best_lora["output_dir"]) / "sft"
    out = root / "bitdelta"
    done = subprocess.run([sys.executable, "-m", "alignment.cli", "compress", str(stage), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1:]}
    evaluated = subprocess.run([sys.executable, "-m", "alignment.cli", "eval", str(stage), "--adapters", str(out),
                                "--split", "test"], capture_output=True, text=True, cwd=ROOT)
    report = Path(best_lora["output_dir"]) / "eval-sft-adapters.json"
    metrics = (next(iter(json.loads(report.read_text())["adapters"].values()))["metrics"]
               if evaluated.returncode == 0 and report.exists() else {})
    return {"test_em": metrics.get("exact_match"), "eval_exit": evaluated.returncode,
            "compress_stdout": done.stdout.strip()[-1000:],
            "disk_kb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--root", default=None, help="where the runs go (default: a temp folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods_table_cpu.json"))
    args = parser.parse_args()
    quiet_offline_env()
    root = Path(args.root or tempfile.mkdtemp(prefix="methods_table-"))
    runs, table, best_of = [], [], {}
    for arm in args.methods:
        arm_runs = [train(arm, lr, args.steps, root) for lr in ARMS[arm][3]]
        runs += arm_runs
        for r in arm_runs:
            print(json.dumps(r), flush=True)
        good = [r for r in arm_runs if "failed" not in r]
        if not good:
            table.append([arm, "", "", "", "", "", "", "", "failed: " + arm_runs[0]["failed"][-120:]])
            continue
        best = max(good, key=lambda r: (r["val_em"], -r["lr"]))
        best["gen_ratio"] = generation_ratio(arm, Path(best["output_dir"]) / "sft")
        best["trainable"] = trainable_parameters(arm)
        best_of[arm] = best
        table.append([arm, f"{best['trainable']:,}", best["state_mb"], best["peak_rss_mb"], best["s_per_step"],
                      best["disk_kb"], best["gen_ratio"], f"{best['lr']:g}",
                      f"{best['test_em']:.3f} (val {best['val_em']:.3f})"])
    extra = {}
    if "lora" in best_of:
        extra["bitdelta"] = delta = bitdelta(best_of["lora"], root)
        print(json.dumps(delta), flush=True)
        lora = best_of["lora"]
        table.append(["bitdelta (lora's, 1 bit)", f"({lora['trainable']:,})", "", "", "", delta["disk_kb"],
                      "", "", f"{delta['test_em']:.3f}" if delta.get("test_em") is not None else "failed"])
    print_table(table, ["method", "trainable", "state MB", "peak RSS MB", "s/step", "disk KB", "gen x", "lr",
                        "test EM"])
    write_json(args.out, {"date": today(), "machine": machine(), "versions": versions("torch", "transformers", "peft"),
                          "model": MODEL, "steps": args.steps, "arms": {a: {"lora": ARMS[a][0], "optimizer": ARMS[a][1],
                                                                            "quantization": ARMS[a][2],
                                                                            "lrs": ARMS[a][3]} for a in args.methods},
                          "runs": runs, "best": best_of, "table": table, **extra})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
