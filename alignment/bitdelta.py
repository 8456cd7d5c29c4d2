"""BitDelta (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit"): a fine-tune's
weight delta, per linear, as its signs (one bit each) times one learned scale per matrix.

For a targeted linear with base weight W_base [out, in] and fine-tuned weight W_ft::

    delta     = W_ft - W_base                  (a LoRA adapter: delta = scaling * B @ A)
    delta_hat = alpha * sign(delta)            sign in {-1, +1} ([out, in]), alpha a scalar
    alpha_0   = mean(|delta|)                  the alpha that minimises ||delta - alpha * sign(delta)||_F

and the linear's forward adds alpha * x @ sign(delta)^T to the base's output, so the base itself stays
untouched (4-bit too) and several deltas can be served from one base (`adapters/bitdelta.py`).

`scales="row"` (not the paper's) keeps one alpha per output row instead, alpha_0[o] = mean_i |delta[o, i]|,
4 more bytes a row. On `sft_bookcover`'s LoRA delta (tiny-mllama) the per-matrix scales lose 0.145 test
exact match (0.73 vs 0.875) that longer or faster distillation does not win back; per-row scales lose
0.005 (`bench/bitdelta_covers.py`).

Scale distillation: the alphas alone (Adam) minimise the MSE between the logits of the base + 1-bit
deltas (student) and of the uncompressed fine-tune (teacher) on the stage's training data (the paper:
800 samples, lr 1e-4). Logits are compared where the stage's loss counts them (the positions
that predict a labelled token), which is where answers are scored.

Storage: signs packed 8 per byte along `in` (most significant bit first, as numpy.packbits; bit 1 is
+1, 0 is -1: sign(0) = -1), [out, ceil(in/8)] uint8, plus alpha as float32 (one, or one per row): about
1/16 of the bf16 delta's 2*out*in bytes (row scales: 1/16 + 2/in, 0.073 at in = 192).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # bit k of a byte, MSB first
BF16_BYTES = 2
SCALE_BYTES = 4  # alpha is kept as float32
SCALES = ("matrix", "row")  # one alpha per matrix (the paper's) or per output row


# ----------------------------------------------------------------------------- signs
def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """delta [out, in] -> packed [out, ceil(in/8)] uint8: bit 1 where delta > 0, MSB first; the last
    byte of a row is padded with zero bits when in % 8 != 0."""
    out_features, in_features = delta.shape
    bits = (delta > 0).to(torch.uint8)
    pad = -in_features % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    bits = bits.view(out_features, -1, 8)
    return (bits * _BITS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [out, ceil(in/8)] uint8 -> signs [out, in] of +-1 in `dtype` (the padding bits dropped)."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0  # [out, ceil(in/8), 8]
    bits = bits.flatten(-2)[:, :in_features]
    return bits.to(dtype) * 2 - 1


def initial_scale(delta: torch.Tensor, scales: str = "matrix") -> torch.Tensor:
    """alpha_0, the least-squares scale of sign(delta) (float32): mean(|delta|) [] per matrix, or
    mean_i |delta[o, i]| [out] per row."""
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {SCALES}, got {scales!r}")
    magnitude = delta.detach().float().abs()
    return magnitude.mean() if scales == "matrix" else magnitude.mean(dim=1)


def compress(delta: torch.Tensor, scales: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """delta [out, in] -> (packed signs [out, ceil(in/8)] uint8, alpha_0 [] or [out] float32)."""
    return pack_signs(delta), initial_scale(delta, scales)


def decompress(packed: torch.Tensor, scale: torch.Tensor, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """alpha * sign(delta): [out, in] in `dtype` (alpha [] or [out])."""
    return unpack_signs(packed, in_features, dtype) * scale.to(dtype).reshape(-1, 1)


def bitdelta_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The delta's share of a linear's output: (x @ sign^T) * alpha; x [..., in] -> [..., out] in x's dtype,
    alpha [] or [out] (a row's scale multiplies that output). Differentiable in `scale` (and x)."""
    return F.linear(x, unpack_signs(packed, in_features, x.dtype)) * scale.to(x.dtype)


# ----------------------------------------------------------------------------- sizes
def dense_bytes(shape: Sequence[int], bytes_per_value: int = BF16_BYTES) -> int:
    """Bytes of a dense [out, in] delta (bf16 by default)."""
    out_features, in_features = shape
    return out_features * in_features * bytes_per_value


def onebit_bytes(shape: Sequence[int], scales: str = "matrix") -> int:
    """Bytes of a 1-bit delta of [out, in]: the packed signs plus float32 scales (one, or one per row)."""
    out_features, in_features = shape
    return out_features * -(-in_features // 8) + SCALE_BYTES * (1 if scales == "matrix" else out_features)


def sizes(shapes: dict[str, Sequence[int]], scales: str = "matrix") -> dict[str, float]:
    """{"bf16_bytes", "onebit_bytes", "ratio"} over matrices of the given [out, in] shapes."""
    dense = sum(dense_bytes(s) for s in shapes.values())
    onebit = sum(onebit_bytes(s, scales) for s in shapes.values())
    return {"bf16_bytes": dense, "onebit_bytes": onebit, "ratio": onebit / max(1, dense)}


# ----------------------------------------------------------------------------- deltas
def weight_deltas(base: nn.Module, finetuned: nn.Module, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """A full fine-tune's deltas W_ft - W_base [out, in] (float32) of the linears named `targets`."""
    base_modules, ft_modules = dict(base.named_modules()), dict(finetuned.named_modules())
    return {t: (ft_modules[t].weight.detach().float() - base_modules[t].weight.detach().float()) for t in targets}


def adapter_deltas(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Every PEFT LoRA layer's delta of `adapter` in `model` (the transformers model under PEFT's
    wrappers), as {module name: scaling * B @ A [out, in] float32}. DoRA's magnitude is not a delta of this
    form: such an adapter is refused."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            if module.use_dora.get(adapter, False):
                raise ValueError(f"{name}: a DoRA adapter's update is not a weight delta scaling * B @ A")
            base = module.get_base_layer()
            if not hasattr(base, "in_features"):
                raise ValueError(f"{name}: BitDelta compresses linear layers, not {type(base).__name__}")
            with torch.no_grad():
                delta = module.get_delta_weight(adapter).float()
            if tuple(delta.shape) != (base.out_features, base.in_features):  # Conv1D-style (fan_in_fan_out)
                delta = delta.T
            deltas[name] = delta
    if not deltas:
        raise ValueError(f"no LoRA layer of adapter {adapter!r}")
    return deltas


# ----------------------------------------------------------------------------- distillation
def masked_logit_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over counted positions and the vocabulary of (student - teacher)^2: logits [B, W, V],
    mask [B, W] (1 where the position counts); float32."""
    diff = (student.float() - teacher.float()) ** 2 * mask[..., None].float()
    return diff.sum() / (mask.float().sum() * student.shape[-1]).clamp(min=1)


def logit_mse(student: Callable[[int], torch.Tensor], teachers: Sequence[torch.Tensor],
              masks: Sequence[torch.Tensor]) -> float:
    """The mean over batches of `masked_logit_mse(student(i), teachers[i], masks[i])`, without gradients."""
    with torch.no_grad():
        return sum(masked_logit_mse(student(i), t, m).item() for i, (t, m) in enumerate(zip(teachers, masks))) \
            / max(1, len(teachers))


def distil_scales(student: Callable[[int], torch.Tensor], teachers: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor], scales: Sequence[nn.Parameter], steps: int = 200,
                  lr: float = 1e-4) -> list[float]:
    """Scale distillation: Adam on `scales` only, step s on batch s % len(teachers), minimising
    `masked_logit_mse(student(i), teachers[i], masks[i])`. `student(i)` returns the base + 1-bit deltas'
    logits [B, W, V] of batch i with gradients to `scales`; `teachers[i]` the fine-tune's (no grad).
    Returns the loss of every step."""
    if not teachers:
        raise ValueError("scale distillation needs at least one batch")
    optimizer = torch.optim.Adam(list(scales), lr=lr)
    losses = []
    for step in range(steps):
        i = step % len(teachers)
        loss = masked_logit_mse(student(i), teachers[i], masks[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
