"""KTO (Kahneman-Tversky optimisation, Ethayarajh et al. 2024) on unpaired rows.

Each row is one answer with a thumbs-up (``desirable``) or thumbs-down label, not a pair. The
policy's reward for it is ``β Δ`` with Δ = log pi(y|x) - log ref(y|x), a per-sequence sum of
completion log-probs (natural log), and the reference point is ``z = max(kl, 0)``: an estimate
of KL(pi || ref) that the stage computes from mismatched prompt/answer pairs within the batch
(the mean of their policy - reference log-ratios), passed in as a float or a 0-d tensor.
"""

import torch


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: float | torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO loss (eq. 7 of the paper) and rewards.

    Args:
        policy_logps, ref_logps: ``[B]`` summed completion log-probs under the policy and the
            frozen reference.
        desirable: ``[B]`` bool, True for a thumbs-up row.
        kl: the batch's KL estimate; ``z = max(kl, 0)`` is detached (no gradient flows into it,
            as in the paper, where it only sets the reference point).
        beta: reward scale.
        desirable_weight, undesirable_weight: ``w_d`` and ``w_u``, to balance unequal counts of
            the two kinds (the paper keeps ``w_d n_d / (w_u n_u)`` in [1, 4/3]).

    Returns:
        ``(losses [B], rewards [B])``: a desirable row costs ``w_d (1 - σ(β (Δ - z)))``, an
        undesirable one ``w_u (1 - σ(β (z - Δ)))``; ``rewards = β Δ``, detached. Each loss lies
        in (0, w); average them for the step.
    """
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor (True = thumbs up), got dtype {desirable.dtype}")
    logratios = policy_logps - ref_logps
    z = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z))  # 1 - σ(x) = σ(-x)
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z - logratios))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()
