"""Supervised fine-tuning loss: next-token negative log-likelihood of the labelled tokens.

Shapes: ``logits [B, T, V]``, ``labels [B, T]`` (the input ids, with ``ignore_index`` on tokens
that must not be learned: prompt, image tokens, padding). As in a causal LM, ``logits[:, t]``
predicts ``labels[:, t + 1]``: the loss pairs ``logits[:, :-1]`` with ``labels[:, 1:]``, so the
first label and the last logits never count.
"""

import torch
import torch.nn.functional as F


def sft_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (nats) of the labelled tokens and their count: ``(nll_sum [], token_count [] int64)``.

    Use it to average exactly over gradient-accumulation micro-batches and ranks: sum
    ``nll_sum`` and ``token_count`` over all of them, then divide once (see ``sft_loss``).
    Half-precision logits are upcast to float32.
    """
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    nll_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return nll_sum, (shift_labels != ignore_index).sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean NLL (nats per token) over every labelled token of the batch; 0 if none is labelled.

    Each token weighs the same whatever its row's length (not a mean of per-row means).
    """
    nll_sum, count = sft_loss_sum(logits, labels, ignore_index)
    return nll_sum / count.clamp(min=1)
