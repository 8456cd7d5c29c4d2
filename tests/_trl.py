"""Run TRL's own loss code on chosen numbers, without building a trainer (TRL 1.16).

Each function calls a TRL trainer method unbound, with a SimpleNamespace ``self`` carrying the
attributes that method reads, so TRL's own loss code runs on our inputs:

- ``trl_dpo_loss``: ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` (trl/trainer/
  dpo_trainer.py), which computes the loss right after a (fused) model forward: a stand-in model
  returns the per-token log-probs we choose, and the reference log-probs come precomputed;
- ``trl_kto_loss``: ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py), the same way, with
  ``_compute_kl_logps`` (the forward over the mismatched KL pairs) returning the log-probs we choose;
- ``trl_odds_ratio_loss``: ``ORPOTrainer.odds_ratio_loss`` (trl/experimental/orpo/orpo_trainer.py);
- ``trl_cpo_loss``: ``CPOTrainer.cpo_loss`` (trl/experimental/cpo/cpo_trainer.py).
"""

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch


def trl_dpo_loss(
    pc,
    pr,
    rc,
    rr,
    beta,
    loss_types,
    label_smoothing=0.0,
    chosen_len=None,
    rejected_len=None,
    loss_weights=None,
):
    """TRL's mean DPO loss (and its logged mean chosen reward) for given sequence log-probs; with several
    ``loss_types``, TRL's weighted sum of their batch means (``loss_weights``, default all 1)."""
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
    fake_self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_identity_accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(),
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


def _identity_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _experimental(module: str):
    """Import a ``trl.experimental`` module without its "unstable API" warning (or skip without TRL)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        return pytest.importorskip(module, reason="trl is in the dev extra; install it to compare with TRL")


def trl_kto_loss(policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps, beta, w_d=1.0, w_u=1.0):
    """TRL's mean KTO loss (``loss_type="kto"``) and its logged metrics, for given sequence log-probs.

    ``kl_policy_logps`` / ``kl_ref_logps`` ``[B]`` are the log-probs of the mismatched (prompt,
    answer) pairs TRL builds for its KL estimate; TRL's estimate is ``mean(policy - ref)``, clamped at 0.
    """
    trl_kto = pytest.importorskip(
        "trl.trainer.kto_trainer", reason="trl is in the dev extra; install it to compare with TRL's KTO loss"
    )
    b, t = policy_logps.numel(), 2
    log_probs = torch.zeros(b, t - 1, dtype=policy_logps.dtype)
    log_probs[:, 0] = policy_logps  # TRL sums them over the sequence: the sum is our value
    outputs = SimpleNamespace(
        log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs)
    )
    fake_self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_identity_accelerator(), aux_loss_enabled=False,
        _compute_kl_logps=lambda model, batch: kl_policy_logps, precompute_ref_logps=True, calculate_KL=True,
        loss_type="kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(b, t, dtype=torch.long),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "completion_mask": torch.ones(b, t, dtype=torch.long),
        "label": desirable,
        "ref_logps": ref_logps,
        "ref_KL_logps": kl_ref_logps,
    }
    loss = trl_kto.KTOTrainer._compute_loss(fake_self, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, fake_self._metrics["train"]


def trl_odds_ratio_loss(chosen_mean_logps, rejected_mean_logps, beta):
    """TRL's ``(losses, chosen_rewards, rejected_rewards, mean log σ(log_odds), mean log_odds)``;
    TRL's ``losses`` is ``β log σ(log_odds)``, which its trainer subtracts from the NLL."""
    orpo = _experimental("trl.experimental.orpo.orpo_trainer")
    fake_self = SimpleNamespace(beta=beta, accelerator=_identity_accelerator())
    return orpo.ORPOTrainer.odds_ratio_loss(fake_self, chosen_mean_logps, rejected_mean_logps)


def trl_log1mexp(x):
    return _experimental("trl.experimental.orpo.orpo_trainer").log1mexp(x)


def trl_cpo_loss(chosen_logps, rejected_logps, beta, loss_type="sigmoid", simpo_gamma=0.5):
    """TRL's per-pair ``CPOTrainer.cpo_loss`` (``alpha = 0``, no label smoothing): ``loss_type="sigmoid"``
    is CPO, ``"simpo"`` SimPO (TRL feeds it mean log-probs)."""
    cpo = _experimental("trl.experimental.cpo.cpo_trainer")
    fake_self = SimpleNamespace(
        alpha=0.0, beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma, label_smoothing=0.0,
        accelerator=_identity_accelerator(),
    )  # fmt: skip
    return cpo.CPOTrainer.cpo_loss(fake_self, chosen_logps, rejected_logps)[0]
