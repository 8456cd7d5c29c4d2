"""PPO maths: KL-penalised rewards, GAE, clipped policy and value losses, KL controllers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    kl_penalized_rewards,
    last_counted_index,
    ppo_policy_loss,
    ppo_policy_loss_sum,
    ppo_value_loss,
    ppo_value_loss_sum,
)

NAN = float("nan")
B, T = 6, 7


def _mask():
    """Rows: left padded, right padded, one token, full, empty, and one with a gap."""
    mask = torch.zeros(B, T, dtype=torch.float64)
    mask[0, 3:] = 1
    mask[1, :4] = 1
    mask[2, 5] = 1
    mask[3, :] = 1
    mask[5, [1, 2, 5]] = 1
    return mask


def _randn(seed, scale=1.0):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _counted(mask, b):
    return [t for t in range(mask.size(1)) if mask[b, t]]


def _ref_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        idx = _counted(mask, b)
        next_value, running = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            next_value = values[b, t].item()
            adv[b, t], ret[b, t] = running, running + values[b, t].item()
    return adv, ret


def _ref_policy(logp, old, adv, mask, c):
    losses, clipped, kls = [], 0, []
    for b, t in mask.nonzero().tolist():
        ratio, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
        unclipped, clip_term = -ratio * a, -min(max(ratio, 1 - c), 1 + c) * a
        losses.append(max(unclipped, clip_term))
        clipped += clip_term > unclipped
        kls.append(ratio - 1 - math.log(ratio))
    n = len(losses)
    return sum(losses) / n, clipped / n, sum(kls) / n


def _ref_value(v, old, ret, mask, c):
    losses, clipped = [], 0
    for b, t in mask.nonzero().tolist():
        vc = old[b, t].item() + min(max(v[b, t].item() - old[b, t].item(), -c), c)
        a, b_ = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
        losses.append(0.5 * max(a, b_))
        clipped += b_ > a
    return sum(losses) / len(losses), clipped / len(losses)


# --- rewards -------------------------------------------------------------------------------


def test_kl_rewards_hand_worked():
    """mask [0, 1, 1, 0], kl_coef 0.1, score 2: logp - ref = [0.5, -1] on the counted tokens, so
    rewards = [0, -0.05, 0.1 + 2 = 2.1, 0]; nan in the padding does not leak.
    """
    logp = torch.tensor([[NAN, -1.0, -2.0, NAN]])
    ref = torch.tensor([[NAN, -1.5, -1.0, NAN]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    got = kl_penalized_rewards(torch.tensor([2.0]), logp, ref, mask, 0.1)
    assert_close(got, torch.tensor([[0.0, -0.05, 2.1, 0.0]]))
    assert last_counted_index(torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])).tolist() == [2, -1]


def test_kl_rewards_against_loop_reference():
    mask, logp, ref = _mask(), _randn(0), _randn(1)
    scores = torch.randn(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = kl_penalized_rewards(scores, logp, ref, mask, 0.05)
    expected = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = _counted(mask, b)
        for t in idx:
            expected[b, t] = -0.05 * (logp[b, t].item() - ref[b, t].item())
        if idx:
            expected[b, idx[-1]] += scores[b].item()
    assert_close(got, expected)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.booleans(), min_size=T, max_size=T), st.floats(-10, 10), st.floats(0, 1), st.integers(0, 99)
)
def test_kl_rewards_sum_to_score_minus_kl(keep, score, kl_coef, seed):
    mask = torch.tensor([keep], dtype=torch.float64)
    logp, ref = _randn(seed)[:1], _randn(seed + 1)[:1]
    got = kl_penalized_rewards(torch.tensor([score], dtype=torch.float64), logp, ref, mask, kl_coef).sum()
    kl = ((logp - ref) * mask).sum().item()
    assert_close(got.item(), (score if any(keep) else 0.0) - kl_coef * kl)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([-1e4, -1.0, 0.0]), st.sampled_from([-1e4, -1.0, 0.0]), st.floats(0.0, 1.0))
def test_rewards_and_gae_finite_at_extreme_logps(logp, ref, kl_coef):
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    lp, rp = torch.tensor([[NAN, logp, ref, NAN]]), torch.tensor([[NAN, ref, logp, NAN]])
    rewards = kl_penalized_rewards(torch.tensor([1.0]), lp, rp, mask, kl_coef)
    adv, ret = gae_advantages(rewards, torch.tensor([[NAN, 0.5, -0.5, NAN]]), mask)
    for t in (rewards, adv, ret):
        assert torch.isfinite(t).all()


# --- GAE -----------------------------------------------------------------------------------


def test_gae_hand_worked():
    """rewards [0, 0, 1], values 0.5, gamma 1, lam 0.95:
    t=2: delta = 1 + 0 - 0.5 = 0.5 (no bootstrap), A = 0.5
    t=1: delta = 0 + 0.5 - 0.5 = 0, A = 0.95 * 0.5 = 0.475
    t=0: delta = 0, A = 0.95 * 0.475 = 0.45125; returns = A + 0.5 = [0.95125, 0.975, 1.0].
    The same row padded on both sides gives the same numbers, and zeros in the padding.
    """
    adv, ret = gae_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3))
    assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5]]))
    assert_close(ret, torch.tensor([[0.95125, 0.975, 1.0]]))
    padded = gae_advantages(
        torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]]), torch.full((1, 5), 0.5), torch.tensor([[0.0, 1, 1, 1, 0]])
    )
    assert_close(padded[0], torch.tensor([[0.0, 0.45125, 0.475, 0.5, 0.0]]))
    assert_close(padded[1], torch.tensor([[0.0, 0.95125, 0.975, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_against_loop_reference(gamma, lam):
    rewards, values, mask = _randn(3), _randn(4), _mask()
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _ref_gae(rewards, values, mask, gamma, lam)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_gae_has_no_gradient():
    rewards, values = _randn(5).requires_grad_(True), _randn(6).requires_grad_(True)
    adv, ret = gae_advantages(rewards, values, _mask())
    assert not adv.requires_grad and not ret.requires_grad


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(0, 3), st.integers(0, 3), st.integers(0, 99))
def test_gae_gamma_lam_one_is_reward_to_go_minus_values(n, left, right, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(1, n, generator=gen), torch.randn(1, n, generator=gen)
    adv, ret = gae_advantages(rewards, values, torch.ones(1, n), gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    assert_close(adv, to_go - values)
    assert_close(ret, to_go)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 3),
    st.integers(0, 3),
    st.floats(0.5, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 99),
)
def test_gae_padded_batch_equals_rows_unpadded(n, left, right, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards, values = (
        torch.randn(2, n, generator=gen, dtype=torch.float64),
        torch.randn(2, n, generator=gen, dtype=torch.float64),
    )
    width = n + left + right
    pad_r, pad_v, pad_m = (torch.full((2, width), NAN, dtype=torch.float64) for _ in range(3))
    pad_m.zero_()
    pad_r[0, left : left + n], pad_v[0, left : left + n], pad_m[0, left : left + n] = rewards[0], values[0], 1
    pad_r[1, right : right + n], pad_v[1, right : right + n], pad_m[1, right : right + n] = (
        rewards[1],
        values[1],
        1,
    )
    adv, ret = gae_advantages(pad_r, pad_v, pad_m, gamma, lam)
    for row, start in ((0, left), (1, right)):
        alone = gae_advantages(rewards[row : row + 1], values[row : row + 1], torch.ones(1, n), gamma, lam)
        assert_close(adv[row, start : start + n], alone[0][0])
        assert_close(ret[row, start : start + n], alone[1][0])
        assert torch.equal(adv[row] * (1 - pad_m[row]), torch.zeros(width, dtype=torch.float64))


# --- policy loss ---------------------------------------------------------------------------


def test_policy_loss_hand_worked():
    """clip 0.2. Token 1: ratio 1.5, A = 1: -min(1.5, 1.2) = -1.2 (clipped). Token 2: ratio 0.5,
    A = 1: -min(0.5, 0.8) = -0.5. Token 3: ratio 0.5, A = -1: -min(-0.5, -0.8) = 0.8 (clipped).
    Padding ignored. loss = (-1.2 - 0.5 + 0.8) / 3 = -0.3; clip_fraction 2/3; approx_kl
    (k3 = ratio - 1 - ln ratio) = ((0.5 - ln 1.5) + 2 (ln 2 - 0.5)) / 3 = 0.480829 / 3 = 0.160276.
    """
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), NAN]])
    old = torch.tensor([[0.0, 0.0, 0.0, NAN]])
    adv = torch.tensor([[1.0, 1.0, -1.0, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logp, old, adv, mask)
    assert_close(loss, torch.tensor(-0.3))
    assert_close(clip_fraction, torch.tensor(2 / 3))
    assert_close(approx_kl, torch.tensor(0.160276), atol=1e-6, rtol=0)


def test_policy_loss_against_loop_reference():
    logp, old, adv, mask = _randn(7, 0.3), _randn(8, 0.3), _randn(9), _mask()
    for c in (0.1, 0.2):
        got = ppo_policy_loss(logp, old, adv, mask, c)
        for value, expected in zip(got, _ref_policy(logp, old, adv, mask, c)):
            assert_close(value.item(), expected)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-1.0, 1.0), st.floats(-2.0, 2.0)), min_size=1, max_size=8),
    st.floats(0.05, 0.3),
)
def test_no_gradient_on_tokens_clipped_on_the_favoured_side(tokens, c):
    log_ratio = torch.tensor([[lr for lr, _ in tokens]], dtype=torch.float64)
    adv = torch.tensor([[a for _, a in tokens]], dtype=torch.float64)
    logp = log_ratio.clone().requires_grad_(True)
    loss, _, _ = ppo_policy_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(logp), c)
    loss.backward()
    ratio = log_ratio.exp()
    favoured = ((ratio > 1 + c) & (adv > 0)) | ((ratio < 1 - c) & (adv < 0))
    assert torch.equal(logp.grad[favoured], torch.zeros_like(logp.grad[favoured]))
    live = ~favoured & (adv.abs() > 1e-6)  # (a denormal advantage's gradient underflows to 0)
    assert (logp.grad[live] != 0).all()


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([-1e4, -5.0, 0.0]), st.sampled_from([-1e4, -5.0, 0.0]), st.sampled_from([-1.0, 0.0, 1.0])
)
def test_policy_loss_finite_at_extremes(logp, old, adv):
    lp = torch.tensor([[logp, NAN]], requires_grad=True)
    loss, clip_fraction, approx_kl = ppo_policy_loss(
        lp, torch.tensor([[old, NAN]]), torch.tensor([[adv, NAN]]), torch.tensor([[1.0, 0.0]])
    )
    loss.backward()
    for t in (loss, clip_fraction, approx_kl, lp.grad):
        assert torch.isfinite(t).all()


def test_policy_loss_gradcheck_away_from_clip_boundary():
    log_ratio = _randn(10, 0.3)
    near = ((log_ratio.exp() - 1).abs() - 0.2).abs() < 1e-3
    log_ratio = torch.where(near, log_ratio + 0.01, log_ratio).requires_grad_(True)
    old, adv, mask = _randn(11), _randn(12), _mask()
    assert torch.autograd.gradcheck(lambda lp: ppo_policy_loss(lp + old, old, adv, mask)[0], (log_ratio,))


# --- value loss ----------------------------------------------------------------------------


def test_value_loss_hand_worked():
    """clip 0.2, v = 1, old_v = 0.5 so v_clip = 0.7. R = 0: max(1, 0.49) = 1 -> 0.5 (unclipped).
    R = 2: max(1, 1.69) = 1.69 -> 0.845 (clipped). loss = 0.6725, clip_fraction 0.5.
    Without clipping: 0.5 * (1 + 1) / 2 = 0.5.
    """
    v, old, ret = (
        torch.tensor([[1.0, 1.0, NAN]]),
        torch.tensor([[0.5, 0.5, NAN]]),
        torch.tensor([[0.0, 2.0, NAN]]),
    )
    loss, clip_fraction = ppo_value_loss(v, old, ret, torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(loss, torch.tensor(0.6725))
    assert_close(clip_fraction, torch.tensor(0.5))
    assert_close(ppo_value_loss(v, old, ret, torch.tensor([[1.0, 1.0, 0.0]]), None)[0], torch.tensor(0.5))


def test_value_loss_against_loop_reference():
    v, old, ret, mask = _randn(13), _randn(14), _randn(15), _mask()
    for c in (0.2, 0.5):
        loss, clip_fraction = ppo_value_loss(v, old, ret, mask, c)
        expected_loss, expected_fraction = _ref_value(v, old, ret, mask, c)
        assert_close(loss.item(), expected_loss)
        assert_close(clip_fraction.item(), expected_fraction)


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(0.01, 1.0))
def test_value_loss_takes_the_larger_term(v, old, ret, c):
    loss, clip_fraction = ppo_value_loss(
        *(torch.tensor([[x]], dtype=torch.float64) for x in (v, old, ret)), torch.ones(1, 1), c
    )
    unclipped = (v - ret) ** 2
    clipped = (old + min(max(v - old, -c), c) - ret) ** 2
    assert_close(loss.item(), 0.5 * max(unclipped, clipped))
    assert clip_fraction.item() == float(clipped > unclipped)
    assert math.isfinite(loss.item())


def test_value_loss_gradcheck():
    v, old, ret, mask = _randn(16), _randn(17), _randn(18), _mask()
    near = ((v - old).abs() - 0.2).abs() < 1e-3
    v = torch.where(near, v + 0.01, v).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ppo_value_loss(x, old, ret, mask)[0], (v,))


# --- exact averaging over micro-batches / ranks ---------------------------------------------


def test_split_batch_recombined_by_token_count_equals_whole_batch():
    """Summing (loss_sum, count) over two halves and dividing once gives the whole batch's loss,
    metrics and gradient, however unevenly the tokens fall (the halves hold 8 and 14 tokens).
    """
    mask, old, adv = _mask(), _randn(19, 0.3), _randn(20)
    logp = (old + _randn(21, 0.3)).requires_grad_(True)
    halves = (slice(0, 3), slice(3, B))
    whole = ppo_policy_loss(logp, old, adv, mask)
    (grad_whole,) = torch.autograd.grad(whole[0], logp)
    parts = [ppo_policy_loss_sum(logp[s], old[s], adv[s], mask[s]) for s in halves]
    total = sum(p[3] for p in parts)
    combined = sum(p[0] for p in parts) / total
    (grad_split,) = torch.autograd.grad(combined, logp)
    assert_close(combined, whole[0])
    assert_close(grad_split, grad_whole)
    assert_close((sum(p[1] for p in parts) / total).item(), whole[1].item())
    assert_close(sum(p[2] for p in parts) / total, whole[2])

    values, old_v, ret = _randn(22).requires_grad_(True), _randn(23), _randn(24)
    whole_v = ppo_value_loss(values, old_v, ret, mask)
    parts_v = [ppo_value_loss_sum(values[s], old_v[s], ret[s], mask[s]) for s in halves]
    total_v = sum(p[2] for p in parts_v)
    assert_close(sum(p[0] for p in parts_v) / total_v, whole_v[0])
    assert_close((sum(p[1] for p in parts_v) / total_v).item(), whole_v[1].item())


# --- KL controllers ------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_worked():
    """init 0.2, target 6, horizon 10000. KL 12: error clip(12/6 - 1, +-0.2) = 0.2; 256 samples:
    0.2 * (1 + 0.2 * 256 / 10000) = 0.201024. Then KL 3: error -0.5 -> -0.2: 0.201024 * 0.99488.
    """
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024)
    ctl.update(3.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024 * 0.99488)
    resumed = AdaptiveKLController(1.0, 1.0, 1.0)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, target=0.0, horizon=10000)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05 and ctl.state_dict() == {"value": 0.05}
