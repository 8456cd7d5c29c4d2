"""A recipe's figures over data/initialisation seeds and torch thread counts, on `val` and `test`.

    python bench/recipe_seeds.py recipes/dpo_bookcover.yaml --seeds 0 1 2 --threads 1 2
    python bench/recipe_seeds.py recipes/ppo_bookcover.yaml --seeds 0 1 2 --threads 2 --out PATH

Each run is the recipe exactly as shipped, launched as a user launches it
(`accelerate launch --config_file launch/accelerate/cpu.yaml launch/run.py RECIPE`), with
`seed=S data.seed=S` (new covers, new splits, new LoRA initialisation) and OMP_NUM_THREADS=T. Runs with
one thread go two at a time (one per core: what "1 thread" means on this 2-core machine); runs with
two threads go alone. A bar met at one seed and one thread count only is not met: the table gives
each metric's mean and range per thread count, per split, and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine, print_table, today, versions, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METRICS = {  # the figures each recipe's bars are about, per stage type
    "sft": ("exact_match", "mean_answer_words", "exact_match_blind"),
    "dpo": ("preference_accuracy", "exact_match", "mean_answer_words"),
    "reward": ("pairwise_accuracy", "reward_std"),
    "ppo": ("mean_reward_before", "mean_reward_after", "kl", "exact_match", "exact_match_before", "mean_answer_words"),
    "grpo": ("mean_reward_before", "mean_reward_after", "kl", "exact_match", "exact_match_before", "mean_answer_words",
             "mean_answer_words_before"),
}


def launch(recipe: str, seed: int, threads: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = ["accelerate", "launch", "--config_file", str(ROOT / "launch/accelerate/cpu.yaml"),
               str(ROOT / "launch/run.py"), recipe, f"output_dir={out}", f"seed={seed}", f"data.seed={seed}"]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def run_all(recipe: str, seeds: list[int], threads: list[int], root: Path) -> list[dict]:
    jobs = [(t, s) for t in threads for s in seeds]
    runs, pending = [], list(jobs)
    while pending:
        t = pending[0][0]
        width = 2 if t == 1 else 1  # one-thread runs two at a time: one per core
        batch = [job for job in pending if job[0] == t][:width]
        started = []
        for t_, s in batch:
            pending.remove((t_, s))
            out = root / f"seed{s}-threads{t_}"
            started.append((t_, s, out, time.time(), launch(recipe, s, t_, out)))
        for t_, s, out, tick, process in started:
            code = process.wait()
            report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
            runs.append({"seed": s, "threads": t_, "exit": code, "wall_s": round(time.time() - tick, 1),
                         "output_dir": str(out), "report": report})
            print(f"seed {s}, {t_} thread(s): exit {code}, {time.time() - tick:.0f} s", flush=True)
    return runs


def summarise(runs: list[dict]) -> list[list]:
    rows = []
    threads = sorted({r["threads"] for r in runs})
    first = next(r["report"] for r in runs if r["report"])
    for stage in first["stages"]:
        for metric in METRICS.get(stage["type"], ()):
            for split in ("eval", "test"):
                for t in threads:
                    values = [next(s for s in r["report"]["stages"] if s["name"] == stage["name"]).get(split, {}).get(metric)
                              for r in runs if r["threads"] == t and r["report"]]
                    values = [v for v in values if isinstance(v, (int, float))]
                    if values:
                        rows.append([stage["name"], metric, "val" if split == "eval" else "test", t,
                                     round(sum(values) / len(values), 4), round(min(values), 4), round(max(values), 4),
                                     " ".join(f"{v:.4f}" for v in values)])
    for t in threads:
        walls = [r["wall_s"] for r in runs if r["threads"] == t]
        rows.append(["(run)", "wall_s", "-", t, round(sum(walls) / len(walls), 1), min(walls), max(walls),
                     " ".join(f"{w:.0f}" for w in walls)])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--root", default=None, help="where the runs go (default /tmp/vlm-align-bench/seeds/<recipe>)")
    parser.add_argument("--out", default=None, help="JSON to write (default ROOT/summary.json)")
    args = parser.parse_args(argv)
    name = Path(args.recipe).stem
    root = Path(args.root or f"/tmp/vlm-align-bench/seeds/{name}")
    runs = run_all(str(Path(args.recipe).resolve()), args.seeds, args.threads, root)
    rows = summarise(runs)
    print_table(rows, ["stage", "metric", "split", "threads", "mean", "min", "max", "per seed"])
    payload = {"recipe": name, "machine": machine(), "date": today(), "versions": versions("torch", "transformers"),
               "seeds": args.seeds, "threads": args.threads,
               "runs": [{k: v for k, v in r.items() if k != "report"} for r in runs],
               "table": rows, "reports": [r["report"] for r in runs]}
    print(f"wrote {write_json(args.out or root / 'summary.json', payload)}")
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
