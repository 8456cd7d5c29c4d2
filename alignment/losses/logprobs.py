"""Token log-probabilities and entropies from logits (natural log, nats).

Shapes: ``logits [B, T, V]``, ``labels``/``mask`` ``[B, T]``. A causal LM's logits at position t
predict the token at position t + 1, so sequence log-probs pair ``logits[:, :-1]`` with
``labels[:, 1:]`` and return ``T - 1`` positions.
"""

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., tokens]`` without a shift: ``logits [..., V]``, ``tokens [...]`` -> ``[...]``.

    Memory-friendly: gathers the chosen logit and subtracts ``logsumexp`` instead of building a
    full ``[..., V]`` log-softmax. Half-precision logits are upcast to float32 one row of the
    leading dimension at a time (so the float32 copy is one row's size); the result is float32.
    ``tokens`` must be valid vocabulary ids (replace ignore indices before calling).
    """
    tokens = tokens.long()
    if logits.dtype in _LOW_PRECISION:
        rows = [gather_logprobs(row.float(), tok) for row, tok in zip(logits, tokens)]
        return torch.stack(rows)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def logprobs_at(logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits[rows[n], positions[n]])[tokens[n]]`` for N picks: ``logits [B, W, V]``, the
    three index tensors ``[N]`` -> ``[N]`` float32. One position may be picked for several tokens (a packed
    preference row's last prompt position predicts both answers' first tokens); ``logsumexp`` runs once per
    position, half-precision rows upcast one at a time, and no ``[N, V]`` copy of the logits is made."""
    if logits.dtype in _LOW_PRECISION:
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    else:
        lse = torch.logsumexp(logits, dim=-1)
    return logits[rows, positions, tokens.long()].float() - lse[rows, positions]


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token and per-sequence log-probs of ``labels`` under a causal LM's ``logits``.

    Args:
        logits: ``[B, T, V]``; ``logits[:, t]`` is the distribution of token ``t + 1``.
        labels: ``[B, T]`` token ids (the input ids). Values where ``mask`` is 0 are never
            looked up, so they may be ``-100`` or any pad id.
        mask: ``[B, T]``, 1 on the *label* positions that count (e.g. completion tokens).
            It is shifted with the labels: ``mask[:, 1:]`` selects the predictions used, so
            ``mask[:, 0]`` is ignored (nothing predicts the first token).

    Returns:
        ``token_logprobs [B, T - 1]``: ``log p(labels[:, t + 1] | logits[:, t])`` where
        ``mask[:, t + 1]`` is 1, else 0; and ``seq_logprobs [B]``: its sum per row.
    """
    shift_labels = labels[:, 1:]
    shift_mask = mask[:, 1:].bool()
    safe_labels = torch.where(shift_mask, shift_labels, torch.zeros_like(shift_labels))
    token_logprobs = gather_logprobs(logits[:, :-1], safe_labels)
    token_logprobs = torch.where(shift_mask, token_logprobs, torch.zeros_like(token_logprobs))
    return token_logprobs, token_logprobs.sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` (nats) of ``softmax(logits)`` over the last dim: ``[B, T, V]`` -> ``[B, T]``.

    Computed as ``logsumexp(l) - sum_v p_v l_v``; half-precision logits are upcast to float32.
    """
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
