"""The rollout record: sampled answers to a batch of prompts and everything PPO or GRPO derives from them.

B rows (one prompt and its sampled answer each), T = prompt + answer tokens. A row is
``[left padding | prompt | answer ... <|eot_id|> | right padding]``. Per-token fields are aligned
with log-prob positions, ``[B, T-1]``: position t holds what concerns token t+1 given tokens <= t
(its log-prob, the value of the state before it, its reward), and ``response_mask`` is 1 where
token t+1 is an answer token (the stop token included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from alignment.models.features import ImageFeatures, cat_image_indices, compact_images, padded_cat


@dataclass
class Rollout:
    """One rollout batch. Tensors only (no grad); `ids` names each row's example."""

    input_ids: torch.Tensor  # [B, T] int64: prompt (left-padded) then answer (right-padded)
    attention_mask: torch.Tensor  # [B, T] int64: 1 on prompt and answer tokens
    cross_attention_mask: torch.Tensor | None  # [B, T, 1, tiles] Mllama: image visible from <|image|> on
    image_features: ImageFeatures | None  # the N images, encoded once (policy.encode_images; the generic family:
    #                                      its PixelRows); N = B without image_index
    response_mask: torch.Tensor  # [B, T-1] float: 1 where position t predicts an answer token
    old_logprobs: torch.Tensor  # [B, T-1] log pi_old(token t+1) under the sampling policy
    ref_logprobs: torch.Tensor  # [B, T-1] log pi_ref(token t+1) under the reference
    values: torch.Tensor  # [B, T-1] critic's V(tokens <= t) at sampling time
    rewards: torch.Tensor  # [B, T-1] -kl_coef * (old - ref) per answer token, + score on the last one
    advantages: torch.Tensor  # [B, T-1] GAE advantages (whitened over the rollout when configured)
    returns: torch.Tensor  # [B, T-1] advantages + values (before whitening): the critic's targets
    scores: torch.Tensor  # [B] reward model's score of each whole answer
    ids: list[str]  # [B] example ids
    pixel_inputs: dict | None = None  # the family's pixel tensors of the N images, kept only when an adapter
    #                                   touches the vision tower (updates then re-encode with gradient)
    image_index: torch.Tensor | None = None  # [B] or [B, K] int64 (-1: empty slot): row -> its images (GRPO: G
    #                                          rows share one); None: row i -> image i
    group_advantages: torch.Tensor | None = None  # [B] GRPO: each answer's advantage within its prompt's group
    select_pixels: Callable | None = None  # the family's `select_pixels(pixels, images)` (pixel layouts differ)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def model_batch(self) -> dict:
        """The batch `MultimodalPolicy` forwards take: rows with their image (row i -> feature row i)
        and labels on the answer tokens (so `completion_logprobs` scores exactly the answer)."""
        labels = torch.full_like(self.input_ids, -100)
        labels[:, 1:] = torch.where(self.response_mask.bool(), self.input_ids[:, 1:], labels[:, 1:])
        index = self.image_index if self.image_index is not None else torch.arange(self.size)
        batch = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": labels,
                 "image_index": index.to(self.input_ids.device)}
        if self.cross_attention_mask is not None:
            batch["cross_attention_mask"] = self.cross_attention_mask
        return {**batch, **(self.pixel_inputs or {})}

    def select(self, rows: torch.Tensor | list[int]) -> Rollout:
        """The rollout of the given rows, with columns that are padding in every one of them dropped
        (and, with `image_index`, only the images those rows use, each once)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        index = self.image_index if self.image_index is not None else torch.arange(self.size)
        images, image_index = compact_images(index[rows.to(index.device)])
        picked = {"image_index": image_index}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("image_index", "select_pixels") or value is None:
                picked.setdefault(f.name, value)
            elif f.name == "image_features":
                picked[f.name] = value.select(images)
            elif f.name == "pixel_inputs":
                picked[f.name] = self.select_pixels(value, images)
            elif f.name == "ids":
                picked[f.name] = [value[i] for i in rows.tolist()]
            else:
                picked[f.name] = value[rows.to(value.device)]
        return Rollout(**picked).trimmed()

    def trimmed(self) -> Rollout:
        """Drop leading and trailing columns that are padding in every row (nothing changes numerically:
        Mllama's rotary positions are relative, and padding is masked)."""
        used = self.attention_mask.bool().any(dim=0).nonzero().flatten()
        if used.numel() == 0:
            return self
        first, last = int(used[0]), int(used[-1]) + 1
        if first == 0 and last == self.input_ids.shape[1]:
            return self
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask", "cross_attention_mask"):
                value = None if value is None else value[:, first:last]
            elif torch.is_tensor(value) and value.dim() == 2 and f.name != "image_index":
                value = value[:, first : last - 1]  # [B, T-1] positions first .. last-2
            out[f.name] = value
        return Rollout(**out)

    def micro_batches(self, size: int) -> list[Rollout]:
        return [self.select(torch.arange(start, min(start + size, self.size)))
                for start in range(0, self.size, size)]


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Concatenate rollouts along rows; all share one prompt length (collated together), answers are
    right-padded to the longest."""
    width = max(p.input_ids.shape[1] for p in parts)

    def right_pad(x, value, full):
        missing = full - x.shape[1]
        if missing == 0:
            return x
        shape = (x.shape[0], missing, *x.shape[2:])
        return torch.cat([x, x.new_full(shape, value)], dim=1)

    out = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "image_index":  # offsets into the concatenated images
            out[f.name] = cat_image_indices(
                [v if v is not None else torch.arange(p.size) for v, p in zip(values, parts)],
                [_image_count(p) for p in parts])
        elif f.name == "ids":
            out[f.name] = [i for v in values for i in v]
        elif values[0] is None or f.name == "select_pixels":
            out[f.name] = values[0]
        elif f.name == "pixel_inputs":  # every family's pixel keys concatenate along images
            # (zero-padded: the generic family's rows may hold different numbers of sub-images)
            out[f.name] = {k: padded_cat([v[k] for v in values]) for k in values[0]}
        elif f.name == "image_features":  # ImageFeatures, or the generic family's pixel rows
            out[f.name] = type(values[0]).cat(values)
        elif f.name in ("scores", "group_advantages"):
            out[f.name] = torch.cat(values)
        else:
            full = width if f.name in ("input_ids", "attention_mask", "cross_attention_mask") else width - 1
            fill = pad_id if f.name == "input_ids" else 0
            out[f.name] = torch.cat([right_pad(v, fill, full) for v in values])
    return Rollout(**out)


def _image_count(part: Rollout) -> int:
    """How many images a rollout holds (its features', else one per row)."""
    return len(part.image_features) if part.image_features is not None else part.size
