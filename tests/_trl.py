"""Run TRL's own loss code on chosen numbers, without building a trainer (TRL 1.16).

TRL computes the DPO loss inside ``DPOTrainer._compute_loss(model, inputs, return_outputs)``,
right after a (fused) model forward. ``trl_dpo_loss`` calls that method unbound, with a
SimpleNamespace ``self`` carrying the attributes it reads, a stand-in model whose output holds the
per-token log-probs we choose, and precomputed reference log-probs, so TRL's own loss code runs.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch


def trl_dpo_loss(pc, pr, rc, rr, beta, loss_types, label_smoothing=0.0, chosen_len=None, rejected_len=None):
    """TRL's mean DPO loss (and its logged mean chosen reward) for given sequence log-probs."""
    trl_dpo = pytest.importorskip(
        "trl.trainer.dpo_trainer", reason="trl is in the dev extra; install it to compare with TRL's DPO loss"
    )
    b = pc.numel()
    lengths = torch.cat(
        [
            chosen_len if chosen_len is not None else torch.ones(b),
            rejected_len if rejected_len is not None else torch.ones(b),
        ]
    )
    t = int(lengths.max()) + 1
    completion_mask = (torch.arange(t) < lengths.unsqueeze(1)).long()  # TRL's IPO divides by these sums
    log_probs = torch.zeros(2 * b, t - 1, dtype=pc.dtype)
    log_probs[:, 0] = torch.cat([pc, pr])  # TRL sums them over the sequence: the sum is our value
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )
    identity = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake_self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=[1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(fake_self, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, fake_self._metrics["train"]["rewards/chosen"][-1]
