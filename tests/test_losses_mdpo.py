"""mDPO: hand-worked numbers, float64 reference, its three terms, properties and gradcheck.

TRL 1.16 has no mDPO loss, so there is nothing of TRL's to compare with. The definition is the paper's
(Wang et al. 2024: L_DPO + L_CoPO + L_AncPO, the anchor at 0) and that of the public mDPO trainer
code (an ``mDPOTrainer`` subclassing TRL's DPOTrainer, its ``dpo_loss``): ``anchor`` generalises the
paper's 0; the float64 loop reference below is written from the paper's equations.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import dpo_loss, mdpo_loss

LOGP = st.floats(-50.0, 0.0)


def _neg_log_sigmoid(x):
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _inputs(seed, b=8):
    """(policy chosen, policy rejected, ref chosen, ref rejected, policy corrupt chosen, ref corrupt chosen)."""
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(b, generator=gen, dtype=torch.float64) * 40 for _ in range(6)]


def test_hand_worked():
    """Δc = -1 - -3 = 2, Δr = -4 - -3 = -1, Δc' = -2 - -2.5 = 0.5 (the chosen answer given the corrupted
    image), β = 0.5. dpo: -log σ(0.5 (2 - -1)) = -log σ(1.5) = 0.201413; conditional:
    -log σ(0.5 (2 - 0.5)) = -log σ(0.75) = 0.386871; anchor: -log σ(0.5 · 2 - 0) = -log σ(1) = 0.313262.
    Sum 0.901546. With anchor = 0.5 the last term is -log σ(0.5) = 0.474077, the sum 1.062361.
    """
    args = [torch.tensor([v]) for v in (-1.0, -4.0, -3.0, -3.0, -2.0, -2.5)]
    losses, stats = mdpo_loss(*args, beta=0.5)
    assert_close(losses, torch.tensor([0.901546]), atol=1e-6, rtol=0)
    assert_close(stats["dpo"], torch.tensor(0.201413), atol=1e-6, rtol=0)
    assert_close(stats["conditional"], torch.tensor(0.386871), atol=1e-6, rtol=0)
    assert_close(stats["anchor"], torch.tensor(0.313262), atol=1e-6, rtol=0)
    anchored, anchored_stats = mdpo_loss(*args, beta=0.5, anchor=0.5)
    assert_close(anchored, torch.tensor([1.062361]), atol=1e-6, rtol=0)
    assert_close(anchored_stats["anchor"], torch.tensor(0.474077), atol=1e-6, rtol=0)


def test_against_float64_loop_reference():
    inputs = _inputs(0)
    for beta, anchor in [(0.1, 0.0), (0.5, 0.3), (1.0, -2.0)]:
        losses, stats = mdpo_loss(*inputs, beta=beta, anchor=anchor)
        assert losses.shape == (8,) and losses.dtype == torch.float64
        terms = {"dpo": [], "conditional": [], "anchor": []}
        for i in range(8):
            pc, pr, rc, rr, pcc, rcc = (t[i].item() for t in inputs)
            terms["dpo"].append(_neg_log_sigmoid(beta * ((pc - rc) - (pr - rr))))
            terms["conditional"].append(_neg_log_sigmoid(beta * ((pc - rc) - (pcc - rcc))))
            terms["anchor"].append(_neg_log_sigmoid(beta * (pc - rc) - anchor))
            assert_close(losses[i].item(), terms["dpo"][i] + terms["conditional"][i] + terms["anchor"][i])
        for name, values in terms.items():
            assert_close(stats[name].item(), sum(values) / 8)


def test_stats_are_detached_batch_means_that_sum_to_the_loss():
    inputs = [t.requires_grad_(True) for t in _inputs(1)]
    losses, stats = mdpo_loss(*inputs)
    assert {"dpo", "conditional", "anchor"} <= set(stats)
    assert losses.requires_grad
    for value in stats.values():
        assert value.dim() == 0 and not value.requires_grad
    assert_close(stats["dpo"] + stats["conditional"] + stats["anchor"], losses.mean().detach())


def test_terms_are_dpo_with_the_corrupted_image_as_the_loser():
    """The dpo term is DPO's sigmoid loss on (chosen, rejected); the conditional term is DPO's sigmoid loss
    on (chosen with the image, chosen with the corrupted image); the anchor -log σ(β Δc - anchor)."""
    pc, pr, rc, rr, pcc, rcc = _inputs(2)
    beta = 0.3
    losses, _ = mdpo_loss(pc, pr, rc, rr, pcc, rcc, beta=beta)
    dpo = dpo_loss(pc, pr, rc, rr, beta)[0]
    conditional = dpo_loss(pc, pcc, rc, rcc, beta)[0]
    anchor = -torch.nn.functional.logsigmoid(beta * (pc - rc))
    assert_close(losses, dpo + conditional + anchor)


@settings(max_examples=50, deadline=None)
@given(LOGP, LOGP, LOGP, st.floats(0.01, 2.0))
def test_three_log2_when_policy_equals_reference(chosen, rejected, corrupt, beta):
    c, r, cc = (torch.tensor([v], dtype=torch.float64) for v in (chosen, rejected, corrupt))
    losses, stats = mdpo_loss(c, r, c.clone(), r.clone(), cc, cc.clone(), beta)
    assert_close(losses, torch.tensor([3 * math.log(2.0)], dtype=torch.float64))
    for value in stats.values():
        assert_close(value.item(), math.log(2.0))


@settings(max_examples=50, deadline=None)
@given(LOGP, LOGP, LOGP, LOGP, LOGP, LOGP, st.floats(0.01, 1.0))
def test_gradients(pc, pr, rc, rr, pcc, rcc, beta):
    """The loss raises the chosen answer (given the true image), lowers the rejected one and lowers the
    chosen answer given the corrupted image; the rejected and corrupted gradients are those of their own
    term alone: β σ(-β h) with h that term's margin."""
    tensors = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (pc, pr, pcc)]
    chosen, rejected, corrupt = tensors
    ref_chosen, ref_rejected, ref_corrupt = (torch.tensor([v], dtype=torch.float64) for v in (rc, rr, rcc))
    losses, _ = mdpo_loss(chosen, rejected, ref_chosen, ref_rejected, corrupt, ref_corrupt, beta)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item() and corrupt.grad.item() > 0
    sigmoid = lambda x: 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))  # noqa: E731
    dc, dr, dcc = pc - rc, pr - rr, pcc - rcc
    assert_close(rejected.grad.item(), beta * sigmoid(-beta * (dc - dr)))
    assert_close(corrupt.grad.item(), beta * sigmoid(-beta * (dc - dcc)))
    expected_chosen = -beta * (sigmoid(-beta * (dc - dr)) + sigmoid(-beta * (dc - dcc)) + sigmoid(-beta * dc))
    assert_close(chosen.grad.item(), expected_chosen)


def test_image_blind_policy_gets_no_help_from_the_conditional_term():
    """A policy that ignores the image gives the same log-probs with either image: the conditional term
    is then log 2 whatever the answers (and only moves once the image makes a difference)."""
    pc, pr, rc, rr, _, _ = _inputs(3)
    _, stats = mdpo_loss(pc, pr, rc, rr, pc.clone(), rc.clone(), beta=0.7)
    assert_close(stats["conditional"].item(), math.log(2.0))


def test_finite_at_extreme_logps():
    values = [torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.tensor([-1e4, 0.0])]
    policy = [v.clone().requires_grad_(True) for v in values]
    losses, stats = mdpo_loss(
        policy[0], policy[1], torch.zeros(2), torch.zeros(2), policy[2], torch.zeros(2), 1.0
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and all(torch.isfinite(v) for v in stats.values())
    assert all(torch.isfinite(p.grad).all() for p in policy)


def test_gradcheck():
    inputs = [t.requires_grad_(True) for t in _inputs(4, b=5)]
    for beta, anchor in [(0.1, 0.0), (0.4, 0.5)]:

        def fn(*args, beta=beta, anchor=anchor):
            return mdpo_loss(*args, beta=beta, anchor=anchor)[0]

        assert torch.autograd.gradcheck(fn, tuple(inputs))
