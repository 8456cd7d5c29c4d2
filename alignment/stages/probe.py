"""`--dry-run`'s real batch: one micro-batch of a stage, collated exactly as the stage collates it
and run through one no-grad forward on the real processor and model (PPO: also two generated tokens
with the KV cache), so that a shape, token-id or length error shows before step 1, not at step N.
"""

from __future__ import annotations

import time

import torch

from alignment.data import collate_sft


def probe_stage(stage_class, config, policy, ctx, examples: list[dict]) -> dict:
    """Collate `config.batch_size` of `examples` as stage `stage_class` does and run one forward.

    Returns what a real checkpoint sees per example: rows, tokens (longest row, image tokens
    included), images, vision tokens per image and, for Mllama, tiles used of the tile slots."""
    stage = stage_class(config, policy, ctx, examples, [])
    chunk = examples[: config.batch_size]
    batch = stage.collate(chunk)
    start = time.time()
    with torch.no_grad(), ctx.accelerator.autocast():
        features = policy.encode_images(batch)
        if config.type in ("ppo", "grpo"):  # rollouts: a KV-cache generation, then the updates' log-probs
            policy.generate(batch, max_new_tokens=2, image_features=features)
            batch = _as_answers(chunk, policy, ctx)
            features = policy.encode_images(batch)
        policy.completion_logprobs(batch, features)
    facts = {
        "rows": int(batch["input_ids"].shape[0]),
        "tokens": int(batch["attention_mask"].sum(-1).max()),
        "images": len(features),
        "forward_s": round(time.time() - start, 2),
    }
    lengths = getattr(features, "lengths", None)  # the generic family encodes nothing ahead: no count
    if lengths is not None:
        facts["vision_tokens_per_image"] = (int(lengths.max()) if bool((lengths == lengths.max()).all())
                                            else [int(lengths.min()), int(lengths.max())])
    if "aspect_ratio_mask" in batch:
        used = batch["aspect_ratio_mask"].sum(-1).flatten()
        facts.update(tiles_used=[int(used.min()), int(used.max())], tile_slots=int(batch["aspect_ratio_mask"].shape[-1]))
    return facts


def _as_answers(examples: list[dict], policy, ctx) -> dict:
    """PPO's prompts with their reference answers as completions (what an update's forward scores)."""
    from alignment.stages.common import to_device

    rows = [{**e, "answer": e.get("answer", e.get("chosen"))} for e in examples]
    return to_device(collate_sft(rows, policy.processor, **ctx.collate_kwargs), policy.device)


def describe_probe(name: str, facts: dict) -> str:
    """One line for the dry run's output."""
    tiles = (f", tiles used {facts['tiles_used'][0]}-{facts['tiles_used'][1]} of {facts['tile_slots']}"
             if "tiles_used" in facts else "")
    vision = (f", {facts['vision_tokens_per_image']} vision tokens each" if "vision_tokens_per_image" in facts
              else " (pixels per row: the generic family)")
    return (f"[{name}] real batch ok: {facts['rows']} rows, longest {facts['tokens']} tokens; {facts['images']} images"
            f"{vision}{tiles}; forward {facts['forward_s']} s")
