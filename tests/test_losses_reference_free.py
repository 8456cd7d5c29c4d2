"""ORPO, SimPO and CPO (no reference model): hand-worked numbers, float64 references, properties,
numerics of log(1 - e^x) near 0, gradcheck, and agreement with TRL."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import cpo_loss, dpo_loss, orpo_loss, simpo_loss
from alignment.losses.reference_free import log1mexp
from tests._trl import trl_cpo_loss, trl_log1mexp, trl_odds_ratio_loss

MEAN_LOGP = st.floats(-20.0, -1e-6)
SUM_LOGP = st.floats(-100.0, 0.0)
# log(1 - e^x) where it is hard: just below 0 (1 - e^x cancels), around the branch at -log 2, far below.
HARD_X = [-1e-30, -1e-12, -1e-7, -1e-3, -0.5, -0.6931, -0.6932, -0.7, -1.0, -10.0, -40.0, -100.0]


def _neg_log_sigmoid(x):
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _log1mexp64(x):
    """log(1 - e^x) in float64 scalar maths."""
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def _mean_logps(seed, b=8):
    """Chosen and rejected mean log-probs [B] in (-4, 0], float64, with one pair very close to 0."""
    gen = torch.Generator().manual_seed(seed)
    c, r = (-torch.rand(b, generator=gen, dtype=torch.float64) * 4 for _ in range(2))
    c[0], r[0] = -1e-9, -2e-6
    return c, r


def test_hand_worked():
    """ORPO: c = log 0.5, r = log 0.25: odds 1 and 1/3, log_odds = log 3 = 1.098612; σ(log 3) = 3/4, so
    with β = 0.1 the loss is -0.1 log(3/4) = 0.028768.
    SimPO: c = -0.5, r = -1.5, β = 2, γ = 0.5: -log σ(2 · 1 - 0.5) = -log σ(1.5) = 0.201413.
    CPO: c = -3, r = -5, β = 0.5: -log σ(0.5 · 2) = -log σ(1) = 0.313262.
    """
    losses, log_odds = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), beta=0.1)
    assert_close(log_odds, torch.tensor([1.098612]), atol=1e-6, rtol=0)
    assert_close(losses, torch.tensor([0.028768]), atol=1e-6, rtol=0)
    simpo = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert_close(simpo, torch.tensor([0.201413]), atol=1e-6, rtol=0)
    assert_close(
        cpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), beta=0.5),
        torch.tensor([0.313262]),
        atol=1e-6,
        rtol=0,
    )


def test_against_float64_loop_references():
    c, r = _mean_logps(0)
    for beta, gamma in [(0.1, 0.5), (0.5, 0.0), (2.5, 1.4)]:
        losses, log_odds = orpo_loss(c, r, beta)
        simpo = simpo_loss(c, r, beta, gamma)
        cpo = cpo_loss(c * 30, r * 30, beta)  # sums: ~30 tokens per answer
        for out in (losses, log_odds, simpo, cpo):
            assert out.shape == (8,) and out.dtype == torch.float64
        for i in range(8):
            ci, ri = c[i].item(), r[i].item()
            expected_log_odds = (ci - ri) - (_log1mexp64(ci) - _log1mexp64(ri))
            assert_close(log_odds[i].item(), expected_log_odds)
            assert_close(losses[i].item(), beta * _neg_log_sigmoid(expected_log_odds))
            assert_close(simpo[i].item(), _neg_log_sigmoid(beta * (ci - ri) - gamma))
            assert_close(cpo[i].item(), _neg_log_sigmoid(beta * 30 * (ci - ri)))


def test_log1mexp_is_accurate_near_zero_and_far_below():
    """float32 and float64 against scalar float64 maths, at the points where the naive log(1 - exp(x))
    fails (at x = -1e-12 it gives log(0) = -inf in float32; the answer is log(1e-12) = -27.63)."""
    naive = torch.log(1 - torch.exp(torch.tensor([-1e-12])))
    assert torch.isinf(naive).all()
    for dtype, rtol in [(torch.float32, 1e-6), (torch.float64, 1e-13)]:
        x = torch.tensor(HARD_X, dtype=dtype)
        expected = torch.tensor([_log1mexp64(v) for v in HARD_X], dtype=torch.float64)
        assert_close(log1mexp(x).double(), expected, rtol=rtol, atol=1e-30)


def test_log1mexp_gradient_has_no_nan_on_either_branch():
    """Both branches are computed for every element; each only sees inputs on its own side, so the
    unused one adds 0, not 0 · inf = nan. d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x)."""
    x = torch.tensor(HARD_X, dtype=torch.float64, requires_grad=True)
    log1mexp(x).sum().backward()
    expected = torch.tensor([-1 / math.expm1(-v) for v in HARD_X], dtype=torch.float64)
    assert_close(x.grad, expected)


def test_orpo_finite_at_probability_one():
    """A mean log-prob of exactly 0 (every token certain): log(1 - e^0) = -inf, so TRL's form gives
    log_odds = ±inf or nan. Ours takes 0 as -tiny: finite log-odds and loss, no gradient through the odds."""
    for dtype in (torch.float32, torch.float64):
        c = torch.tensor([0.0, 0.0, -1.0], dtype=dtype, requires_grad=True)
        r = torch.tensor([0.0, -1.0, 0.0], dtype=dtype, requires_grad=True)
        losses, log_odds = orpo_loss(c, r, beta=0.1)
        losses.sum().backward()
        for t in (losses, log_odds, c.grad, r.grad):
            assert torch.isfinite(t).all(), dtype
        assert log_odds[0].item() == 0.0 and log_odds[1].item() > 80 and log_odds[2].item() < -80


@settings(max_examples=50, deadline=None)
@given(MEAN_LOGP, MEAN_LOGP, st.floats(0.01, 2.0))
def test_orpo_log_odds_antisymmetric_and_beta_log2_at_equal(c, r, beta):
    chosen, rejected = torch.tensor([c], dtype=torch.float64), torch.tensor([r], dtype=torch.float64)
    _, forward = orpo_loss(chosen, rejected, beta)
    _, backward = orpo_loss(rejected, chosen, beta)
    assert_close(forward, -backward)
    tie, tie_log_odds = orpo_loss(chosen, chosen.clone(), beta)
    assert tie_log_odds.item() == 0.0
    assert_close(tie, torch.tensor([beta * math.log(2.0)], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(MEAN_LOGP, MEAN_LOGP, st.floats(0.01, 2.0))
def test_orpo_gradient_raises_chosen_and_lowers_rejected(c, r, beta):
    """log odds(e^x) = x - log(1 - e^x) increases with x, so the loss falls as c rises and r falls."""
    chosen = torch.tensor([c], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    losses, _ = orpo_loss(chosen, rejected, beta)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


@settings(max_examples=50, deadline=None)
@given(MEAN_LOGP, st.floats(0.01, 5.0))
def test_simpo_log2_with_gamma_zero_and_equal_answers(c, beta):
    x = torch.tensor([c], dtype=torch.float64)
    assert_close(
        simpo_loss(x, x.clone(), beta, gamma=0.0), torch.tensor([math.log(2.0)], dtype=torch.float64)
    )


@settings(max_examples=50, deadline=None)
@given(SUM_LOGP, SUM_LOGP, st.floats(0.01, 5.0), st.floats(0.0, 3.0))
def test_cpo_is_dpo_without_reference_and_simpo_is_cpo_with_a_margin(c, r, beta, gamma):
    """CPO = DPO's sigmoid loss with a zero reference; SimPO(c, r, β, γ) = CPO(c, r + γ / β, β)."""
    chosen, rejected = torch.tensor([c], dtype=torch.float64), torch.tensor([r], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert_close(cpo_loss(chosen, rejected, beta), dpo_loss(chosen, rejected, zero, zero, beta)[0])
    assert_close(simpo_loss(chosen, rejected, beta, gamma), cpo_loss(chosen, rejected + gamma / beta, beta))


def test_finite_at_extreme_logps():
    c = torch.tensor([-1e4, 0.0, -1e-30], requires_grad=True)
    r = torch.tensor([0.0, -1e4, -1e-30], requires_grad=True)
    total = orpo_loss(c, r)[0].sum() + simpo_loss(c, r).sum() + cpo_loss(c, r).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_gradcheck():
    c, r = _mean_logps(1, b=6)
    c[0], r[0] = -0.69, -0.70  # either side of the branch at -log 2
    c.requires_grad_(True)
    r.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, 0.3)[0], (c, r))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, 2.0, 0.5), (c, r))
    assert torch.autograd.gradcheck(lambda a, b: cpo_loss(a * 20, b * 20, 0.1), (c, r))


# --- Agreement with TRL 1.16 (tests/_trl.py runs TRL's own methods) --------------------------


def test_matches_trl_orpo():
    """TRL 1.16 ORPOTrainer.odds_ratio_loss (trl/experimental/orpo/orpo_trainer.py), on mean log-probs as
    TRL feeds it: the same log-odds (same log1mexp), and TRL's ``losses`` = β log σ(log_odds) is the
    negative of ours; its trainer's loss is NLL - mean(losses), ours NLL + mean(losses): the same
    (β is the paper's λ in both). TRL casts to float32 first, so this compares in float32.

    Where they differ: at a mean log-prob of exactly 0, TRL's log-odds are ±inf or nan, ours finite
    (``test_orpo_finite_at_probability_one``); not compared there.
    """
    c, r = (t.float() for t in _mean_logps(2))
    for beta in (0.1, 1.0):
        losses, log_odds = orpo_loss(c, r, beta)
        trl_losses, _, _, trl_mean_ratio, trl_mean_log_odds = trl_odds_ratio_loss(c, r, beta)
        assert_close(losses, -trl_losses)
        assert_close(log_odds.mean(), trl_mean_log_odds)
        assert_close(-losses.mean() / beta, trl_mean_ratio)
    x = torch.tensor(HARD_X, dtype=torch.float64)
    assert_close(log1mexp(x), trl_log1mexp(x))


def test_matches_trl_cpo_and_simpo():
    """TRL 1.16 CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py) with alpha = 0 and no label
    smoothing: loss_type 'sigmoid' is CPO's -log σ(β (c - r)) on summed log-probs; 'simpo' is
    -log σ(β (c - r - γ / β)) = ours, on mean log-probs (TRL averages for 'simpo'). TRL's trainer adds
    cpo_alpha · NLL to both (pure SimPO: cpo_alpha = 0); here the stage adds the NLL to CPO only.
    """
    c, r = _mean_logps(3)
    for beta, gamma in [(0.1, 0.5), (2.0, 0.5), (2.5, 1.2)]:
        assert_close(simpo_loss(c, r, beta, gamma), trl_cpo_loss(c, r, beta, "simpo", simpo_gamma=gamma))
        assert_close(cpo_loss(c * 25, r * 25, beta), trl_cpo_loss(c * 25, r * 25, beta, "sigmoid"))
