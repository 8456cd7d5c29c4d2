"""Bradley-Terry reward-model loss: hand-worked numbers, loop reference, properties, gradcheck."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import bradley_terry_loss, reward_centering_loss


def _ref_softplus_neg(x):
    """-log sigmoid(x) = log(1 + e^-x), evaluated stably in float64 Python."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def test_hand_worked():
    """Gaps r_c - r_r = [1, 0]: -log sigmoid(1) = 0.313262, -log sigmoid(0) = ln 2 = 0.693147;
    mean 0.503204. With margin [0.5, -1] the gaps become [0.5, 1]: 0.474077 and 0.313262, mean
    0.393669. A scalar margin 1 gives gaps [0, -1]: 0.693147 and 1.313262, mean 1.003204.
    """
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(0.503204), atol=1e-6, rtol=0)
    margin = torch.tensor([0.5, -1.0])
    assert_close(bradley_terry_loss(chosen, rejected, margin), torch.tensor(0.393669), atol=1e-6, rtol=0)
    assert_close(bradley_terry_loss(chosen, rejected, 1.0), torch.tensor(1.003204), atol=1e-6, rtol=0)


def test_against_float64_loop_reference():
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(17, generator=gen, dtype=torch.float64) * 5
    rejected = torch.randn(17, generator=gen, dtype=torch.float64) * 5
    margin = torch.rand(17, generator=gen, dtype=torch.float64)
    for m in (None, margin):
        gaps = [
            c - r - (0.0 if m is None else float(m[i]))
            for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))
        ]
        expected = sum(_ref_softplus_neg(g) for g in gaps) / len(gaps)
        assert_close(bradley_terry_loss(chosen, rejected, m).item(), expected)
    one = bradley_terry_loss(chosen[:1], rejected[:1]).item()
    assert_close(one, _ref_softplus_neg(chosen[0].item() - rejected[0].item()))


@settings(max_examples=50, deadline=None)
@given(st.floats(-30, 30), st.floats(0.01, 10))
def test_loss_falls_as_the_gap_grows(gap, step):
    reward = torch.tensor([0.0], dtype=torch.float64)
    smaller = bradley_terry_loss(reward + gap, reward)
    larger = bradley_terry_loss(reward + gap + step, reward)
    assert larger < smaller


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_finite_at_extremes(chosen, rejected):
    c = torch.tensor([chosen], requires_grad=True)
    r = torch.tensor([rejected], requires_grad=True)
    loss = bradley_terry_loss(c, r)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert c.grad.item() <= 0 <= r.grad.item()  # raising chosen / lowering rejected helps


def test_gradient_direction_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    chosen = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, r: bradley_terry_loss(c, r, margin), (chosen, rejected))
    bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_centering_hand_worked_and_blind_to_what_bradley_terry_sees():
    """Pairs (2, 1) and (0, 0): sums 3 and 0, mean of squares 4.5. A per-pair shift that leaves every
    gap alone changes only the centering term, and it is 0 once each pair's mean is 0."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    assert_close(reward_centering_loss(chosen, rejected), torch.tensor(4.5))
    centred = torch.tensor([0.5, 0.0]), torch.tensor([-0.5, 0.0])
    assert_close(bradley_terry_loss(*centred), bradley_terry_loss(chosen, rejected))
    assert reward_centering_loss(*centred).item() == 0.0


def test_centering_gradient_pulls_each_pair_mean_toward_zero():
    chosen = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([1.0, -4.0], dtype=torch.float64, requires_grad=True)
    reward_centering_loss(chosen, rejected).backward()
    # d/dr_c = d/dr_r = (r_c + r_r) (2 / B with B = 2): positive-sum pairs go down, negative go up.
    assert_close(chosen.grad, torch.tensor([4.0, -6.0], dtype=torch.float64))
    assert_close(rejected.grad, chosen.grad)
