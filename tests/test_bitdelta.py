"""BitDelta's maths (`alignment/bitdelta.py`): sign packing in numpy.packbits' layout, the scale at
mean |delta|, the delta's forward, the bytes, and scale distillation reaching the least-squares scale."""

import numpy as np
import pytest
import torch
from torch import nn

from alignment.bitdelta import (
    bitdelta_linear,
    compress,
    decompress,
    dense_bytes,
    distil_scales,
    initial_scale,
    logit_mse,
    masked_logit_mse,
    onebit_bytes,
    pack_signs,
    sizes,
    unpack_signs,
    weight_deltas,
)


def test_hand_worked_row():
    """delta = [0.5, -0.25, 0, 1.0]: signs + - - + (sign(0) = -1) -> bits 1001 then 4 padding zeros
    -> 0b10010000 = 144; alpha_0 = (0.5 + 0.25 + 0 + 1.0) / 4 = 0.4375."""
    delta = torch.tensor([[0.5, -0.25, 0.0, 1.0]])
    packed, alpha = compress(delta)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[144]]
    torch.testing.assert_close(alpha, torch.tensor(0.4375))
    torch.testing.assert_close(decompress(packed, alpha, 4), torch.tensor([[0.4375, -0.4375, -0.4375, 0.4375]]))


def test_hand_worked_row_scales():
    """Per-row scales: rows [1, -3] and [0.5, 0.5] -> alpha_0 = [2, 0.5]; the delta's output on x = [1, 1]
    is [2*(1 - 1), 0.5*(1 + 1)] = [0, 1]."""
    delta = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    packed, alpha = compress(delta, "row")
    torch.testing.assert_close(alpha, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(decompress(packed, alpha, 2), torch.tensor([[2.0, -2.0], [0.5, 0.5]]))
    torch.testing.assert_close(bitdelta_linear(torch.ones(1, 2), packed, alpha, 2), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="scales must be one of"):
        compress(delta, "column")


@pytest.mark.parametrize("shape", [(5, 13), (4, 16), (1, 1), (3, 200)])
def test_pack_unpack_round_trip_in_numpys_layout(shape):
    delta = torch.randn(shape)
    packed = pack_signs(delta)
    assert packed.shape == (shape[0], -(-shape[1] // 8))
    np.testing.assert_array_equal(packed.numpy(), np.packbits((delta > 0).numpy(), axis=1))
    signs = unpack_signs(packed, shape[1], torch.float64)
    assert signs.dtype == torch.float64
    torch.testing.assert_close(signs, torch.where(delta > 0, 1.0, -1.0).double(), atol=0, rtol=0)


def test_initial_scale_is_the_least_squares_scale_of_the_signs():
    """d/dalpha ||delta - alpha*s||^2 = 0 at alpha = <delta, s>/<s, s> = sum|delta| / n = mean |delta|."""
    delta = torch.randn(32, 24, dtype=torch.float64)
    signs = torch.where(delta > 0, 1.0, -1.0).double()
    alpha = initial_scale(delta).double()
    torch.testing.assert_close(alpha, (delta * signs).sum() / signs.pow(2).sum())
    error = [(delta - a * signs).pow(2).sum() for a in (alpha * 0.99, alpha, alpha * 1.01)]
    assert error[1] < error[0] and error[1] < error[2]


def test_delta_forward_is_x_times_scaled_signs_transposed():
    delta, x = torch.randn(6, 10), torch.randn(3, 5, 10)
    packed, alpha = compress(delta)
    reference = x.double() @ (alpha.double() * torch.where(delta > 0, 1.0, -1.0).double()).T
    torch.testing.assert_close(bitdelta_linear(x, packed, alpha, 10).double(), reference, atol=1e-5, rtol=1e-5)


def test_one_bit_bytes_are_at_most_a_tenth_of_bf16():
    """tiny-mllama's q_proj [192, 192]: bf16 192*192*2 = 73,728 bytes; 1 bit: 192 * 24 + 4 = 4,612 (1/16)."""
    assert dense_bytes((192, 192)) == 73_728 and onebit_bytes((192, 192)) == 4_612
    table = sizes({"q": (192, 192), "up": (512, 192), "down": (192, 512), "odd": (7, 3)})
    assert table["onebit_bytes"] <= table["bf16_bytes"] / 10 and table["ratio"] == pytest.approx(1 / 16, rel=0.01)
    assert table["onebit_bytes"] == sum(onebit_bytes(s) for s in [(192, 192), (512, 192), (192, 512), (7, 3)])
    # per-row scales: + 4 bytes a row, 192 * 24 + 192 * 4 = 5,376 (0.073 of bf16)
    assert onebit_bytes((192, 192), "row") == 5_376
    assert sizes({"q": (192, 192), "down": (192, 512)}, "row")["ratio"] <= 0.1


def test_weight_deltas_of_a_full_fine_tune():
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    tuned = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned[1].weight.add_(0.5)
    deltas = weight_deltas(base, tuned, ["0", "1"])
    torch.testing.assert_close(deltas["0"], torch.zeros(3, 4))
    torch.testing.assert_close(deltas["1"], torch.full((2, 3), 0.5))


def test_masked_mse_counts_only_masked_positions():
    """Two positions, V = 2: (1-0)^2 + (3-0)^2 on the counted one -> 10 / 2 = 5; the other is ignored."""
    student = torch.tensor([[[1.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, False]])
    assert masked_logit_mse(student, torch.zeros(1, 2, 2), mask).item() == 5.0


def test_distillation_reaches_the_least_squares_scale_of_one_linear():
    """One linear: student y = (W + a*S) x, teacher y = (W + D) x; the MSE over the batch is least at
    a* = <D x, S x> / <S x, S x>, which is not mean |D| when the inputs' scales differ. Adam on `a` from mean |D|
    finds a* and the logit MSE falls."""
    torch.manual_seed(0)
    base = torch.randn(8, 12)
    delta = 0.1 * torch.randn(8, 12) * torch.linspace(3.0, 0.1, 12)  # large where the inputs are small
    x = torch.randn(64, 12) * torch.linspace(0.1, 3.0, 12)
    packed, alpha = compress(delta)
    scale = nn.Parameter(alpha.clone())
    teacher = [(x @ (base + delta).T)[None]]
    mask = [torch.ones(1, 64, dtype=torch.bool)]

    def student(i):
        return (x @ base.T + bitdelta_linear(x, packed, scale, 12))[None]

    signs = unpack_signs(packed, 12, torch.float64)
    sx, dx = x.double() @ signs.T, x.double() @ delta.double().T
    best = ((dx * sx).sum() / (sx * sx).sum()).item()
    assert abs(best - alpha.item()) > 0.05  # the distillation has something to find
    before = logit_mse(student, teacher, mask)
    losses = distil_scales(student, teacher, mask, [scale], steps=300, lr=2e-3)
    assert scale.item() == pytest.approx(best, abs=2e-3)
    assert logit_mse(student, teacher, mask) < before and losses[-1] < losses[0]
