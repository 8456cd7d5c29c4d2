"""Preference losses with no reference model: ORPO, SimPO and CPO.

Inputs are the policy's own log-probs of the chosen and rejected answers ``[B]`` (natural log):
``*_mean_logps`` are per-sequence means over the completion's counted tokens (so ``≤ 0``, and
``exp`` of one is a per-token probability), ``*_logps`` per-sequence sums. ORPO and CPO are
meant to be added to the chosen answers' NLL by the stage; SimPO is used alone.
"""

import math

import torch
import torch.nn.functional as F

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x ≤ 0``, accurate at both ends (Mächler 2012), ``[...]`` -> ``[...]``.

    Above ``-log 2`` it is ``log(-expm1(x))`` (``1 - e^x`` would cancel near 0), below it
    ``log1p(-e^x)``; each branch only ever sees inputs on its own side, so neither makes a ``nan``
    gradient for the elements the other one serves. ``x = 0`` (a probability of 1 to rounding)
    is taken as ``-tiny``, the smallest normal number of the dtype, so the value stays finite
    (about -87 in float32, -708 in float64) and such elements get no gradient.
    """
    tiny = torch.finfo(x.dtype).tiny
    near_zero = x > _LOG_HALF
    upper = torch.log(-torch.expm1(x.clamp(min=_LOG_HALF, max=-tiny)))
    lower = torch.log1p(-torch.exp(x.clamp(max=_LOG_HALF)))
    return torch.where(near_zero, upper, lower)


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7), ``[B]`` -> ``(losses [B], log_odds [B])``.

    With ``c``, ``r`` the mean log-probs, ``odds(p) = p / (1 - p)`` and ``p = e^c``:
    ``log_odds = log odds(e^c) - log odds(e^r) = (c - r) - (log(1 - e^c) - log(1 - e^r))`` and
    ``losses = -β log σ(log_odds)``. ``log_odds`` is returned detached, for logging. The stage
    adds the chosen answers' NLL (β is the paper's λ: the weight of this term beside the NLL).
    """
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (
        log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps)
    )
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


def simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float = 2.0, gamma: float = 0.5
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): ``-log σ(β (c - r) - γ)`` per pair, ``[B]`` -> ``[B]``.

    ``c``, ``r`` are mean (length-normalised) log-probs; ``γ`` is the target reward margin. Equals
    ``log 2`` when ``γ = 0`` and ``c = r``.
    """
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """CPO's preference term (Xu et al. 2024, eq. 3): ``-log σ(β (c - r))`` per pair, ``[B]`` -> ``[B]``.

    ``c``, ``r`` are summed log-probs: DPO with the reference dropped. The stage adds the chosen
    answers' NLL.
    """
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps))
