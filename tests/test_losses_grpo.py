"""GRPO maths: group-relative advantages and the clipped loss in its three aggregations."""

import importlib.metadata
import math

import pytest
import torch
from torch.testing import assert_close

from alignment.losses import (
    GROUP_ADVANTAGES,
    IMPORTANCE_SAMPLING,
    LOSS_AGGREGATIONS,
    group_advantages,
    grpo_loss,
    grpo_loss_sum,
)

NAN = float("nan")
B, T = 6, 7
ATOL = 1e-10


def _mask(empty_row: bool = True):
    """Rows: left padded, right padded, one token, full, empty (or a gap), and one with a gap."""
    mask = torch.zeros(B, T, dtype=torch.float64)
    mask[0, 3:] = 1
    mask[1, :4] = 1
    mask[2, 5] = 1
    mask[3, :] = 1
    if not empty_row:
        mask[4, [0, 6]] = 1
    mask[5, [1, 2, 5]] = 1
    return mask


def _randn(seed, scale=1.0, shape=(B, T)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _inputs(seed, nan_padding=True, empty_row=True):
    """(logprobs, old_logprobs, advantages, mask, ref_logprobs); |log ratio| ~ 0.3 so some tokens clip."""
    mask = _mask(empty_row)
    old = -_randn(seed).abs() - 0.1
    logp = old + _randn(seed + 1, 0.3)
    ref = logp + _randn(seed + 2, 0.3)
    adv = _randn(seed + 3, shape=(B,))
    if nan_padding:
        pad = ~mask.bool()
        old, ref = old.masked_fill(pad, NAN), ref.masked_fill(pad, NAN)
    return logp, old, adv, mask, ref


def _kwargs(agg, level, kl):
    return dict(
        clip_low=0.2,
        clip_high=0.28,
        importance_sampling=level,
        loss_agg=agg,
        max_tokens=9 if agg == "seq_mean_token_sum_norm" else None,
        kl_beta=0.05 if kl else 0.0,
    )


# --- float64 loop references, written without the library's helpers -----------------------


def _ref_advantages(rewards, method, eps=1e-4):
    out = []
    for row in rewards.tolist():
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (g - 1)) if g > 1 else 0.0
        if method == "grpo":
            out.append([(r - mean) / (std + eps) for r in row])
        elif method == "dr_grpo":
            out.append([r - mean for r in row])
        else:
            out.append([r - (sum(row) - r) / (g - 1) for r in row])
    return torch.tensor(out, dtype=torch.float64)


def _ref_loss(
    logp, old, adv, mask, clip_low, clip_high, importance_sampling, loss_agg, max_tokens, ref, kl_beta
):
    """Returns (loss, clip_fraction, kl, ratio_mean) by looping over rows and their counted tokens."""
    rows = []  # per row: [(loss, clipped, k3, ratio)] over its counted tokens
    for b in range(logp.size(0)):
        idx = [t for t in range(logp.size(1)) if mask[b, t]]
        seq_log_ratio = sum(logp[b, t].item() - old[b, t].item() for t in idx) / max(len(idx), 1)
        a = adv[b].item()
        tokens = []
        for t in idx:
            log_ratio = (
                seq_log_ratio if importance_sampling == "sequence" else logp[b, t].item() - old[b, t].item()
            )
            r = math.exp(log_ratio)
            r_clip = min(max(r, 1 - clip_low), 1 + clip_high)
            k3 = 0.0
            if ref is not None:
                d = ref[b, t].item() - logp[b, t].item()
                k3 = math.exp(d) - d - 1
            tokens.append((-min(r * a, r_clip * a) + kl_beta * k3, -r_clip * a > -r * a, k3, r))
        rows.append(tokens)
    flat = [tok for row in rows for tok in row]
    total = sum(tok[0] for tok in flat)
    if loss_agg == "token_mean":
        loss = total / len(flat)
    elif loss_agg == "seq_mean_token_mean":
        means = [sum(tok[0] for tok in row) / len(row) for row in rows if row]
        loss = sum(means) / len(means)
    else:
        loss = total / (len(rows) * max_tokens)
    n = len(flat)
    return (
        loss,
        sum(tok[1] for tok in flat) / n,
        sum(tok[2] for tok in flat) / n,
        sum(tok[3] for tok in flat) / n,
    )


# --- group advantages ----------------------------------------------------------------------


def test_group_advantages_hand_worked():
    """rewards [1, 0, 0, 1]: mean 0.5, unbiased var = 4 · 0.25 / 3 = 1/3, std 0.577350.
    grpo: ±0.5 / (0.577350 + 1e-4) = ±0.865875; dr_grpo: ±0.5;
    rloo: 1 - mean(0, 0, 1) = 2/3 and 0 - mean(1, 0, 1) = -2/3.
    A second prompt with equal rewards [3, 3, 3, 3] gets 0 under every method (std 0, no nan).
    """
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    sign = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert_close(group_advantages(rewards), 0.8658754297607016 * sign)
    assert_close(group_advantages(rewards, "dr_grpo"), 0.5 * sign)
    assert_close(group_advantages(rewards, "rloo"), 2 / 3 * sign)
    assert_close(group_advantages(rewards, "grpo", eps=0.0)[0], sign[0] * math.sqrt(3) / 2)


@pytest.mark.parametrize("method", GROUP_ADVANTAGES)
def test_group_advantages_against_loop_reference(method):
    rewards = _randn(30, shape=(3, 5)).requires_grad_(True)
    got = group_advantages(rewards, method)
    assert not got.requires_grad
    assert_close(got, _ref_advantages(rewards.detach(), method), atol=ATOL, rtol=0)


def test_group_advantages_one_sample_per_prompt():
    """G = 1: no spread, so grpo and dr_grpo give 0 (not nan); rloo has no baseline and refuses."""
    rewards = torch.tensor([[2.0], [-1.0]])
    for method in ("grpo", "dr_grpo"):
        assert torch.equal(group_advantages(rewards, method), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="rloo needs at least 2 samples"):
        group_advantages(rewards, "rloo")


# --- the loss: hand-worked -----------------------------------------------------------------


def _hand_batch():
    """Row 0 (right padded), A = +1, ratios [1.5, 0.9]; row 1 (left padded), A = -1, ratios [0.5, 1.1, 0.9]."""
    old = torch.tensor([[0.0, 0.0, NAN, NAN], [NAN, 0.0, 0.0, 0.0]], dtype=torch.float64)
    logp = torch.tensor(
        [[math.log(1.5), math.log(0.9), NAN, NAN], [NAN, math.log(0.5), math.log(1.1), math.log(0.9)]],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    return logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask


def test_grpo_loss_token_level_hand_worked():
    """clip 0.2, so r is clipped to [0.8, 1.2]. ℓ = -min(r A, clip(r) A):
    row 0 (A = +1): r 1.5 -> -min(1.5, 1.2) = -1.2 (clipped); r 0.9 -> -0.9.   sum -2.1
    row 1 (A = -1): r 0.5 -> -min(-0.5, -0.8) = 0.8 (clipped); r 1.1 -> 1.1; r 0.9 -> 0.9.  sum 2.8
    token_mean = 0.7 / 5 = 0.14; seq_mean_token_mean = (-2.1/2 + 2.8/3) / 2 = -0.0583333;
    seq_mean_token_sum_norm (max_tokens 4) = 0.7 / (2 · 4) = 0.0875.
    clip_fraction 2/5, ratio_mean (1.5 + 0.9 + 0.5 + 1.1 + 0.9) / 5 = 0.98, kl 0 (no reference).
    nan in the padding does not leak.
    """
    logp, old, adv, mask = _hand_batch()
    expected = {
        "token_mean": 0.14,
        "seq_mean_token_mean": (-1.05 + 2.8 / 3) / 2,
        "seq_mean_token_sum_norm": 0.0875,
    }
    for agg, value in expected.items():
        loss, stats = grpo_loss(logp, old, adv, mask, loss_agg=agg, max_tokens=4)
        assert_close(loss.item(), value)
        assert_close(stats["clip_fraction"].item(), 0.4)
        assert_close(stats["ratio_mean"].item(), 0.98)
        assert stats["kl"].item() == 0.0


def test_grpo_loss_sequence_level_hand_worked():
    """GSPO: each row's ratio is exp(mean log ratio) = the geometric mean of its token ratios.
    row 0: r = sqrt(1.5 · 0.9) = 1.161895 (inside [0.8, 1.2]), A = +1 -> ℓ = -1.161895 on both tokens.
    row 1: r = (0.5 · 1.1 · 0.9)^(1/3) = 0.791046 < 0.8, A = -1 -> clipped, ℓ = 0.8 on its 3 tokens.
    token_mean = (-2.323790 + 2.4) / 5 = 0.015242; seq_mean_token_mean = (-1.161895 + 0.8) / 2 =
    -0.180948; clip_fraction 3/5 (the clipped row's tokens); ratio_mean (2 · 1.161895 + 3 · 0.791046) / 5.
    """
    logp, old, adv, mask = _hand_batch()
    loss, stats = grpo_loss(logp, old, adv, mask, importance_sampling="sequence")
    assert_close(loss.item(), 0.01524199845511003)
    assert_close(stats["clip_fraction"].item(), 0.6)
    assert_close(stats["ratio_mean"].item(), 0.9393855951528021)
    loss, _ = grpo_loss(logp, old, adv, mask, importance_sampling="sequence", loss_agg="seq_mean_token_mean")
    assert_close(loss.item(), -0.18094750193111253)


def test_grpo_loss_kl_hand_worked():
    """ref - logprobs = ln 2 on row 0's first token, 0 on the others: k3 = 2 - ln 2 - 1 = 0.306853 there.
    kl = 0.306853 / 5 = 0.0613706; with kl_beta 0.1, token_mean = 0.14 + 0.1 · 0.306853 / 5 = 0.1461371.
    The KL statistic is reported with kl_beta 0 too (the loss is then unchanged).
    """
    logp, old, adv, mask = _hand_batch()
    ref = logp.clone()
    ref[0, 0] += math.log(2.0)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logprobs=ref, kl_beta=0.1)
    assert_close(loss.item(), 0.14 + 0.1 * (1 - math.log(2)) / 5)
    assert_close(stats["kl"].item(), (1 - math.log(2)) / 5)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logprobs=ref)
    assert_close(loss.item(), 0.14)
    assert_close(stats["kl"].item(), (1 - math.log(2)) / 5)


# --- the loss: against the loop reference --------------------------------------------------


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_grpo_loss_against_loop_reference(agg, level, kl):
    """Random inputs, ragged mask (left/right padding, a gap, a one-token row, a fully masked row),
    nan in the padding, asymmetric clip (0.2, 0.28)."""
    logp, old, adv, mask, ref = _inputs(40)
    kwargs = _kwargs(agg, level, kl)
    ref_arg = ref if kl else None
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logprobs=ref_arg, **kwargs)
    expected = _ref_loss(logp, old, adv, mask, ref=ref_arg, **kwargs)
    assert 0 < expected[1] < 1  # some tokens clipped, some not: the comparison covers both branches
    got = (loss, stats["clip_fraction"], stats["kl"], stats["ratio_mean"])
    for value, want in zip(got, expected):
        assert_close(value.item(), want, atol=ATOL, rtol=0)
    assert all(not s.requires_grad for s in stats.values())


def test_sequence_level_equals_token_level_when_every_token_has_the_row_log_ratio():
    logp, old, adv, mask, _ = _inputs(41, nan_padding=False)
    row_shift = _randn(42, 0.3, shape=(B, 1))
    logp = old + row_shift.expand(B, T)
    for agg in LOSS_AGGREGATIONS:
        kwargs = dict(loss_agg=agg, max_tokens=T)
        token, token_stats = grpo_loss(logp, old, adv, mask, **kwargs)
        seq, seq_stats = grpo_loss(logp, old, adv, mask, importance_sampling="sequence", **kwargs)
        assert_close(seq, token, atol=ATOL, rtol=0)
        assert_close(seq_stats["clip_fraction"], token_stats["clip_fraction"])


# --- gradients -----------------------------------------------------------------------------


def _away_from_clip_boundary(logp, old, mask, level, clip_low=0.2, clip_high=0.28):
    log_ratio = torch.where(mask.bool(), logp - old, torch.zeros(()))
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    ratio = log_ratio.exp()
    return bool(
        ((ratio - (1 - clip_low)).abs().min() > 1e-3) and ((ratio - (1 + clip_high)).abs().min() > 1e-3)
    )


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
def test_gradcheck(level, kl):
    logp, old, adv, mask, ref = _inputs(50, nan_padding=False)
    assert _away_from_clip_boundary(logp, old, mask, level)  # finite differences straddle no kink
    kwargs = _kwargs("seq_mean_token_mean", level, kl)
    ref_arg = ref if kl else None

    def loss_of(x):
        return grpo_loss(x, old, adv, mask, ref_logprobs=ref_arg, **kwargs)[0]

    assert torch.autograd.gradcheck(loss_of, (logp.clone().requires_grad_(True),))


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
def test_no_gradient_on_clipped_tokens(level):
    """Where the clipped term is strictly larger the loss is flat in logprobs: gradient exactly 0.
    Elsewhere on counted tokens it is not 0; padding always gets 0. (Sequence level: a clipped row
    has 0 gradient on all its tokens.)"""
    logp, old, adv, mask, _ = _inputs(51)
    logp = (old.nan_to_num() + _randn(61, 0.6)).requires_grad_(True)  # wide enough to clip a whole row
    (grad,) = torch.autograd.grad(grpo_loss(logp, old, adv, mask, importance_sampling=level)[0], logp)
    log_ratio = torch.where(mask.bool(), logp.detach() - old, torch.zeros(()))
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand(B, T)
    ratio, a = log_ratio.exp(), adv.unsqueeze(-1)
    clipped = (((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))) & mask.bool()
    live = ~clipped & mask.bool()
    assert clipped.any() and live.any()
    assert torch.equal(grad[clipped], torch.zeros_like(grad[clipped]))
    assert (grad[live] != 0).all()
    assert torch.equal(grad[~mask.bool()], torch.zeros_like(grad[~mask.bool()]))


# --- exact combination over micro-batches / ranks ------------------------------------------


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_micro_batches_combine_to_the_whole_batch(agg, level):
    """Rows split unevenly (2 / 1 / 3 rows, the empty row in the last chunk; then 4 / 2): summing
    each chunk's (loss_sum, normaliser, stats_sums) and dividing once gives the whole batch's loss,
    gradient and stats."""
    logp, old, adv, mask, ref = _inputs(60)
    logp.requires_grad_(True)
    kwargs = _kwargs(agg, level, kl=True)
    whole, whole_stats = grpo_loss(logp, old, adv, mask, ref_logprobs=ref, **kwargs)
    (grad_whole,) = torch.autograd.grad(whole, logp)
    for chunks in ((slice(0, 2), slice(2, 3), slice(3, B)), (slice(0, 4), slice(4, B))):
        parts = [
            grpo_loss_sum(logp[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], **kwargs) for s in chunks
        ]
        combined = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        (grad_split,) = torch.autograd.grad(combined, logp)
        assert_close(combined, whole, atol=ATOL, rtol=0)
        assert_close(grad_split, grad_whole, atol=ATOL, rtol=0)
        sums = {key: sum(p[2][key] for p in parts) for key in parts[0][2]}
        count = sums["token_count"]
        assert_close((sums["clipped_count"] / count).item(), whole_stats["clip_fraction"].item())
        assert_close(sums["kl_sum"] / count, whole_stats["kl"])
        assert_close(sums["ratio_sum"] / count, whole_stats["ratio_mean"])


# --- edge cases and argument checks --------------------------------------------------------


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
def test_all_masked_batch_gives_zero_not_nan(level):
    logp = torch.full((2, 3), NAN, requires_grad=True)
    mask = torch.zeros(2, 3)
    for agg in LOSS_AGGREGATIONS:
        loss, stats = grpo_loss(
            logp, logp.detach(), torch.ones(2), mask, importance_sampling=level, loss_agg=agg, max_tokens=3
        )
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0 and all(s.item() == 0.0 for s in stats.values())
        assert torch.equal(grad, torch.zeros(2, 3))


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
def test_finite_at_extreme_logprobs(level):
    """|log ratio| and |ref - logprobs| of 1e4 are clamped to 20: loss, stats and gradient stay finite."""
    logp = torch.tensor([[-1e4, 0.0, NAN]], requires_grad=True)
    old = torch.tensor([[0.0, -1e4, NAN]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for adv in (-1.0, 1.0):
        loss, stats = grpo_loss(
            logp, old, torch.tensor([adv]), mask, importance_sampling=level, ref_logprobs=old, kl_beta=0.1
        )
        (grad,) = torch.autograd.grad(loss, logp)
        for t in (loss, grad, *stats.values()):
            assert torch.isfinite(t).all()


def test_bad_arguments_are_named():
    logp, old, adv, mask = _hand_batch()
    with pytest.raises(ValueError, match="'ppo'"):
        group_advantages(torch.ones(1, 2), "ppo")
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(torch.ones(4), "grpo")
    cases = [
        (dict(loss_agg="sum"), "'sum'"),
        (dict(importance_sampling="tokens"), "'tokens'"),
        (dict(clip_low=-0.1), "clip_low.*-0.1"),
        (dict(clip_high=-0.5), "clip_high.*-0.5"),
        (dict(kl_beta=-1.0), "kl_beta.*-1.0"),
        (dict(kl_beta=0.1), "ref_logprobs"),
        (dict(loss_agg="seq_mean_token_sum_norm"), "max_tokens"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            grpo_loss(logp, old, adv, mask, **kwargs)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv.unsqueeze(-1), mask)


# --- TRL 1.16 -------------------------------------------------------------------------------
# The oracle below transliterates TRL 1.16.0's loss (trl/trainer/grpo_trainer.py,
# GRPOTrainer._compute_loss, lines 3083-3172) and its group advantages
# (_generate_and_score_completions, lines 2762-2787, with trl/trainer/utils.py nanstd) for the
# loss types whose definitions agree with ours, with `self.` dropped, one process, one
# accumulation step (TRL then divides by current_gradient_accumulation_steps = 1) and no vLLM,
# entropy mask, off-policy mask or `delta`. Importing TRL's trainer takes ~6 s, and
# _compute_loss needs a model, so it is not called; instead test_trl_oracle_matches_installed_trl
# checks that these lines still read the same in the installed TRL.

_TRL_SOURCE_LINES = (
    "log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)",
    "coef_1 = torch.exp(log_importance_weights)",
    "torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1",
    "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",
    "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)",
    "per_token_loss = per_token_loss + self.beta * per_token_kl",
    "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
    "loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)",
    "loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)",
    'normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes',
    "is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)",
    "is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)",
    "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
    "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
    "advantages = advantages / (std_rewards + 1e-4)",
)


def _trl_advantages(rewards, num_generations, scale_rewards):
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = rewards.view(-1, num_generations).std(dim=1)  # nanstd: unbiased, equal without nan
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def _trl_loss(
    per_token_logps,
    old_per_token_logps,
    advantages,
    mask,
    loss_type,
    importance_sampling_level,
    epsilon_low,
    epsilon_high,
    beta,
    ref_per_token_logps,
    max_completion_length,
):
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    else:  # dapo: num_items_in_batch is the batch's token count; one process, one accumulation step
        normalizer = mask.sum().clamp(min=1.0) / 1
        loss = (per_token_loss * mask).sum() / normalizer
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    region = (is_low_clipped | is_high_clipped).float().expand_as(mask)
    clip_ratio = (region * mask).sum() / mask.sum()  # token level; at sequence level TRL counts rows
    return loss, clip_ratio


def test_trl_oracle_matches_installed_trl():
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("trl not installed")
    if not version.startswith("1.16."):
        pytest.skip(f"the oracle transliterates TRL 1.16; installed {version}")
    root = importlib.metadata.distribution("trl")
    trainer = " ".join(root.locate_file("trl/trainer/grpo_trainer.py").read_text().split())
    missing = [line for line in _TRL_SOURCE_LINES if line not in trainer]
    assert not missing, f"TRL {version}'s grpo_trainer.py no longer has: {missing}"
    utils = root.locate_file("trl/trainer/utils.py").read_text()
    assert "correction = count / (count - 1)" in utils  # nanstd is the unbiased std


@pytest.mark.parametrize("scale_rewards,method", [("group", "grpo"), ("none", "dr_grpo")])
def test_advantages_equal_trl(scale_rewards, method):
    rewards = torch.cat([_randn(70, shape=(3, 4)), torch.full((1, 4), 0.5, dtype=torch.float64)])
    trl = _trl_advantages(rewards.reshape(-1), 4, scale_rewards)
    assert_close(group_advantages(rewards, method).reshape(-1), trl, atol=ATOL, rtol=0)


_TRL_LOSS_TYPES = {
    "grpo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dapo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING)
@pytest.mark.parametrize("loss_type", list(_TRL_LOSS_TYPES))
def test_loss_equals_trl(loss_type, level, kl):
    """Our loss, its gradient and clip fraction equal TRL 1.16's where the definitions agree.

    Where they differ (not compared here, or compared as a difference):
    - loss_type "grpo" takes ``.mean()`` over all B rows, a fully masked row counting as 0;
      seq_mean_token_mean averages over rows with a counted token. Equal without empty rows
      (used here); with one, TRL's is ours · (non-empty rows / B) (checked below).
    - TRL multiplies by the mask, so nan/inf in padding would poison its loss (finite padding
      here); we select with ``torch.where``. TRL does not clamp log ratios; we clamp at ±20.
    - TRL's sequence-level clip metrics count rows; our clip_fraction counts tokens.
    - TRL's dapo normaliser is the generation batch's token count rescaled per process and
      accumulation step; our ``*_sum`` forms give the same global token mean when combined.
    - Same KL (k3, added per token with beta, gradient through logprobs); TRL's optional
      use_bias_correction_kl (k3 · ratio), delta, vLLM IS correction and entropy/off-policy
      masks have no counterpart. Advantages: same (r - mean) / (std + 1e-4), unbiased std; TRL's
      scale_rewards="batch", nan (unscorable) rewards and multi-objective modes have none.
    """
    logp, old, adv, mask, ref = _inputs(80, nan_padding=False, empty_row=loss_type != "grpo")
    kwargs = _kwargs(_TRL_LOSS_TYPES[loss_type], level, kl)
    ours_lp = logp.clone().requires_grad_(True)
    trl_lp = logp.clone().requires_grad_(True)
    ours, stats = grpo_loss(ours_lp, old, adv, mask, ref_logprobs=ref if kl else None, **kwargs)
    trl, trl_clip = _trl_loss(
        trl_lp, old, adv, mask, loss_type, level, 0.2, 0.28, kwargs["kl_beta"], ref, kwargs["max_tokens"]
    )
    assert_close(ours, trl, atol=ATOL, rtol=0)
    (ours_grad,) = torch.autograd.grad(ours, ours_lp)
    (trl_grad,) = torch.autograd.grad(trl, trl_lp)
    assert_close(ours_grad, trl_grad, atol=ATOL, rtol=0)
    if level == "token":
        assert_close(stats["clip_fraction"], trl_clip)
    if loss_type == "grpo":
        logp, old, adv, mask, ref = _inputs(80, nan_padding=False, empty_row=True)
        ours, _ = grpo_loss(logp, old, adv, mask, ref_logprobs=ref if kl else None, **kwargs)
        trl, _ = _trl_loss(logp, old, adv, mask, "grpo", level, 0.2, 0.28, kwargs["kl_beta"], ref, None)
        assert_close(trl, ours * (B - 1) / B, atol=ATOL, rtol=0)
