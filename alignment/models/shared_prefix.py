"""Preference pairs as one row each: the shared image + prompt prefix once, then both completions.

A preference batch holds P pairs as 2P right-padded rows (chosen 0..P-1, rejected P..2P-1) that
repeat the same image and prompt: 576 image tokens of a ~610-token LLaVA-336 row, hundreds for
Qwen-VL. `share_prefix` lays each pair out as one row `[prefix | chosen tail | rejected tail]`,
with a block attention mask (the rejected tail sees the prefix and itself, never the chosen tail)
and each token keeping its own row's position, so every token's hidden state equals the one it has
in its own row, and the prefix goes through the language model once per pair instead of twice.

Shapes: P pairs, T the batch's padded length, S the packed length (<= 2T), positions in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_KINDS = ("sdpa", "eager")  # implementations that take an arbitrary [B, 1, S, S] mask


@dataclass
class SharedPrefixRows:
    """P packed rows and the maps between them and the 2P rows they hold.

    - `input_ids [P, S]`: prefix, chosen tail, rejected tail, then padding (the pad is the row's first token).
    - `source_row`, `source_pos` `[P, S]` int64: the original row and position each packed token comes from
      (padding points at its pair's first token), to carry positions and token-aligned inputs over.
    - `allowed [P, S, S]` bool: query q may attend key k (causal inside prefix + own tail; padding sees itself).
    - `packed_pos [2P, T]` int64: where original row r's token t sits in its pair's packed row (0 on padding).
    - `prefix_lengths [P]`: tokens shared by the pair's two rows (the longest common prefix of real tokens).
    """

    input_ids: torch.Tensor
    source_row: torch.Tensor
    source_pos: torch.Tensor
    allowed: torch.Tensor
    packed_pos: torch.Tensor
    prefix_lengths: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0]

    def pair_of_row(self) -> torch.Tensor:
        """`[2P]`: the packed row holding each original row."""
        return torch.arange(2 * self.num_pairs, device=self.input_ids.device) % self.num_pairs

    def gather(self, tensor: torch.Tensor, row_dim: int = 0) -> torch.Tensor:
        """A token-aligned tensor of the original rows (`[..., 2P, T, ...]`, rows at `row_dim`, positions next)
        laid out like the packed rows: `[..., P, S, ...]` (positions `[3, 2P, T]` at `row_dim=1`)."""
        front = tensor.movedim((row_dim, row_dim + 1), (0, 1))
        return front[self.source_row, self.source_pos].movedim((0, 1), (row_dim, row_dim + 1))


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row's real tokens are a prefix of the row (what `collate_preference` writes)."""
    mask = attention_mask.long()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def share_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_pairs: int) -> SharedPrefixRows:
    """Pack 2P right-padded rows (`input_ids`, `attention_mask` `[2P, T]`; chosen rows first) into P rows.

    A pair's prefix is the longest common prefix of its two rows' real tokens: the image and prompt,
    and any opening the two completions share. Raises ValueError on left-padded rows."""
    if not is_right_padded(attention_mask):
        raise ValueError("share_prefix needs right-padded rows (real tokens first)")
    pairs, device = num_pairs, input_ids.device
    lengths = attention_mask.long().sum(-1).tolist()
    rows, packed_pos, prefix_lengths, spans = [], torch.zeros_like(input_ids, dtype=torch.long), [], []
    for i in range(pairs):
        chosen, rejected = i, pairs + i
        n_c, n_r = lengths[chosen], lengths[rejected]
        same = (input_ids[chosen, : min(n_c, n_r)] == input_ids[rejected, : min(n_c, n_r)]).long()
        shared = int(same.cumprod(0).sum())
        # the packed row: prefix + chosen tail from the chosen row, then the rejected tail
        source = [(chosen, t) for t in range(n_c)] + [(rejected, t) for t in range(shared, n_r)]
        rows.append(source)
        packed_pos[chosen, :n_c] = torch.arange(n_c, device=device)
        packed_pos[rejected, :shared] = torch.arange(shared, device=device)
        packed_pos[rejected, shared:n_r] = torch.arange(n_c, n_c + n_r - shared, device=device)
        prefix_lengths.append(shared)
        spans.append((shared, n_c, n_c + n_r - shared))
    width = max(len(r) for r in rows)
    source_row = torch.zeros(pairs, width, dtype=torch.long, device=device)
    source_pos = torch.zeros(pairs, width, dtype=torch.long, device=device)
    segment = torch.full((pairs, width), -1, dtype=torch.long, device=device)  # 0 prefix, 1 chosen, 2 rejected
    for i, source in enumerate(rows):
        source_row[i] = i
        source_row[i, : len(source)] = torch.tensor([r for r, _ in source], device=device)
        source_pos[i, : len(source)] = torch.tensor([t for _, t in source], device=device)
        shared, chosen_end, end = spans[i]
        segment[i, :shared] = 0
        segment[i, shared:chosen_end] = 1
        segment[i, chosen_end:end] = 2
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # a padding query sees itself (no empty softmax)
    return SharedPrefixRows(
        input_ids=input_ids[source_row, source_pos],
        source_row=source_row,
        source_pos=source_pos,
        allowed=allowed,
        packed_pos=packed_pos,
        prefix_lengths=torch.tensor(prefix_lengths, dtype=torch.long, device=device),
    )


def attention_mask_for(allowed: torch.Tensor, attention_kind: str, dtype: torch.dtype) -> torch.Tensor:
    """`allowed [P, S, S]` as the `[P, 1, S, S]` mask transformers takes as-is: boolean for SDPA (True
    attends), additive (0 / dtype's minimum) for eager attention."""
    if attention_kind not in ATTENTION_KINDS:
        raise ValueError(f"shared-prefix rows need one of {ATTENTION_KINDS} attention, not {attention_kind!r}")
    mask = allowed[:, None]
    if attention_kind == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def saved_fraction(packed: SharedPrefixRows, attention_mask: torch.Tensor) -> float:
    """The share of the original rows' real tokens (`attention_mask [2P, T]`) the packed rows skip: the
    second copy of each pair's prefix."""
    real = float(attention_mask.sum())
    return float(packed.prefix_lengths.sum()) / real if real else 0.0
