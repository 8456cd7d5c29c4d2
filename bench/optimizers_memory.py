"""Peak training memory of full fine-tuning on tiny-mllama: AdamW vs LOMO vs MeZO vs inference only.

    python bench/optimizers_memory.py [--out bench/results/optimizers_memory_cpu.json] [--steps 20]
                                      [--batch-sizes 2,8] [--threads 1]

Each arm runs in a fresh subprocess. It loads tiny-mllama (fp32, unquantised) and takes the same
batch-size synthetic-cover SFT examples, so every step sees the same batch, reshuffled. It sets
up `SFTStage` with `lora.method: full` (preset `language`: the whole text decoder), then:
- `adamw`, `lomo`, `mezo`: the shared loop (`Stage.train`) for `--steps` steps with that
  `optimizer:`. Constant lr per optimizer (below), `max_grad_norm` 1.0 (LOMO then runs its two
  clipping passes; MeZO ignores it). Checkpoints are off.
- `inference`: one forward of the same batch through the same `train_step`, under `torch.no_grad`.

Peak memory = the bytes of every weight and buffer held before the arm starts, plus the peak of
the torch CPU allocator's running sum of allocations minus frees during the arm (`torch.profiler`
memory events, as `_common.peak_step_memory_mb`). That covers gradients, optimizer state,
activations and temporaries, including the batch's collation. It is neither RSS nor tracemalloc:
tracemalloc does not see torch's allocator, and RSS does not come down after frees.

Each batch size of `--batch-sizes` is one run of every arm. With a small batch the activations
are smaller than the gradients; with a large one they dominate. AdamW's peak then falls at the end
of the forward pass, with its state allocated and no gradients yet.

Bars (issue #21), per batch size:
- LOMO's peak <= AdamW's peak - AdamW's optimizer state (2 x fp32 trained-parameter bytes).
- MeZO's peak <= 1.2 x the inference peak.
- LOMO and MeZO lower the loss over the steps. For MeZO the step's loss is (L+ + L-) / 2.
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

from _common import machine, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

quiet_offline_env()

ARMS = ("inference", "adamw", "lomo", "mezo")
LR = {"adamw": 1e-3, "lomo": 3e-2, "mezo": 1e-4}  # per optimizer: SGD needs a larger step, MeZO a far smaller one
MB = 2**20


class _OneProcess:
    """The accelerator of a one-process run on the CPU, without accelerate."""

    process_index, num_processes, is_main_process = 0, 1, True
    mixed_precision = "no"

    def __init__(self):
        import torch

        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _allocator_peak(run) -> tuple[int, object]:
    """(peak bytes of the torch CPU allocator above its level at the start, run's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak, result


def arm(name: str, steps: int, batch_size: int, threads: int) -> dict:
    """One arm, in this process; returns its figures."""
    import torch

    from alignment.config import LoraConfig, SFTConfig
    from alignment.data import build_datasets
    from alignment.policy import MultimodalPolicy
    from alignment.stages.base import RunContext
    from alignment.stages.sft import SFTStage

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    policy = MultimodalPolicy.from_pretrained("tiny-mllama")
    train, _, _ = build_datasets(num_covers=60, seed=0, task="sft", max_eval_samples=1)
    examples = train[:batch_size]
    optimizer = name if name != "inference" else "adamw"
    config = SFTConfig(name="sft", max_steps=steps, batch_size=batch_size, lr=LR.get(optimizer, 1e-3),
                       lr_schedule="constant", optimizer=optimizer, save_every=10**6, log_every=10**6,
                       lora=LoraConfig(method="full"), blind_control=False)
    with tempfile.TemporaryDirectory() as out:
        ctx = RunContext(accelerator=_OneProcess(), output_dir=Path(out), seed=0, report_to=("none",))
        stage = SFTStage(config, policy, ctx, examples, [])
        stage.setup(None)
        stage._save = lambda *args, **kwargs: None  # checkpoints are not what is measured
        weights = sum(t.numel() * t.element_size() for t in [*policy.parameters(), *policy.buffers()])
        trained = sum(p.numel() * p.element_size() for p in policy.trainable_parameters())
        elements = sum(p.numel() for p in policy.trainable_parameters())
        tick = time.time()
        if name == "inference":
            def forward():
                policy.train()
                with torch.no_grad():
                    batch = stage.collate(examples)
                    loss, _ = stage.train_step(batch)
                return loss.item() / stage.count(batch)

            peak, loss = _allocator_peak(forward)
            losses = [loss]
        else:
            peak, _ = _allocator_peak(stage.train)
            losses = [h["loss"] for h in stage.history if "loss" in h]
        seconds = time.time() - tick
    return {"arm": name, "optimizer": optimizer if name != "inference" else None, "lr": config.lr,
            "steps": 0 if name == "inference" else steps, "weight_bytes": weights, "trained_bytes": trained,
            "trained_elements": elements,
            "peak_above_weights_bytes": peak, "peak_bytes": weights + peak, "loss_first": losses[0],
            "loss_last": losses[-1], "losses": losses, "s_per_step": seconds / max(1, len(losses))}


def run_arms(batch_size: int, steps: int, threads: int) -> dict:
    """Every arm at one batch size, one fresh process each; their figures and the bars."""
    results = {}
    for name in ARMS:  # one fresh process per arm: no allocator state carried over
        cmd = [sys.executable, __file__, "--arm", name, "--steps", str(steps), "--batch-sizes", str(batch_size),
               "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"arm {name} (batch {batch_size}) failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    adamw, lomo, mezo, inference = (results[k] for k in ("adamw", "lomo", "mezo", "inference"))
    adam_state = 2 * 4 * adamw["trained_elements"]  # exp_avg + exp_avg_sq, fp32, per trained element
    bars = {
        "lomo_below_adamw_by_state": adamw["peak_bytes"] - lomo["peak_bytes"] >= adam_state,
        "mezo_within_1.2x_inference": mezo["peak_bytes"] <= 1.2 * inference["peak_bytes"],
        "lomo_lowers_loss": lomo["loss_last"] < lomo["loss_first"],
        "mezo_lowers_loss": mezo["loss_last"] < mezo["loss_first"],
    }
    return {"batch_size": batch_size, "adamw_state_bytes": adam_state,
            "lomo_below_adamw_bytes": adamw["peak_bytes"] - lomo["peak_bytes"],
            "mezo_over_inference": mezo["peak_bytes"] / inference["peak_bytes"], "bars": bars, "arms": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "optimizers_memory_cpu.json"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", default="2,8", help="comma-separated; each is one run of every arm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.arm:
        print("RESULT " + json.dumps(arm(args.arm, args.steps, sizes[0], args.threads)))
        return
    runs, rows = [], []
    for batch_size in sizes:
        run = run_arms(batch_size, args.steps, args.threads)
        runs.append(run)
        inference = run["arms"]["inference"]["peak_bytes"]
        rows += [[batch_size, r["arm"], r["lr"] if r["steps"] else "-", r["steps"], r["weight_bytes"] / MB,
                  r["peak_bytes"] / MB, r["peak_above_weights_bytes"] / MB, r["peak_bytes"] / inference,
                  round(r["loss_first"], 3), round(r["loss_last"], 3), r["s_per_step"]] for r in run["arms"].values()]
    table = print_table(rows, ["batch", "arm", "lr", "steps", "weights MiB", "peak MiB", "peak above weights MiB",
                               "x inference", "loss first", "loss last", "s/step"])
    for run in runs:
        trained = run["arms"]["adamw"]["trained_bytes"]
        print(f"\nbatch {run['batch_size']}: {trained / MB:.2f} MiB trained (fp32, the text decoder); AdamW's state "
              f"{run['adamw_state_bytes'] / MB:.2f} MiB; LOMO below AdamW by {run['lomo_below_adamw_bytes'] / MB:.2f} MiB; "
              f"MeZO / inference = {run['mezo_over_inference']:.3f}")
        for key, ok in run["bars"].items():
            print(f"  {key}: {'met' if ok else 'MISSED'}")
    write_json(args.out, {"machine": machine(), "date": today(), "versions": versions("torch", "transformers"),
                          "steps": args.steps, "threads": args.threads, "lr": LR, "runs": runs, "table": table})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
