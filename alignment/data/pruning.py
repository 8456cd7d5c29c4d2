"""Data pruning (seed 002): keep k training examples that are diverse, show images, and cover
every category.

`k_center_select` is the rule, on any embeddings ``E [N, D]``:

1. coverage: for each category (sorted), its example nearest to the category's mean embedding,
   among the category's image examples when it has any (so every category appears once);
2. greedy k-center: add, one at a time, the example farthest (Euclidean) from everything chosen
   so far, drawing from the image examples until they run out (``prefer_images``), then from the
   rest, until k are chosen. Greedy k-center is within 2x of the smallest covering radius.

Ties go to the lowest index, so the choice is deterministic. `policy_embeddings` gives each example
the policy's own pooled embedding ``[D_text + D_image]``: the mean last hidden state over the
example's tokens (prompt and answer, read with the image) and the mean image feature, each scaled
to unit length. `covering_radius` and `min_pairwise_distance` measure how spread a set is.

Imports torch lazily, so ``alignment.data`` stays light.
"""

from __future__ import annotations

import random
from typing import Any


def k_center_select(embeddings, k: int, categories: list[Any] | None = None,
                    has_image: list[bool] | None = None, prefer_images: bool = True) -> list[int]:
    """Indices (in selection order) of k rows of ``embeddings [N, D]`` by the rule above."""
    import torch

    n = embeddings.shape[0]
    if k >= n:
        return list(range(n))
    x = embeddings.double()
    has_image = list(has_image) if has_image is not None else [True] * n
    chosen: list[int] = []
    if categories is not None:
        groups: dict[Any, list[int]] = {}
        for i, c in enumerate(categories):
            groups.setdefault(c, []).append(i)
        if len(groups) > k:
            raise ValueError(f"k={k} cannot cover all {len(groups)} categories once; raise data.select.k")
        for c in sorted(groups, key=str):
            rows = groups[c]
            pool = [i for i in rows if has_image[i]] if prefer_images and any(has_image[i] for i in rows) else rows
            centre = x[rows].mean(0)
            chosen.append(pool[int(torch.cdist(x[pool], centre[None]).squeeze(1).argmin())])
    distance = torch.full((n,), float("inf"), dtype=torch.float64)
    for i in chosen:
        distance = torch.minimum(distance, torch.cdist(x, x[i : i + 1]).squeeze(1))
    image_mask = torch.tensor(has_image)
    while len(chosen) < k:
        free = torch.ones(n, dtype=torch.bool)
        free[chosen] = False
        pool = free & image_mask if prefer_images and bool((free & image_mask).any()) else free
        score = torch.where(pool, distance, torch.tensor(-1.0, dtype=torch.float64))
        if not chosen:  # no category seeds: start from the row farthest from the mean
            score = torch.where(pool, torch.cdist(x, x.mean(0, keepdim=True)).squeeze(1), score)
        i = int(score.argmax())
        chosen.append(i)
        distance = torch.minimum(distance, torch.cdist(x, x[i : i + 1]).squeeze(1))
    return chosen


def covering_radius(embeddings, chosen: list[int]) -> float:
    """max over all rows of the distance to the nearest chosen row (what k-center minimises)."""
    import torch

    x = embeddings.double()
    return float(torch.cdist(x, x[chosen]).min(dim=1).values.max())


def min_pairwise_distance(embeddings, chosen: list[int]) -> float:
    """The smallest distance between two distinct chosen rows."""
    import torch

    x = embeddings.double()[chosen]
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def has_real_image(example: dict[str, Any]) -> bool:
    """False for text-only examples (ScienceQA's questions without an image carry a blank one)."""
    return bool(example.get("has_image", True))


def category_of(example: dict[str, Any], field: str | None) -> Any:
    if field is not None:
        return example.get(field)
    return example.get("category", example.get("kind"))


def policy_embeddings(policy, examples: list[dict[str, Any]], batch_size: int = 32,
                      instruction: str | None = None, max_length: int | None = None):
    """Each example's pooled embedding from the policy's active adapter: ``[N, D_text + D_image]``,
    D_text the text hidden size, D_image the image feature width (both halves unit length)."""
    import torch
    from torch.nn import functional as F

    from alignment.data.collate import collate_sft

    kwargs = {"max_length": max_length} | ({"instruction": instruction} if instruction is not None else {})
    rows = []
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_sft(examples[start : start + batch_size], policy.processor, **kwargs)
            batch = {k: v.to(policy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            features = policy.encode_images(batch)
            hidden = policy.forward(batch, features, hidden=True).hidden_states[-1].float()  # [B, T, h]
            mask = batch["attention_mask"].float()[..., None]
            text = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            image = _row_image_means(features, batch["image_index"])
            rows.append(torch.cat([F.normalize(text, dim=-1), F.normalize(image, dim=-1)], dim=-1).cpu())
    policy.train(was_training)
    return torch.cat(rows)


def select_examples(examples: list[dict[str, Any]], k: int, by: str = "diversity", embeddings=None,
                    seed: int = 0, prefer_images: bool = True, category_field: str | None = None) -> list[dict]:
    """k of ``examples``: by diversity (``k_center_select`` on ``embeddings``) or at random (a control)."""
    if k >= len(examples):
        return list(examples)
    if by == "random":
        keep = sorted(random.Random(seed).sample(range(len(examples)), k))
        return [examples[i] for i in keep]
    if by != "diversity":
        raise ValueError(f"data.select.by must be diversity or random, got {by!r}")
    if embeddings is None or embeddings.shape[0] != len(examples):
        raise ValueError("diversity selection needs one embedding per example")
    chosen = k_center_select(embeddings, k, [category_of(e, category_field) for e in examples],
                             [has_real_image(e) for e in examples], prefer_images)
    return [examples[i] for i in sorted(chosen)]


_EMBEDDINGS: dict = {}


def select_for_recipe(examples: list[dict[str, Any]], config, policy, seed: int, instruction: str | None = None,
                      max_length: int | None = None) -> list[dict]:
    """`data.select` applied to a recipe's training examples, with the policy's embeddings."""
    if config.k >= len(examples):
        print(f"[data] select: k={config.k} >= {len(examples)} examples; keeping all")
        return examples
    embeddings = None
    if config.by == "diversity":
        key = (id(policy), tuple(e["id"] for e in examples))
        if key not in _EMBEDDINGS:  # stages of one run share their training examples: embed once
            _EMBEDDINGS.clear()
            _EMBEDDINGS[key] = policy_embeddings(policy, examples, config.batch_size, instruction, max_length)
        embeddings = _EMBEDDINGS[key]
    kept = select_examples(examples, config.k, config.by, embeddings, seed, config.prefer_images,
                           config.category_field)
    categories = {category_of(e, config.category_field) for e in kept}
    print(f"[data] select: kept {len(kept)} of {len(examples)} by {config.by}; "
          f"{sum(map(has_real_image, kept))} with images, {len(categories)} categories")
    return kept


def _row_image_means(features, image_index):
    """Each row's mean image feature `[B, H]`: over its images' unpadded tokens (`image_index` [B] or
    [B, K], -1 slots skipped; a row without images gets zeros)."""
    import torch

    from alignment.models.features import as_slots

    if not hasattr(features, "embeds"):
        raise ValueError("diversity pruning needs image features, and the generic family computes none ahead of "
                         f"the forward ({type(features).__name__}); prune with by=random for this model")
    embeds = features.embeds.float()
    valid = torch.arange(embeds.shape[1], device=embeds.device)[None] < features.lengths[:, None].to(embeds.device)
    per_image = (embeds * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # [N, H]
    slots = as_slots(image_index).to(embeds.device)
    taken = per_image[slots.clamp(min=0)] * (slots >= 0)[..., None]  # [B, K, H]
    return taken.sum(1) / (slots >= 0).sum(1, keepdim=True).clamp(min=1)
