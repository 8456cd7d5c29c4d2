"""Training steps at real geometry: s/step and peak RSS of one SFT, DPO and PPO-update step on the
repo's real-geometry stand-ins (random weights, CPU), with the LM head over every position ("full",
how the library ran before issue #20), over the answer window only ("window", `windowed_logits`), and
for DPO also with each pair as one packed row ("prefix", `pair_logprobs`: the image + prompt prefix
through the language model once per pair).

    python bench/realshape.py [--models standin-llava standin-mllama standin-qwen25vl] [--steps 3]
                              [--out bench/results/realshape_cpu.json]

Each (model, stage, variant) runs in a fresh process so that its peak RSS is its own. The step is the
library's own math on one batch of 600x900 covers (4 tiles for Mllama, 576 image tokens for LLaVA,
486 for Qwen2.5-VL at max_pixels 401408), fp32, a `language` LoRA r16:
- sft: `windowed_logits` + `sft_loss_sum` + backward (full: every position's logits);
- dpo: 2 pairs, images encoded once, policy log-probs with gradient, reference (adapter off) without,
  `dpo_loss` + backward;
- ppo: 4 answer rows, actor log-probs with gradient + critic values (`head_values`) + backward.
Times are medians after one warm-up step; compare variants within one run only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, print_table, quiet_offline_env, today, versions, write_json  # noqa: E402

STAGES = ("sft", "dpo", "ppo")
VARIANTS = ("full", "window", "prefix")  # "prefix": DPO only


def _full_window(policy, batch, image_features=None):
    """Every position's logits, as `windowed_logits` returns them (the path before issue #20)."""
    return policy.forward(batch, image_features).logits, batch["labels"], 0


def one(model: str, stage: str, variant: str, steps: int) -> dict:
    """Run `steps` (+1 warm-up) of `stage` in this process; s/step and this process's peak RSS."""
    quiet_offline_env()
    import torch

    from alignment.data import build_datasets, collate_preference, collate_sft, make_preference_pairs
    from alignment.losses import dpo_loss, sft_loss_sum
    from alignment.policy import LoraSpec, MultimodalPolicy

    torch.manual_seed(0)
    max_pixels = 401408 if "qwen" in model else None
    policy = MultimodalPolicy.from_pretrained(model, max_pixels=max_pixels)
    policy.add_adapter("policy", LoraSpec(r=16))
    if stage == "ppo":
        policy.add_adapter("critic", LoraSpec(r=16), head=True)
        policy.set_adapter("policy")
    if variant == "full":
        policy.windowed_logits = lambda batch, image_features=None: _full_window(policy, batch, image_features)
    examples = build_datasets(num_covers=16, seed=0, task="sft", max_eval_samples=2, image_size=(600, 900))[0]
    if stage == "dpo":
        batch = collate_preference(make_preference_pairs(examples[:2], seed=0), policy.processor)
    else:
        batch = collate_sft(examples[: 4 if stage == "ppo" else 2], policy.processor)
    params = policy.trainable_parameters()

    def step():
        policy.model.zero_grad(set_to_none=True)
        if stage == "sft":
            logits, labels, _ = policy.windowed_logits(batch)
            loss = sft_loss_sum(logits, labels)[0]
        elif stage == "dpo":
            with torch.no_grad():
                features = policy.encode_images(batch)
                with policy.reference():
                    ref = policy.pair_logprobs(batch, features, share_prefix=variant == "prefix")[1]
            logps = policy.pair_logprobs(batch, features, share_prefix=variant == "prefix")[1]
            n = batch["num_pairs"]
            loss = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:])[0].sum()
        else:
            with torch.no_grad():
                features = policy.encode_images(batch)
            loss = -policy.completion_logprobs(batch, features)[1].sum()
            with policy.use_adapter("critic"):
                loss = loss + policy.head_values(batch, "critic", features).square().mean()
        loss.backward()
        return float(loss)

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    assert all(p.grad is not None for p in params if p.requires_grad)
    return {"model": model, "stage": stage, "variant": variant, "s_per_step": round(median(times), 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "rows": int(batch["input_ids"].shape[0]), "tokens": int(batch["input_ids"].shape[1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["standin-llava", "standin-mllama", "standin-qwen25vl"])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "realshape_cpu.json"))
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "STAGE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, steps=args.steps)))
        return 0
    rows = []
    for model in args.models:
        for stage in args.stages:
            for variant in VARIANTS if stage == "dpo" else VARIANTS[:2]:
                done = subprocess.run([sys.executable, __file__, "--one", model, stage, variant, "--steps",
                                       str(args.steps)], capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    table = []
    for model in args.models:
        for stage in args.stages:
            runs = {r["variant"]: r for r in rows if r["model"] == model and r["stage"] == stage}
            full, window, prefix = runs["full"], runs["window"], runs.get("prefix")
            table.append([model, stage, f"{full['rows']} x {full['tokens']}", full["s_per_step"], window["s_per_step"],
                          prefix["s_per_step"] if prefix else "", full["peak_rss_gb"], window["peak_rss_gb"],
                          prefix["peak_rss_gb"] if prefix else ""])
    print_table(table, ["model", "step", "rows x tokens", "full s", "window s", "prefix s", "full RSS GB",
                        "window RSS GB", "prefix RSS GB"])
    write_json(args.out, {"date": today(), "machine": machine(), "versions": versions("torch", "transformers"),
                          "steps": args.steps, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
