"""GRPO family: group-relative advantages and the clipped policy loss with its aggregations.

Shapes: P prompts, G samples each; B = P·G rows, row ``p·G + g`` is sample g of prompt p.
``rewards [P, G]``, ``advantages [B]`` (one per completion, shared by its tokens), per-token
tensors ``[B, T]`` with ``mask [B, T]`` 1 on the counted (completion) tokens, 0 on padding, which
may sit on either side. Log-probs are natural log.

``grpo_loss_sum`` returns ``(loss_sum, normaliser, stats_sums)``; for any split of the batch's
rows into micro-batches (and ranks), ``sum(loss_sum) / sum(normaliser)`` is ``grpo_loss`` on the
whole batch, and the stats combine the same way (sum each key, then divide).
"""

import torch

from .masked import masked_sum

GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
IMPORTANCE_SAMPLING = ("token", "sequence")

# |log ratio| beyond this is clamped (as in ppo.py): finite for absurd inputs, unchanged otherwise.
_MAX_LOG_RATIO = 20.0


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, method: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantages ``[P, G]`` of each sample relative to the other samples of its prompt, detached.

    - ``grpo``: ``(r - mean_g r) / (std_g r + eps)``, unbiased std (torch's default); with G = 1
      the std is taken as 0, so the advantage is 0.
    - ``dr_grpo``: ``r - mean_g r`` (Dr. GRPO: no std scaling); 0 with G = 1.
    - ``rloo``: ``r - mean of the other G - 1 rewards`` = ``G / (G - 1) (r - mean_g r)``; needs G >= 2.

    Flatten with ``.reshape(-1)`` to get the ``[B]`` advantages of ``grpo_loss``.
    """
    if method not in GROUP_ADVANTAGES:
        raise ValueError(f"unknown group advantage method {method!r}; expected one of {GROUP_ADVANTAGES}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    group_size = rewards.size(1)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if method == "dr_grpo":
        return centred
    if method == "rloo":
        if group_size < 2:
            raise ValueError(
                f"rloo needs at least 2 samples per prompt (a leave-one-out baseline), got G = {group_size}"
            )
        return centred * (group_size / (group_size - 1))
    std = rewards.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(rewards[:, :1])
    return centred / (std + eps)


def _check_args(clip_low, clip_high, importance_sampling, loss_agg, max_tokens, ref_logprobs, kl_beta):
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(
            f"unknown importance_sampling {importance_sampling!r}; expected one of {IMPORTANCE_SAMPLING}"
        )
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGREGATIONS}")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("kl_beta", kl_beta)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if loss_agg == "seq_mean_token_sum_norm" and (max_tokens is None or max_tokens < 1):
        raise ValueError(
            f"loss_agg 'seq_mean_token_sum_norm' needs max_tokens >= 1 (the generation cap), got {max_tokens}"
        )
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError(f"kl_beta = {kl_beta} > 0 needs ref_logprobs")


def grpo_loss_sum(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    importance_sampling: str = "token",
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Summed form of ``grpo_loss``: ``(loss_sum, normaliser, stats_sums)``.

    With ℓ the per-token loss of ``grpo_loss``:

    - ``token_mean``: (sum of ℓ over counted tokens, number of counted tokens);
    - ``seq_mean_token_mean``: (sum over rows with >= 1 counted token of the row's mean ℓ, number
      of such rows);
    - ``seq_mean_token_sum_norm``: (sum of ℓ over counted tokens, rows · ``max_tokens``), every
      row counted, fully masked ones too.

    Only ``loss_sum`` carries gradient; ``normaliser`` is an int64 scalar. ``stats_sums`` holds
    detached scalars, each summed over the counted tokens: ``clipped_count`` (int64, tokens where
    the clipped term is strictly larger), ``kl_sum`` (k3, 0 without ``ref_logprobs``),
    ``ratio_sum`` (importance ratio r) and ``token_count`` (int64); divide each sum by the summed
    ``token_count`` for ``clip_fraction``, ``kl`` and ``ratio_mean``.
    """
    _check_args(clip_low, clip_high, importance_sampling, loss_agg, max_tokens, ref_logprobs, kl_beta)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = {tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}"
        )
    bool_mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    tokens_per_row = bool_mask.sum(dim=-1)
    log_ratio = torch.where(bool_mask, logprobs - old_logprobs.detach(), zero)
    if importance_sampling == "sequence":
        row_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / tokens_per_row.clamp(min=1).unsqueeze(-1)
        log_ratio = row_log_ratio.expand_as(logprobs)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = torch.maximum(unclipped, clipped)
    if ref_logprobs is not None:
        ref_minus_lp = torch.where(bool_mask, ref_logprobs.detach() - logprobs, zero)
        ref_minus_lp = ref_minus_lp.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        kl = torch.exp(ref_minus_lp) - ref_minus_lp - 1.0
        if kl_beta != 0:
            per_token = per_token + kl_beta * kl
    else:
        kl = torch.zeros_like(per_token)

    if loss_agg == "seq_mean_token_mean":
        row_sum = masked_sum(per_token, bool_mask, dim=-1)
        loss_sum = (row_sum / tokens_per_row.clamp(min=1).to(row_sum.dtype)).sum()
        normaliser = (tokens_per_row > 0).sum()
    else:
        loss_sum = masked_sum(per_token, bool_mask)
        if loss_agg == "token_mean":
            normaliser = tokens_per_row.sum()
        else:
            normaliser = torch.tensor(logprobs.size(0) * max_tokens, device=logprobs.device)

    with torch.no_grad():
        stats_sums = {
            "clipped_count": ((clipped > unclipped) & bool_mask).sum(),
            "kl_sum": masked_sum(kl.detach(), bool_mask),
            "ratio_sum": masked_sum(ratio.detach(), bool_mask),
            "token_count": tokens_per_row.sum(),
        }
    return loss_sum, normaliser, stats_sums


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    importance_sampling: str = "token",
    loss_agg: str = "token_mean",
    max_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO policy loss with an optional k3 KL penalty; returns ``(loss, stats)``.

    Per counted token, with ``A`` the row's advantage (a constant):
    ``ℓ = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_beta k3``,
    ``k3 = exp(ref - logprobs) - (ref - logprobs) - 1`` (Schulman's non-negative estimator of
    KL(policy || ref) on samples from the policy; gradient flows through ``logprobs``).

    ``importance_sampling``: ``token`` ``r = exp(logprobs - old_logprobs)`` per token;
    ``sequence`` (GSPO, Zheng et al. 2025) ``r = exp(mean over the row's counted tokens of
    (logprobs - old_logprobs))``, shared by the row's tokens, gradient through the mean. This is
    TRL 1.16's ``importance_sampling_level="sequence"`` (not GSPO-token's detached variant). The
    exponentiated log-ratio and ``ref - logprobs`` are clamped to ±20.

    ``loss_agg``: ``token_mean`` (DAPO: over all counted tokens of the batch),
    ``seq_mean_token_mean`` (GRPO paper: mean over rows with a counted token of each row's token
    mean), ``seq_mean_token_sum_norm`` (Dr. GRPO: token sum / (B · ``max_tokens``)).

    ``stats`` (detached scalars): ``clip_fraction`` (fraction of counted tokens where the clipped
    term is strictly larger, so no policy gradient flows; a clipped sequence counts all its
    tokens), ``kl`` (mean k3 over counted tokens; 0 without ``ref_logprobs``), ``ratio_mean``
    (mean r over counted tokens). An all-masked batch gives loss 0 and zero stats, not ``nan``.
    """
    loss_sum, normaliser, sums = grpo_loss_sum(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low,
        clip_high,
        importance_sampling,
        loss_agg,
        max_tokens,
        ref_logprobs,
        kl_beta,
    )
    count = sums["token_count"].clamp(min=1).to(loss_sum.dtype)
    stats = {
        "clip_fraction": sums["clipped_count"].to(loss_sum.dtype) / count,
        "kl": sums["kl_sum"] / count,
        "ratio_mean": sums["ratio_sum"] / count,
    }
    return loss_sum / normaliser.clamp(min=1).to(loss_sum.dtype), stats
