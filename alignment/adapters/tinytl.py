"""TinyTL (Cai et al. 2020; seed 004's menu): a lite residual branch beside each block, and the biases;
the block's weights stay frozen.

TinyTL's point is memory, not parameters: a frozen weight needs no stored activation to train its
bias (the bias gradient is the output gradient), and the new capacity comes from a lite residual
module on each block's input, narrow and with its own small activations: downsample, group conv,
group norm, ReLU (whose backward keeps a 1-bit mask), 1x1 conv, upsample. For a transformer the
block is a decoder (or vision encoder) layer and the feature map a token's hidden vector, so the
branch is a low-width residual MLP, per token::

    y = F(x) + s * R(x)                          x [..., c] the block's input, F(x) its output
    R(x) = W_u ReLU(GN_k(W_d x + b_d)) + b_u     W_d [d, c], b_d [d], GN_k: GroupNorm(k groups, d), W_u [c, d], b_u [c]

(d = `dim`, k = `groups`, s = `scale`; dropout on x with `dropout`). Per token, because a sequence
"downsample" would mix future tokens into causal ones and a token conv would need its own decode
cache. W_u and b_u start at zero: a fresh branch adds nothing (the base's outputs, exactly). One
branch holds 2*c*d + 3*d + c parameters. The biases: every Linear / LayerNorm / Conv bias inside the
targeted blocks gets a trainable delta (as `adapters.bitfit`). Llama blocks (Mllama's and LLaVA's text
layers) have no bias, so there the branches alone train; Qwen2's q/k/v projections and the vision
towers' layers have biases.

Blocks per preset: `language` every text decoder layer (Mllama's cross-attention layers included),
`cross_attention` Mllama's cross-attention layers, `vision` the vision encoder's layers, `multimodal`
both of those, `all` text and vision layers; `target_modules` names blocks exactly.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from alignment.adapters.base import OwnAdapters
from alignment.adapters.prefix import text_decoder

VISION_BLOCK = r".*(vision_model|vision_tower|visual)\..*(layers|blocks)\.\d+"
VISION = r"vision_model|vision_tower|multi_modal_projector|(^|\.)visual\."
PRESETS = {"language": ("language",), "cross_attention": ("cross",), "vision": ("vision",),
           "multimodal": ("cross", "vision"), "all": ("language", "vision")}


def lite_residual_parameter_count(width: int, dim: int) -> int:
    """One branch on a block of width c: W_d, b_d, the group norm's weight and bias, W_u, b_u."""
    return 2 * width * dim + 3 * dim + width


class LiteResidual(nn.Module):
    """R(x) = scale * (W_u ReLU(GroupNorm(W_d x + b_d)) + b_u); x [..., width] -> [..., width]."""

    def __init__(self, width: int, dim: int, groups: int, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if dim % groups:
            raise ValueError(f"tinytl dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.scale = dim, scale
        self.down = nn.Linear(width, dim)
        self.norm = nn.GroupNorm(groups, dim)
        self.up = nn.Linear(dim, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.dropout(x.to(self.down.weight.dtype)))  # [..., d]
        h = self.norm(h.reshape(-1, self.dim)).reshape(h.shape)
        return (self.scale * self.up(F.relu(h))).to(x.dtype)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _width(block: nn.Module) -> int:
    for sub in block.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError(f"{type(block).__name__} has no linear layer to read its width from")


def blocks_of(model: nn.Module, preset: str) -> list[str]:
    """The full names of the blocks a preset puts a branch beside, in model order."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = PRESETS[preset]
    found: list[str] = []
    if "language" in parts or "cross" in parts:
        try:
            layers = text_decoder(model).layers
        except ValueError:
            layers = []
        found += [names[id(layer)] for layer in layers if "language" in parts or hasattr(layer, "cross_attn")]
    if "vision" in parts:
        pattern = re.compile(VISION_BLOCK)
        found += [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    return found


class TinyTLAdapters(OwnAdapters):
    """Named TinyTL sets over one model: adapters[name] = {branch: {block: LiteResidual}, bias: deltas}."""

    method = "tinytl"
    peft_type = "TINYTL"

    def add(self, name: str, spec) -> list[str]:
        from alignment.errors import ConfigError

        modules = dict(self.model.named_modules())
        blocks = list(spec.target_modules or blocks_of(self.model, spec.preset))
        if not blocks:
            raise ConfigError(f"lora.method: tinytl preset {spec.preset!r} finds no block in "
                              f"{type(self.model).__name__}; use preset language or all")
        missing = [b for b in blocks if b not in modules]
        if missing:
            raise ConfigError(f"lora.method: tinytl blocks not in {type(self.model).__name__}: {missing[:3]}")
        biased = sorted(f"{block}.{n}" if n else block for block in blocks for n, m in modules[block].named_modules()
                        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d))
                        and isinstance(getattr(m, "bias", None), torch.Tensor))
        device = next(self.model.parameters()).device
        branch = nn.ModuleDict({_key(b): LiteResidual(_width(modules[b]), spec.dim, spec.groups, spec.scale,
                                                      spec.dropout) for b in blocks})
        deltas = nn.ParameterDict({_key(t): nn.Parameter(torch.zeros(modules[t].bias.shape)) for t in biased})
        self.adapters[name] = nn.ModuleDict({"branch": branch, "bias": _Holder(deltas)}).to(device)
        self.configs[name] = {"dim": spec.dim, "groups": spec.groups, "scale": spec.scale, "dropout": spec.dropout,
                              "preset": spec.preset, "target_modules": blocks, "biases": biased}
        for block in blocks:
            if block not in self._hooked:
                modules[block].register_forward_hook(self._block_hook(block), with_kwargs=True)
                self._hooked.add(block)
        for target in biased:
            if target not in self._hooked:
                modules[target].register_forward_hook(self._bias_hook(target))
                self._hooked.add(target)
        return blocks

    def _live(self) -> nn.ModuleDict | None:
        return self.adapters[self.active] if self.active is not None and self.active in self.adapters else None

    def _block_hook(self, block: str):
        def hook(module, args, kwargs, output):
            adapter = self._live()
            if adapter is None or _key(block) not in adapter["branch"]:
                return None
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("hidden_state"))
            residual = adapter["branch"][_key(block)](x)
            if isinstance(output, tuple):
                return (output[0] + residual, *output[1:])
            return output + residual
        return hook

    def _bias_hook(self, target: str):
        def hook(module, args, output):
            adapter = self._live()
            if adapter is None or _key(target) not in adapter["bias"].deltas:
                return None
            delta = adapter["bias"].deltas[_key(target)]
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                delta = delta.view(-1, *([1] * (output.dim() - 2)))
            return output + delta.to(output.dtype)
        return hook

    def touches_vision(self, name: str) -> bool:
        return any(re.search(VISION, t) for t in self.configs[name]["target_modules"])


class _Holder(nn.Module):
    def __init__(self, deltas: nn.ParameterDict):
        super().__init__()
        self.deltas = deltas
