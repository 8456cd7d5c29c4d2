"""Sampling the next token, and when a batch's generation stops: small functions of tensors, no model."""

from __future__ import annotations

import torch


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else nucleus sampling. `generator`: one
    torch.Generator (or None) for the batch, or a list of B, one per row (inverse-CDF sampling with one
    uniform draw per row from the row's own generator)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64) for g in generator])
    cdf = probs.double().cumsum(-1)
    targets = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def all_finished(finished: torch.Tensor, synced: bool) -> bool:
    """Whether generation stops: every row here has stopped (`finished [B]` bool), and with `synced` every
    row of every process. Under ZeRO-3 each forward gathers parameters with all processes, so a process whose
    rows stopped keeps stepping (emitting pad) until all have (transformers' `synced_gpus`)."""
    done = bool(finished.all())
    if not synced:
        return done
    import torch.distributed as dist

    flag = torch.tensor([0.0 if done else 1.0], device=finished.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)  # processes not yet done
    return flag.item() == 0
