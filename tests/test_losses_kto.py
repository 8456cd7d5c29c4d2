"""KTO on unpaired rows: hand-worked numbers, float64 reference, properties, gradcheck, and TRL."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import kto_loss
from tests._trl import trl_kto_loss

RATIO = st.floats(-40.0, 40.0)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _inputs(seed, b=8):
    """Policy and reference log-probs [B] in [-40, 0], and a mix of thumbs up and down."""
    gen = torch.Generator().manual_seed(seed)
    policy, ref = (-torch.rand(b, generator=gen, dtype=torch.float64) * 40 for _ in range(2))
    desirable = torch.rand(b, generator=gen) < 0.5
    desirable[:2] = torch.tensor([True, False])  # both kinds present
    return policy, ref, desirable


def test_hand_worked():
    """Row 0 thumbs up with Δ = -1 - -3 = 2, row 1 thumbs down with Δ = -4 - -3 = -1; kl = 0.5, β = 0.5,
    w_d = 1, w_u = 2. Row 0: 1 - σ(0.5 (2 - 0.5)) = 1 - σ(0.75) = 0.320821. Row 1:
    2 (1 - σ(0.5 (0.5 - -1))) = 2 (1 - σ(0.75)) = 0.641643. Rewards 0.5 Δ = [1, -0.5].
    A negative estimate counts as 0 (z = max(kl, 0)): with kl = -3, row 0 is 1 - σ(1) = 0.268941 and
    row 1 is 2 (1 - σ(0.5)) = 0.755081.
    """
    policy, ref, desirable = (
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -3.0]),
        torch.tensor([True, False]),
    )
    losses, rewards = kto_loss(policy, ref, desirable, kl=0.5, beta=0.5, undesirable_weight=2.0)
    assert_close(losses, torch.tensor([0.320821, 0.641643]), atol=1e-6, rtol=0)
    assert_close(rewards, torch.tensor([1.0, -0.5]))
    clamped, _ = kto_loss(policy, ref, desirable, kl=torch.tensor(-3.0), beta=0.5, undesirable_weight=2.0)
    assert_close(clamped, torch.tensor([0.268941, 0.755081]), atol=1e-6, rtol=0)


def test_against_float64_loop_reference():
    policy, ref, desirable = _inputs(0)
    for beta, kl, w_d, w_u in [
        (0.1, 0.0, 1.0, 1.0),
        (0.1, 2.5, 1.0, 1.33),
        (0.5, -1.0, 0.7, 1.0),
        (2.0, 0.3, 1.0, 3.0),
    ]:
        losses, rewards = kto_loss(policy, ref, desirable, kl, beta, w_d, w_u)
        assert losses.shape == rewards.shape == (8,) and losses.dtype == torch.float64
        z = max(kl, 0.0)
        for i in range(8):
            delta = policy[i].item() - ref[i].item()
            if desirable[i]:
                expected = w_d * (1 - _sigmoid(beta * (delta - z)))
            else:
                expected = w_u * (1 - _sigmoid(beta * (z - delta)))
            assert_close(losses[i].item(), expected)
            assert_close(rewards[i].item(), beta * delta)


def test_kl_and_rewards_carry_no_gradient():
    """z = max(kl, 0) is a reference point, not a target: no gradient reaches the KL estimate, and the
    rewards are detached."""
    policy, ref, desirable = _inputs(1)
    policy.requires_grad_(True)
    kl = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    losses, rewards = kto_loss(policy, ref, desirable, kl)
    assert losses.requires_grad and not rewards.requires_grad
    losses.sum().backward()
    assert kl.grad is None and policy.grad is not None


def test_desirable_must_be_bool():
    one = torch.zeros(2)
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(one, one, torch.tensor([1, 0]), kl=0.0)


@settings(max_examples=50, deadline=None)
@given(st.floats(-50.0, 0.0), st.floats(0.01, 2.0), st.floats(0.1, 3.0), st.booleans())
def test_half_the_weight_when_policy_equals_reference_and_kl_is_zero(logp, beta, weight, thumbs_up):
    """Δ = z = 0: each row costs w (1 - σ(0)) = w / 2."""
    x = torch.tensor([logp], dtype=torch.float64)
    losses, rewards = kto_loss(x, x.clone(), torch.tensor([thumbs_up]), 0.0, beta, weight, weight)
    assert_close(losses, torch.tensor([weight / 2], dtype=torch.float64))
    assert rewards.item() == 0.0


@settings(max_examples=50, deadline=None)
@given(RATIO, st.floats(-5.0, 20.0), st.floats(0.01, 2.0))
def test_gradient_raises_thumbs_up_and_lowers_thumbs_down(delta, kl, beta):
    """d loss / dΔ = -β σ'(β (Δ - z)) for a thumbs up and +β σ'(β (z - Δ)) for a thumbs down."""
    policy = torch.tensor([delta, delta], dtype=torch.float64, requires_grad=True)
    losses, _ = kto_loss(policy, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]), kl, beta)
    losses.sum().backward()
    z = max(kl, 0.0)
    slope = beta * _sigmoid(beta * (delta - z)) * (1 - _sigmoid(beta * (delta - z)))
    assert policy.grad[0].item() <= 0 <= policy.grad[1].item()
    assert_close(policy.grad.tolist(), [-slope, slope])


def test_finite_at_extreme_log_ratios():
    policy = torch.tensor([0.0, -1e4, 0.0, -1e4], requires_grad=True)
    ref = torch.tensor([-1e4, 0.0, -1e4, 0.0])
    losses, rewards = kto_loss(policy, ref, torch.tensor([True, True, False, False]), kl=1e4, beta=1.0)
    losses.sum().backward()
    assert (
        torch.isfinite(losses).all() and torch.isfinite(rewards).all() and torch.isfinite(policy.grad).all()
    )


def test_gradcheck():
    policy, ref, desirable = _inputs(2, b=6)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    for beta, kl, w_u in [(0.1, 0.0, 1.0), (0.5, 1.5, 1.3)]:

        def fn(p, r, beta=beta, kl=kl, w_u=w_u):
            return kto_loss(p, r, desirable, kl, beta, 1.0, w_u)[0]

        assert torch.autograd.gradcheck(fn, (policy, ref))


@pytest.mark.parametrize("kl_shift", [3.0, -3.0])
def test_matches_trl_kto(kl_shift):
    """TRL 1.16 KTOTrainer._compute_loss with loss_type='kto' (KTO paper eq. 7), run on our numbers.

    The definitions agree: TRL's KL estimate is the mean of policy - reference log-probs over the
    batch's mismatched (prompt, answer) pairs, detached and clamped at 0, the same z the stage passes
    to ours as ``kl``; its loss is the mean of [w_d · desirable rows, w_u · undesirable rows], a
    reordering of our per-row losses, so the means agree; its logged rewards are β Δ. ``kl_shift``
    makes the estimate positive (3) or negative (-3, clamped to 0 by both).

    Where TRL differs, outside this function: it gathers the KL estimate across processes (the stage's
    job here) and, in ``apo_zero_unpaired``, drops z (not a KTO loss).
    """
    policy, ref, desirable = _inputs(3)
    gen = torch.Generator().manual_seed(4)
    kl_ref = -torch.rand(8, generator=gen, dtype=torch.float64) * 40
    kl_policy = kl_ref + kl_shift + torch.randn(8, generator=gen, dtype=torch.float64)
    kl = (kl_policy - kl_ref).mean()
    for beta, w_d, w_u in [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33)]:
        ours, rewards = kto_loss(policy, ref, desirable, kl, beta, w_d, w_u)
        trl_loss, metrics = trl_kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta, w_d, w_u)
        assert_close(ours.mean(), trl_loss)
        assert_close(max(kl.item(), 0.0), metrics["kl"][-1])
        assert_close(rewards[desirable].mean().item(), metrics["rewards/chosen"][-1])
        assert_close(rewards[~desirable].mean().item(), metrics["rewards/rejected"][-1])
