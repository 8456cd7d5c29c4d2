"""BCO's pairwise loss (binary classifier optimisation, Jung et al. 2024), the form MPO mixes with DPO.

Each answer is classified on its own: the chosen one's reward ``β Δc`` should sit above a
shift ``δ``, the rejected one's ``β Δr`` below it, where Δ = log pi - log ref is a per-sequence
log-ratio ``[B]`` (sums of completion log-probs, natural log). ``δ`` is the running mean of the
rewards of the chosen and rejected rows of the batches seen so far; the stage keeps it (it is
state, not part of the loss) and passes it in as a float.
"""

import torch
import torch.nn.functional as F


def bco_pair_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float = 0.1, delta: float = 0.0
) -> torch.Tensor:
    """``-log σ(β Δc - δ) - log σ(-(β Δr - δ))`` per pair, ``[B]`` -> ``[B]``.

    Equals ``2 log 2`` when both rewards equal δ. Unlike DPO's margin, the two terms pull each
    answer towards its own side of δ, so the loss does not stay flat when both log-ratios move
    together.
    """
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
