"""DPO losses (sigmoid, IPO, hinge, APO-zero, APO-down): hand-worked numbers, loop reference, properties,
gradcheck, and agreement with TRL."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import (
    DPO_LOSS_TYPES,
    apo_down_loss,
    apo_zero_loss,
    dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    rpo_nll,
)
from tests._trl import trl_dpo_loss

LOGP = st.floats(-50.0, 0.0)
MARGIN_LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # functions of h = Δc - Δr alone


def _neg_log_sigmoid(x):
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _ref_loss(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type == "apo_zero":
        return (1 - _sigmoid(beta * (pc - rc))) + _sigmoid(beta * (pr - rr))
    if loss_type == "apo_down":
        return _sigmoid(beta * (pc - rc)) + (1 - _sigmoid(beta * h))
    if loss_type == "sigmoid":
        return (1 - eps) * _neg_log_sigmoid(beta * h) + eps * _neg_log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)


def _random_logps(seed, b=8):
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(b, generator=gen, dtype=torch.float64) * 40 for _ in range(4)]


def test_hand_worked():
    """pi_c = -1, ref_c = -2, pi_r = -3, ref_r = -3: h = (-1 - -2) - (-3 - -3) = 1; beta = 0.5.

    sigmoid: -log sigmoid(0.5) = 0.474077; with eps = 0.1: 0.9 * 0.474077 + 0.1 * 0.974077
    = 0.524077 (-log sigmoid(-0.5) = 0.5 + 0.474077). ipo: (1 - 1/(2 * 0.5))^2 = 0.
    hinge: max(0, 1 - 0.5) = 0.5. Rewards: chosen 0.5 * (-1 - -2) = 0.5, rejected 0.
    """
    args = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -3.0)]
    expected = {"sigmoid": 0.474077, "ipo": 0.0, "hinge": 0.5}
    for loss_type, value in expected.items():
        losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=0.5, loss_type=loss_type)
        assert_close(losses, torch.tensor([value]), atol=1e-6, rtol=0)
        assert_close(chosen_rewards, torch.tensor([0.5]))
        assert_close(rejected_rewards, torch.tensor([0.0]))
    smoothed, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert_close(smoothed, torch.tensor([0.524077]), atol=1e-6, rtol=0)


def test_against_float64_loop_reference():
    pc, pr, rc, rr = _random_logps(0)
    for loss_type, eps, beta in [
        ("sigmoid", 0.0, 0.1),
        ("sigmoid", 0.2, 0.5),
        ("ipo", 0.0, 0.3),
        ("hinge", 0.0, 0.05),
        ("apo_zero", 0.0, 0.1),
        ("apo_down", 0.0, 0.3),
    ]:
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
        for i in range(len(pc)):
            args = (pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item())
            assert_close(losses[i].item(), _ref_loss(*args, beta, loss_type, eps))
            assert_close(chosen_rewards[i].item(), beta * (args[0] - args[2]))
            assert_close(rejected_rewards[i].item(), beta * (args[1] - args[3]))


def test_apo_hand_worked():
    """Δc = pi_c - ref_c = -1 - -3 = 2, Δr = pi_r - ref_r = -4 - -2 = -2, beta = 0.5; σ(1) = 0.731059,
    σ(2) = 0.880797. apo_zero: (1 - σ(0.5 * 2)) + σ(0.5 * -2) = 0.268941 + 0.268941 = 0.537883.
    apo_down: σ(0.5 * 2) + (1 - σ(0.5 * (2 - -2))) = 0.731059 + 0.119203 = 0.850261.
    Rewards as for every DPO type: chosen 0.5 * 2 = 1, rejected 0.5 * -2 = -1.
    """
    args = [torch.tensor([v]) for v in (-1.0, -4.0, -3.0, -2.0)]
    for loss_type, value in {"apo_zero": 0.537883, "apo_down": 0.850261}.items():
        losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=0.5, loss_type=loss_type)
        assert_close(losses, torch.tensor([value]), atol=1e-6, rtol=0)
        assert_close(chosen_rewards, torch.tensor([1.0]))
        assert_close(rejected_rewards, torch.tensor([-1.0]))


def test_table_and_errors():
    unwrapped = {name: getattr(fn, "__wrapped__", fn) for name, fn in DPO_LOSS_TYPES.items()}
    assert unwrapped == {
        "sigmoid": dpo_sigmoid_loss,
        "ipo": ipo_loss,
        "hinge": hinge_loss,
        "apo_zero": apo_zero_loss,
        "apo_down": apo_down_loss,
    }
    one = torch.zeros(1)
    with pytest.raises(ValueError, match=r"'hinge', 'ipo', 'sigmoid'"):
        dpo_loss(one, one, one, one, loss_type="kto")
    with pytest.raises(ValueError, match=r"'apo_down', 'apo_zero', 'hinge'"):
        dpo_loss(one, one, one, one, loss_type="apo")
    for loss_type in ("ipo", "apo_zero", "apo_down"):
        with pytest.raises(ValueError, match="sigmoid"):
            dpo_loss(one, one, one, one, loss_type=loss_type, label_smoothing=0.1)


def test_rewards_are_detached():
    pc, pr, rc, rr = (t.requires_grad_(True) for t in _random_logps(1))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@settings(max_examples=50, deadline=None)
@given(LOGP, LOGP, st.floats(0.01, 2.0), st.floats(0.0, 0.49))
def test_log2_when_policy_equals_reference(chosen, rejected, beta, eps):
    c, r = torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, c.clone(), r.clone(), beta, "sigmoid", eps)
    assert_close(losses, torch.tensor([math.log(2.0)], dtype=torch.float64))
    assert chosen_rewards.item() == 0.0 and rejected_rewards.item() == 0.0


@settings(max_examples=50, deadline=None)
@given(LOGP, LOGP, st.floats(0.01, 2.0), st.sampled_from(["apo_zero", "apo_down"]))
def test_apo_is_one_when_policy_equals_reference(chosen, rejected, beta, loss_type):
    """Δc = Δr = 0: each APO form is a sum of two sigmoids at 0, 1/2 + 1/2."""
    c, r = torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64)
    losses, _, _ = dpo_loss(c, r, c.clone(), r.clone(), beta, loss_type)
    assert_close(losses, torch.ones(1, dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(LOGP, LOGP, LOGP, LOGP, st.floats(0.01, 1.0))
def test_apo_gradient_directions(pc, pr, rc, rr, beta):
    """apo_zero raises the chosen log-prob and lowers the rejected one, each whatever the other does;
    apo_down always lowers the rejected one, and lowers the chosen one exactly when the margin term
    pulls less than the anchor: d loss / d Δc = β (σ'(β Δc) - σ'(β h)) with σ' = σ (1 - σ).
    """
    slope = {}
    for loss_type in ("apo_zero", "apo_down"):
        c = torch.tensor([pc], dtype=torch.float64, requires_grad=True)
        r = torch.tensor([pr], dtype=torch.float64, requires_grad=True)
        ref_c, ref_r = torch.tensor([rc], dtype=torch.float64), torch.tensor([rr], dtype=torch.float64)
        losses, _, _ = dpo_loss(c, r, ref_c, ref_r, beta, loss_type)
        losses.sum().backward()
        slope[loss_type] = c.grad.item(), r.grad.item()
    d_sigmoid = lambda x: _sigmoid(x) * (1 - _sigmoid(x))  # noqa: E731
    chosen, rejected = pc - rc, pr - rr
    assert slope["apo_zero"][0] <= 0 <= slope["apo_zero"][1]
    assert_close(slope["apo_zero"], (-beta * d_sigmoid(beta * chosen), beta * d_sigmoid(beta * rejected)))
    assert slope["apo_down"][1] >= 0
    h = chosen - rejected
    assert_close(slope["apo_down"][0], beta * (d_sigmoid(beta * chosen) - d_sigmoid(beta * h)))


@settings(max_examples=50, deadline=None)
@given(LOGP, LOGP, LOGP, LOGP, st.floats(0.01, 1.0))
def test_gradient_raises_chosen_and_lowers_rejected(pc, pr, rc, rr, beta):
    for loss_type in MARGIN_LOSS_TYPES:
        c = torch.tensor([pc], dtype=torch.float64, requires_grad=True)
        r = torch.tensor([pr], dtype=torch.float64, requires_grad=True)
        losses, _, _ = dpo_loss(c, r, torch.tensor([rc]), torch.tensor([rr]), beta, loss_type)
        losses.sum().backward()
        h = (pc - rc) - (pr - rr)
        active = {"sigmoid": True, "ipo": h < 1 / (2 * beta) - 1e-9, "hinge": beta * h < 1 - 1e-9}[loss_type]
        if active:  # ipo and hinge are flat / reversed once the margin target is met
            assert c.grad.item() < 0 < r.grad.item(), loss_type
            assert c.grad.item() == -r.grad.item()


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([-1e4, -1.0, 0.0]), st.sampled_from([-1e4, -1.0, 0.0]), st.sampled_from([0.01, 0.1, 1.0])
)
def test_finite_at_extreme_logps(chosen, rejected, beta):
    for loss_type in DPO_LOSS_TYPES:
        c = torch.tensor([chosen, 0.0], requires_grad=True)
        r = torch.tensor([rejected, -1e4], requires_grad=True)
        ref_c, ref_r = torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])
        losses, cr, rr = dpo_loss(c, r, ref_c, ref_r, beta, loss_type)
        losses.sum().backward()
        for t in (losses, cr, rr, c.grad, r.grad):
            assert torch.isfinite(t).all(), loss_type


def test_gradcheck_each_variant():
    pc, pr, rc, rr = (t.requires_grad_(True) for t in _random_logps(2, b=5))
    for loss_type, eps in [
        ("sigmoid", 0.0),
        ("sigmoid", 0.25),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("apo_zero", 0.0),
        ("apo_down", 0.0),
    ]:

        def fn(a, b, c, d, loss_type=loss_type, eps=eps):
            return dpo_loss(a, b, c, d, 0.1, loss_type, eps)[0]

        assert torch.autograd.gradcheck(fn, (pc, pr, rc, rr)), loss_type


# --- Agreement with TRL 1.16 -------------------------------------------------------------
# TRL's own DPOTrainer._compute_loss runs on our numbers through tests/_trl.py's stand-in.


def test_matches_trl_sigmoid_and_hinge():
    pc, pr, rc, rr = _random_logps(3)
    for loss_type, beta in [("sigmoid", 0.1), ("sigmoid", 0.7), ("hinge", 0.1), ("hinge", 0.02)]:
        ours, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type)
        trl_loss, trl_chosen_reward = trl_dpo_loss(pc, pr, rc, rr, beta, [loss_type])
        assert_close(ours.mean(), trl_loss)
        assert_close(chosen_rewards.mean().item(), trl_chosen_reward)


def test_matches_trl_apo():
    """TRL 1.16 DPOTrainer._compute_loss, loss types 'apo_zero' and 'apo_down' (APO paper eqs. 7 and 8):
    the same definitions as ours, so the batch means agree on random inputs; the mixed list
    [apo_zero, apo_down] (TRL adds the weighted means) is the sum of ours.
    """
    pc, pr, rc, rr = _random_logps(7)
    for loss_type, beta in [("apo_zero", 0.1), ("apo_zero", 1.0), ("apo_down", 0.1), ("apo_down", 1.0)]:
        ours, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type)
        trl_loss, trl_chosen_reward = trl_dpo_loss(pc, pr, rc, rr, beta, [loss_type])
        assert_close(ours.mean(), trl_loss)
        assert_close(chosen_rewards.mean().item(), trl_chosen_reward)
    both = sum(dpo_loss(pc, pr, rc, rr, 0.2, t)[0].mean() for t in ("apo_zero", "apo_down"))
    assert_close(both, trl_dpo_loss(pc, pr, rc, rr, 0.2, ["apo_zero", "apo_down"])[0])


def test_matches_trl_with_label_smoothing():
    """TRL 1.16's 'sigmoid' ignores label_smoothing (older TRL applied it there). Its 'aot_unpaired'
    loss is -(1-eps) log sigmoid(beta d) - eps log sigmoid(-beta d) with d the difference of the
    *sorted* chosen and sorted rejected log-ratios; we sort both beforehand, so d = h pair by pair.
    ('robust' is a different, unbiased variant divided by 1 - 2 eps.)
    """
    pc, pr, rc, rr = _random_logps(4)
    order_c, order_r = torch.argsort(pc - rc), torch.argsort(pr - rr)
    pc, rc, pr, rr = pc[order_c], rc[order_c], pr[order_r], rr[order_r]
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.15)
    assert_close(ours.mean(), trl_dpo_loss(pc, pr, rc, rr, 0.2, ["aot_unpaired"], 0.15)[0])
    unsmoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert_close(unsmoothed.mean(), trl_dpo_loss(pc, pr, rc, rr, 0.2, ["sigmoid"], 0.15)[0])


def test_matches_trl_ipo_up_to_length_normalisation():
    """TRL's IPO divides each sequence's log-ratio by its completion length before squaring; our
    ipo uses h as given. Passing per-token-averaged log-probs to ours reproduces TRL's; with
    one-token completions the two coincide.
    """
    pc, pr, rc, rr = _random_logps(5)
    gen = torch.Generator().manual_seed(6)
    chosen_len = torch.randint(1, 9, (8,), generator=gen).double()
    rejected_len = torch.randint(1, 9, (8,), generator=gen).double()
    for beta in (0.1, 0.5):
        ours, _, _ = dpo_loss(
            pc / chosen_len, pr / rejected_len, rc / chosen_len, rr / rejected_len, beta, "ipo"
        )
        trl_loss, _ = trl_dpo_loss(
            pc, pr, rc, rr, beta, ["ipo"], chosen_len=chosen_len, rejected_len=rejected_len
        )
        assert_close(ours.mean(), trl_loss)
        assert_close(
            dpo_loss(pc, pr, rc, rr, beta, "ipo")[0].mean(), trl_dpo_loss(pc, pr, rc, rr, beta, ["ipo"])[0]
        )


def test_rpo_nll_is_mean_token_nll_of_each_chosen_answer():
    # Two answers: 3 tokens summing to log-prob -6 (2 nats/token) and 1 token at -0.5.
    nll = rpo_nll(torch.tensor([-6.0, -0.5]), torch.tensor([3.0, 1.0]))
    assert_close(nll, torch.tensor([2.0, 0.5]))
    # Its gradient raises the chosen log-prob: d nll / d logp = -1 / length.
    logps = torch.tensor([-6.0, -0.5], requires_grad=True)
    rpo_nll(logps, torch.tensor([3.0, 1.0])).sum().backward()
    assert_close(logps.grad, torch.tensor([-1 / 3, -1.0]))
    # A zero length (no counted token) does not divide by zero.
    assert torch.isfinite(rpo_nll(torch.tensor([0.0]), torch.tensor([0.0]))).all()
