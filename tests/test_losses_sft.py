"""SFT loss: hand-worked numbers, a float64 loop reference, gradcheck, exact token averaging."""

import math

import torch
from torch.testing import assert_close

from alignment.losses import sft_loss, sft_loss_sum

LN3 = math.log(3.0)


def _ref_nll(logit_row, token):
    top = max(logit_row)
    return (top + math.log(sum(math.exp(v - top) for v in logit_row))) - logit_row[token]


def _batch(gen, b=6, t=8, v=10, dtype=torch.float64):
    """Labels with left padding, right padding, one labelled token, all labelled, none labelled."""
    logits = torch.randn(b, t, v, generator=gen, dtype=dtype) * 2
    labels = torch.randint(0, v, (b, t), generator=gen)
    keep = torch.zeros(b, t, dtype=torch.bool)
    keep[0, 4:] = True
    keep[1, 2:5] = True
    keep[2, 6] = True
    keep[3, :] = True
    keep[5, 1:3] = True  # row 4 has none
    return logits, torch.where(keep, labels, torch.full_like(labels, -100))


def _loop_sums(logits, labels):
    total, count = 0.0, 0
    for b in range(logits.size(0)):
        for t in range(1, logits.size(1)):
            if labels[b, t] != -100:
                total += _ref_nll(logits[b, t - 1].tolist(), int(labels[b, t]))
                count += 1
    return total, count


def test_hand_worked():
    """V = 2, T = 3. logits[0] = [0, ln 3] (p = [1/4, 3/4]) predicts labels[1] = 1: -ln(3/4) = 0.287682.
    logits[1] = [0, 0] predicts labels[2] = 0: ln 2 = 0.693147. Mean over 2 tokens: 0.490415.
    labels[0] has no prediction and logits[2] predicts nothing, so neither counts.
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [9.0, -9.0]]])
    labels = torch.tensor([[0, 1, 0]])
    assert_close(sft_loss(logits, labels), torch.tensor(0.490415), atol=1e-6, rtol=0)
    nll_sum, count = sft_loss_sum(logits, labels)
    assert_close(nll_sum, torch.tensor(0.980829), atol=1e-6, rtol=0)
    assert count.item() == 2 and count.dtype == torch.int64
    # Ignoring the second label leaves only -ln(3/4).
    assert_close(sft_loss(logits, torch.tensor([[0, 1, -100]])), torch.tensor(-math.log(0.75)))


def test_against_float64_loop_reference():
    logits, labels = _batch(torch.Generator().manual_seed(0))
    total, count = _loop_sums(logits, labels)
    nll_sum, got_count = sft_loss_sum(logits, labels)
    assert got_count.item() == count
    assert_close(nll_sum.item(), total)
    assert_close(sft_loss(logits, labels).item(), total / count)


def test_custom_ignore_index_and_empty_batch():
    logits, labels = _batch(torch.Generator().manual_seed(1))
    relabelled = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    assert_close(sft_loss(logits, relabelled, ignore_index=-1), sft_loss(logits, labels))
    logits = logits.requires_grad_(True)
    empty = sft_loss(logits, torch.full_like(labels, -100))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradcheck():
    logits, labels = _batch(torch.Generator().manual_seed(2), v=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, labels), (logits,), fast_mode=True)


def test_split_batch_recombined_by_token_count_equals_whole_batch():
    """Two micro-batches (or two ranks) summing (nll, count) and dividing once give the whole
    batch's loss and gradient. The mean of the two per-half means does not (counts differ).
    """
    logits, labels = _batch(torch.Generator().manual_seed(3))
    logits.requires_grad_(True)
    whole = sft_loss(logits, labels)
    (grad_whole,) = torch.autograd.grad(whole, logits)

    s1, n1 = sft_loss_sum(logits[:2], labels[:2])
    s2, n2 = sft_loss_sum(logits[2:], labels[2:])
    total = n1 + n2  # what an all-reduce of the counts gives each rank
    combined = s1 / total + s2 / total  # each micro-batch backpropagates its share
    (grad_split,) = torch.autograd.grad(combined, logits)
    assert_close(combined, whole)
    assert_close(grad_split, grad_whole)
    naive = (sft_loss(logits[:2], labels[:2]) + sft_loss(logits[2:], labels[2:])) / 2
    assert abs(naive.item() - whole.item()) > 1e-3


def test_bfloat16_logits_are_upcast():
    logits, labels = _batch(torch.Generator().manual_seed(4), dtype=torch.float32)
    low = sft_loss(logits.to(torch.bfloat16), labels)
    assert low.dtype == torch.float32
    assert_close(low, sft_loss(logits.to(torch.bfloat16).float(), labels))
