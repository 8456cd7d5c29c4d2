"""The `loop` engine: one prefill per prompt, then a Python loop of KV-cache decode steps over the batch.

Each step samples the next token of every row (`sampling.sample_tokens`), pads the rows that have stopped,
and feeds the tokens back through the family's `decode`. The prompt's KV cache (Mllama's image
cross-attention states included) is computed once and repeated for a prompt's G samples.
"""

from __future__ import annotations

import torch

from alignment.generation.sampling import all_finished, sample_tokens
from alignment.models.features import ImageFeatures, repeat_state


class LoopEngine:
    """Generation through the family's `prefill` / `decode` (transformers' dynamic KV cache), step by step."""

    name = "loop"

    @torch.no_grad()
    def generate(self, policy, batch: dict, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 image_features: ImageFeatures | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 num_samples: int = 1) -> torch.Tensor:
        """New tokens `[B*G, L]` (L <= max_new_tokens) for the left-padded prompts of `batch` under `policy`'s
        active adapter; see `MultimodalPolicy.generate`."""
        stop_ids = torch.tensor(sorted(policy.stop_token_ids()), device=policy.device)
        pad_id = policy.processor.tokenizer.pad_token_id
        attention_mask = batch["attention_mask"]
        logits, state = policy.family.prefill(
            policy.model, batch["input_ids"], attention_mask, policy.features_of(batch, image_features),
            policy.image_index(batch), **policy.token_inputs(batch))
        if num_samples > 1:  # one prefill per prompt, then G rows each
            state = repeat_state(state, num_samples)
            logits, attention_mask = (x.repeat_interleave(num_samples, dim=0) for x in (logits, attention_mask))
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=policy.device)
        if isinstance(generator, (list, tuple)) and len(generator) != logits.shape[0]:
            raise ValueError(f"generate: {len(generator)} row generators for {logits.shape[0]} answer rows")
        new_tokens = []
        never = policy.unsampled_token_ids(logits.shape[-1])
        for _ in range(max_new_tokens):
            logits = logits.float()
            logits[:, never] = float("-inf")  # an answer never holds an image placeholder
            token = sample_tokens(logits, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            new_tokens.append(token)
            finished |= torch.isin(token, stop_ids)
            if all_finished(finished, policy.synced_generation):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            logits = policy.family.decode(policy.model, state, token, attention_mask)
        return torch.stack(new_tokens, dim=1)
