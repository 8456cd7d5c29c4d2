"""PPO for language models: KL-penalised rewards, GAE, clipped policy and value losses.

Shapes: ``[B, T]`` per generated token, ``mask [B, T]`` 1 on the tokens that count (the
completion), 0 on padding, which may sit on either side. Log-probs are natural log.
Token-level losses average over every counted token of the batch; each ``*_sum`` companion
returns sums and the token count, so micro-batches and ranks can be combined exactly:
``sum(loss_sum) / sum(token_count)``.
"""

import torch

from .masked import masked_sum

# |log ratio| beyond this is clamped: ratio in [e^-20, e^20], far outside any clip range, so
# the loss and gradients are unchanged in any sane regime but stay finite for absurd inputs.
_MAX_LOG_RATIO = 20.0


def _zeros_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def last_counted_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last counted token of each row, ``[B, T]`` -> ``[B]`` (int64); -1 for an empty row."""
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards ``[B, T]``: ``-kl_coef * (logprobs - ref_logprobs)`` on every counted token,
    plus ``scores [B]`` (the reward model's sequence score) on the last counted token of each row.

    The KL term is the sampled estimator log(pi/ref) of the policy's divergence from the
    reference. Zero where ``mask`` is 0; a row with no counted token gets no score.
    """
    bool_mask = mask.bool()
    rewards = torch.where(bool_mask, -kl_coef * (logprobs - ref_logprobs), _zeros_like(logprobs))
    positions = torch.arange(mask.size(-1), device=mask.device)
    is_last = (positions == last_counted_index(mask).unsqueeze(-1)) & bool_mask
    return rewards + torch.where(is_last, scores.unsqueeze(-1).to(rewards.dtype), _zeros_like(rewards))


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), without gradient.

    Each row's episode is its counted tokens in order; uncounted positions (left or right
    padding, or gaps) are skipped, so a padded row gives the same result as the row alone. The
    episode ends at the last counted token: the next value there is 0 (no bootstrap).
    ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``.

    Returns ``(advantages [B, T], returns [B, T])`` with returns = advantages + values, both 0
    where ``mask`` is 0. Inputs are detached.
    """
    rewards, values = rewards.detach(), values.detach()
    bool_mask = mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(-1))):
        counted = bool_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(counted, values[:, t], next_value)
        next_advantage = torch.where(counted, advantage, next_advantage)
        advantages[:, t] = torch.where(counted, advantage, torch.zeros_like(advantage))
    returns = torch.where(bool_mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def ppo_policy_loss_sum(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed form of ``ppo_policy_loss``: ``(loss_sum, clipped_count, approx_kl_sum, token_count)``.

    Only ``loss_sum`` carries gradient; the others are detached (the two counts are int64).
    """
    bool_mask = mask.bool()
    log_ratio = torch.where(bool_mask, logprobs - old_logprobs, _zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss_sum = masked_sum(torch.maximum(unclipped, clipped), bool_mask)
    with torch.no_grad():
        clipped_count = ((clipped > unclipped) & bool_mask).sum()
        approx_kl_sum = masked_sum((ratio - 1.0) - log_ratio, bool_mask)
        token_count = bool_mask.sum()
    return loss_sum, clipped_count, approx_kl_sum, token_count


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate policy loss, averaged over every counted token of the batch.

    Per token: ``-min(ratio A, clip(ratio, 1 - c, 1 + c) A)`` with ``ratio = exp(logprobs -
    old_logprobs)``; ``advantages`` are treated as constants.

    Returns ``(loss, clip_fraction, approx_kl)``, the last two detached: ``clip_fraction`` is the
    fraction of counted tokens where the clipped term is selected (strictly larger loss, so no
    gradient flows there); ``approx_kl`` is the mean of ``(ratio - 1) - log ratio`` (Schulman's
    unbiased, non-negative "k3" estimator of KL(old || new) on samples from the old policy).
    """
    loss_sum, clipped_count, kl_sum, count = ppo_policy_loss_sum(
        logprobs, old_logprobs, advantages, mask, clip_range
    )
    count = count.clamp(min=1)
    return loss_sum / count, clipped_count.to(loss_sum.dtype) / count, kl_sum / count


def ppo_value_loss_sum(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed form of ``ppo_value_loss``: ``(loss_sum, clipped_count, token_count)``; the counts are int64."""
    bool_mask = mask.bool()
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        clipped = unclipped
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        clipped = (values_clipped - returns) ** 2
    loss_sum = 0.5 * masked_sum(torch.maximum(unclipped, clipped), bool_mask)
    with torch.no_grad():
        clipped_count = ((clipped > unclipped) & bool_mask).sum()
        token_count = bool_mask.sum()
    return loss_sum, clipped_count, token_count


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 max((v - R)^2, (v_clip - R)^2)``, averaged over every counted token.

    ``v_clip = old_v + clamp(v - old_v, -clip_range_value, +clip_range_value)``; ``None`` turns
    clipping off. Returns ``(loss, clip_fraction)``; ``clip_fraction`` (detached) is the fraction
    of counted tokens where the clipped term is strictly larger.
    """
    loss_sum, clipped_count, count = ppo_value_loss_sum(values, old_values, returns, mask, clip_range_value)
    count = count.clamp(min=1)
    return loss_sum / count, clipped_count.to(loss_sum.dtype) / count
