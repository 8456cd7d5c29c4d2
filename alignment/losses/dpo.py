"""Direct Preference Optimization losses (Rafailov et al. 2023) and the IPO / hinge / APO variants.

All log-probs are per-sequence sums ``[B]`` (natural log) of the completion tokens, e.g.
``sequence_logprobs(...)[1]``. With the log-ratios ``Δc = log pi(y_c) - log ref(y_c)`` and
``Δr = log pi(y_r) - log ref(y_r)`` ``[B]``, sigmoid, IPO and hinge are functions of the margin

    h = Δc - Δr                                                            [B]

alone; APO's two forms (anchored preference optimisation) also look at Δc and Δr on their own.
Each variant is a separate function; ``DPO_LOSS_TYPES`` maps a ``loss_type`` to it, in the one
signature ``(chosen_logratios, rejected_logratios, beta, label_smoothing) -> losses [B]``.
"""

import functools

import torch
import torch.nn.functional as F


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to the 'sigmoid' loss only, not {name!r}")


def dpo_sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` per pair, ``[B]`` -> ``[B]``.

    ``logits`` is h; ``eps = label_smoothing`` is the assumed probability that a preference label
    is flipped (conservative DPO). Equals ``log 2`` when h = 0.
    """
    scaled = beta * logits
    return -(1.0 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))**2`` per pair, ``[B]`` -> ``[B]``.

    h is used as given. TRL divides each sequence's log-ratio by its completion length before
    this; pass per-token-averaged log-probs to ``dpo_loss`` to get that form.
    """
    _no_smoothing("ipo", label_smoothing)
    return (logits - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC-style hinge: ``max(0, 1 - beta h)`` per pair, ``[B]`` -> ``[B]``."""
    _no_smoothing("hinge", label_smoothing)
    return torch.relu(1.0 - beta * logits)


def apo_zero_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): ``(1 - σ(β Δc)) + σ(β Δr)`` per pair, ``[B]`` -> ``[B]``.

    Raises the chosen answers' likelihood and lowers the rejected ones', each against the
    reference (anchored at 0) rather than only their difference: for data whose chosen answers are
    better than what the model says now. Equals 1 when Δc = Δr = 0; lies in (0, 2).
    """
    _no_smoothing("apo_zero", label_smoothing)
    return torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): ``σ(β Δc) + (1 - σ(β (Δc - Δr)))``, ``[B]`` -> ``[B]``.

    Lowers the chosen answers' likelihood and the rejected ones' more: for data whose chosen
    answers are worse than what the model says now. Equals 1 when Δc = Δr = 0; lies in (0, 2).
    """
    _no_smoothing("apo_down", label_smoothing)
    margin = chosen_logratios - rejected_logratios
    return torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(-beta * margin)


def _of_margin(loss_of_margin):
    """``loss_of_margin(h, beta, eps)`` as a loss of ``(Δc, Δr, beta, eps)``, for the table;
    ``__wrapped__`` is the original."""

    @functools.wraps(loss_of_margin)
    def loss(chosen_logratios, rejected_logratios, beta, label_smoothing=0.0):
        return loss_of_margin(chosen_logratios - rejected_logratios, beta, label_smoothing)

    return loss


DPO_LOSS_TYPES = {
    "sigmoid": _of_margin(dpo_sigmoid_loss),
    "ipo": _of_margin(ipo_loss),
    "hinge": _of_margin(hinge_loss),
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and implicit rewards.

    Args:
        policy_*_logps, ref_*_logps: ``[B]`` summed completion log-probs under the policy and the
            frozen reference.
        beta: strength of the implicit KL penalty to the reference.
        loss_type: a key of ``DPO_LOSS_TYPES`` (``sigmoid``, ``ipo``, ``hinge``, ``apo_zero``,
            ``apo_down``).
        label_smoothing: eps of conservative DPO (``sigmoid`` only).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are
        ``beta * (log pi - log ref)`` per sequence, detached. Average ``losses`` for the step.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; valid: {sorted(DPO_LOSS_TYPES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSS_TYPES[loss_type](chosen_logratios, rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def rpo_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (Pang et al. 2024): each chosen answer's mean per-token NLL, ``[B]`` -> ``[B]``.

    ``chosen_logps`` are per-sequence log-prob sums, ``chosen_lengths`` the number of completion
    tokens in each (>= 1). Added as ``rpo_alpha * rpo_nll`` to the DPO loss, it keeps the chosen
    answers likely while the margin grows (DPO alone can lower both).
    """
    return -chosen_logps / chosen_lengths.clamp(min=1)
