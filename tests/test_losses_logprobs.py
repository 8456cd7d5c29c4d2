"""Token log-probs and entropies: hand-worked numbers and a float64 loop reference."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from alignment.losses import entropy_from_logits, gather_logprobs, sequence_logprobs

LN3 = math.log(3.0)


def _ref_logprob(logit_row, token):
    """log softmax(logit_row)[token] with a plain-Python log-sum-exp."""
    top = max(logit_row)
    return logit_row[token] - (top + math.log(sum(math.exp(v - top) for v in logit_row)))


def _padded_batch(gen, b=6, t=7, v=11):
    """Logits, labels and a mask whose rows are left padded, right padded, one token, full, empty."""
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.zeros(b, t)
    mask[0, 3:] = 1  # left padded
    mask[1, 1:4] = 1  # right padded (prompt at 0)
    mask[2, 5] = 1  # one token
    mask[3, 1:] = 1  # everything that can be predicted
    mask[4, 0] = 1  # only the first token: nothing predicts it -> no log-prob
    labels = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    return logits, labels, mask


def test_hand_worked():
    """V = 2, T = 3. logits[0] = [0, ln 3] gives p = [1/4, 3/4]; logits[1] = [0, 0] gives [1/2, 1/2].

    labels = [*, 1, 0] with mask [0, 1, 1]: token 1 scores log(3/4) = -0.287682, token 2 scores
    log(1/2) = -0.693147; the sequence -0.980829. logits[2] predicts nothing.
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    token_lp, seq_lp = sequence_logprobs(logits, labels, mask)
    assert_close(token_lp, torch.tensor([[math.log(0.75), math.log(0.5)]]))
    assert_close(seq_lp, torch.tensor([math.log(0.375)]))
    assert_close(
        gather_logprobs(logits[0], torch.tensor([0, 1, 0])),
        torch.tensor([math.log(0.25), math.log(0.5), -math.log1p(math.exp(-10))]),
    )


def test_entropy_hand_worked():
    """Uniform over V = 4: ln 4 = 1.386294. p = [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -1e4, -1e4]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4.0), 0.562335]]), atol=1e-6, rtol=0)


def test_sequence_logprobs_against_loop_reference():
    gen = torch.Generator().manual_seed(1)
    logits, labels, mask = _padded_batch(gen)
    token_lp, seq_lp = sequence_logprobs(logits, labels, mask)
    assert token_lp.shape == (6, 6) and seq_lp.shape == (6,)
    for b in range(6):
        total = 0.0
        for t in range(6):
            expected = 0.0
            if mask[b, t + 1]:
                expected = _ref_logprob(logits[b, t].tolist(), int(labels[b, t + 1]))
            assert_close(token_lp[b, t].item(), expected)
            total += expected
        assert_close(seq_lp[b].item(), total)
    assert seq_lp[4].item() == 0.0 and seq_lp[5].item() == 0.0


def test_gather_and_entropy_against_loop_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64) * 4
    tokens = torch.randint(0, 9, (3, 4), generator=gen)
    got_lp, got_h = gather_logprobs(logits, tokens), entropy_from_logits(logits)
    for b in range(3):
        for t in range(4):
            row = logits[b, t].tolist()
            assert_close(got_lp[b, t].item(), _ref_logprob(row, int(tokens[b, t])))
            probs = [math.exp(_ref_logprob(row, k)) for k in range(9)]
            assert_close(got_h[b, t].item(), -sum(p * math.log(p) for p in probs))


def test_low_precision_logits_are_upcast():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 13, generator=gen) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 13, (2, 5), generator=gen)
    got = gather_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    assert_close(got, gather_logprobs(logits.float(), tokens))
    assert_close(entropy_from_logits(logits), entropy_from_logits(logits.float()))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=8), st.data())
def test_logprobs_finite_and_nonpositive_at_extremes(row, data):
    logits = torch.tensor(row, dtype=torch.float64).reshape(1, 1, -1)
    token = data.draw(st.integers(0, len(row) - 1))
    lp = gather_logprobs(logits, torch.tensor([[token]]))
    assert torch.isfinite(lp).all() and lp.item() <= 0.0
    h = entropy_from_logits(logits)
    assert torch.isfinite(h).all() and -1e-9 <= h.item() <= math.log(len(row)) + 1e-9


def test_logprobs_at_picks_like_log_softmax_and_repeats_a_position():
    """Picks (0, 1, token 3), (0, 1, token 4) (one position, two tokens) and (1, 0, token 0) against a
    float64 log_softmax; bf16 logits give the float32 log-probs of their upcast values."""
    from alignment.losses import logprobs_at

    logits = torch.randn(2, 3, 7)
    rows, positions, tokens = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), torch.tensor([3, 4, 0])
    expected = torch.log_softmax(logits.double(), -1)[rows, positions, tokens]
    torch.testing.assert_close(logprobs_at(logits, rows, positions, tokens).double(), expected)
    half = logits.bfloat16()
    expected = torch.log_softmax(half.double(), -1)[rows, positions, tokens]
    got = logprobs_at(half, rows, positions, tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
