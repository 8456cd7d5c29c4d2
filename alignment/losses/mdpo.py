"""mDPO (Wang et al. 2024): DPO for vision-language models, conditioned on the image.

Plain DPO on a VLM can raise the chosen answer without looking at the image (the answer alone
predicts the preference). mDPO adds two terms to DPO's:

- conditional: the chosen answer must gain more (against the reference) with the true image than
  with a corrupted one (``Δc > Δc'``), so the image has to matter;
- anchor: the chosen answer's own reward ``β Δc`` must stay above ``anchor`` (0 in the paper), so
  the chosen likelihood does not fall while the margins grow.

All log-probs are per-sequence sums of completion log-probs ``[B]`` (natural log); Δ = policy -
reference of the same sequence, Δc' the chosen answer's given the corrupted image.
"""

import torch
import torch.nn.functional as F

from .dpo import dpo_sigmoid_loss


def mdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    policy_corrupt_chosen_logps: torch.Tensor,
    ref_corrupt_chosen_logps: torch.Tensor,
    beta: float = 0.1,
    anchor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair mDPO loss ``[B]`` and the batch means of its three terms.

    ``losses = -log σ(β (Δc - Δr)) - log σ(β (Δc - Δc')) - log σ(β Δc - anchor)``; equals
    ``3 log 2`` when the policy equals the reference (and ``anchor = 0``).

    Returns:
        ``(losses [B], stats)``; ``stats`` holds detached 0-d tensors: ``dpo``, ``conditional``
        and ``anchor`` (each term's mean over the batch; they sum to ``losses.mean()``).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    corrupt_chosen_logratios = policy_corrupt_chosen_logps - ref_corrupt_chosen_logps
    terms = {
        "dpo": dpo_sigmoid_loss(chosen_logratios - rejected_logratios, beta),
        "conditional": dpo_sigmoid_loss(chosen_logratios - corrupt_chosen_logratios, beta),
        "anchor": -F.logsigmoid(beta * chosen_logratios - anchor),
    }
    losses = terms["dpo"] + terms["conditional"] + terms["anchor"]
    return losses, {name: term.detach().mean() for name, term in terms.items()}
