"""Seed 003's Bottleneck Adapter (eq. 1-2) and its SwiGLU visual adapter (eq. 3).

Bottleneck Adapter, placed before each attention and MLP block (LaVIN's placement: on the block's
input, after its norm), with no non-linearity::

    g(Z) = Z + s * psi_u(psi_d(Z))                       Z [..., c]
    psi_d(Z) = Z W_d + b_d                                W_d [c, d], b_d [d]       (dense)
    psi_u(Z') = [Z'_1 W_1, ..., Z'_k W_k] + b_u           Z'_i [..., d/k], W_i [d/k, c/k], b_u [c]

psi_u is group-wise (a grouped 1x1 convolution, as LaVIN's RepAdapter), so one adapter holds

    params(c, d, k) = c*d + d + c*d/k + c

trainable parameters, and an adapter set over sites of widths c_1..c_n holds the sum of those.
W_u and both biases start at zero, so a fresh adapter is the identity. s (`scale`) is fixed.

Visual adapter (eq. 3), the "visual neck" that maps image features V [..., d_in] to the language
model's width c in place of the model's projector::

    V' = SwiGLU(V W_v + b_v) W_t + b_t      W_v [d_in, 2*d_v], W_t [d_v, c]
    SwiGLU([a, b]) = silu(a) * b            a, b [..., d_v]

with params = d_in*2*d_v + 2*d_v + d_v*c + c. The seed uses it for LLaVA-style models (features as
tokens); on Mllama it replaces the projector in front of the cross-attention layers.

Adapters are kept per name (`policy`, `reference`, ...) in `BottleneckAdapters`, a module whose
hooks apply the active name's adapters (none: the bare base).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from alignment.adapters.base import OwnAdapters

# Sites (full module names) per preset; each regex matches Mllama and LLaVA alike.
_LANGUAGE = r".*language_model\.layers\.\d+\.(self_attn|cross_attn|mlp)"
_CROSS = r".*language_model\.layers\.\d+\.cross_attn"
_VISION = r".*(vision_model|vision_tower)\..*layers\.\d+\.(self_attn|mlp)"
SITE_PATTERNS = {
    "language": _LANGUAGE,
    "cross_attention": _CROSS,
    "vision": _VISION,
    "multimodal": f"({_CROSS}|{_VISION})",
    "all": f"({_LANGUAGE}|{_VISION})",
}
PROJECTOR = "multi_modal_projector"


def bottleneck_parameter_count(width: int, dim: int, groups: int) -> int:
    """Trainable parameters of one adapter on a block of width c: c*d + d + c*d/k + c."""
    return width * dim + dim + width * dim // groups + width


def visual_adapter_parameter_count(in_features: int, out_features: int, dim: int) -> int:
    """Trainable parameters of the SwiGLU visual adapter: d_in*2*d_v + 2*d_v + d_v*c + c."""
    return in_features * 2 * dim + 2 * dim + dim * out_features + out_features


class BottleneckAdapter(nn.Module):
    """g(Z) = Z + scale * psi_u(psi_d(Z)); Z [..., width] -> [..., width]."""

    def __init__(self, width: int, dim: int, groups: int, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if dim % groups or width % groups:
            raise ValueError(f"bottleneck dim ({dim}) and block width ({width}) must be divisible by groups ({groups})")
        self.width, self.dim, self.groups, self.scale = width, dim, groups, scale
        self.down = nn.Linear(width, dim)  # psi_d: W_d [dim, width] (torch layout), b_d [dim]
        self.up_weight = nn.Parameter(torch.zeros(groups, dim // groups, width // groups))  # W_1..W_k
        self.up_bias = nn.Parameter(torch.zeros(width))  # b_u
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dropout(z.to(self.down.weight.dtype))
        h = self.down(x)  # [..., d]
        h = h.unflatten(-1, (self.groups, self.dim // self.groups))  # [..., k, d/k]
        up = torch.einsum("...gi,gio->...go", h, self.up_weight).flatten(-2) + self.up_bias  # [..., c]
        return z + (self.scale * up).to(z.dtype)


class VisualAdapter(nn.Module):
    """V' = SwiGLU(V W_v + b_v) W_t + b_t; V [..., in_features] -> [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, dim: int):
        super().__init__()
        self.w_v = nn.Linear(in_features, 2 * dim)
        self.w_t = nn.Linear(dim, out_features)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        a, b = self.w_v(v.to(self.w_v.weight.dtype)).chunk(2, dim=-1)
        return self.w_t(F.silu(a) * b)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _width(module: nn.Module) -> int:
    """Input width of an attention or MLP block: its first linear layer's in_features."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError(f"{type(module).__name__} has no linear layer to read its width from")


class BottleneckAdapters(OwnAdapters):
    """Named Bottleneck Adapter sets over one model: adapters[name][site] (+ the visual adapter)."""

    method = "bottleneck"
    peft_type = "BOTTLENECK"

    def add(self, name: str, spec) -> list[str]:
        modules = dict(self.model.named_modules())
        pattern = re.compile(SITE_PATTERNS[spec.preset])
        sites = spec.target_modules or sorted(n for n in modules if pattern.fullmatch(n))
        if not sites:
            raise ValueError(f"bottleneck preset {spec.preset!r} matches no block of {type(self.model).__name__}")
        group = nn.ModuleDict({
            _key(site): BottleneckAdapter(_width(modules[site]), spec.dim, spec.groups, spec.scale, spec.dropout)
            for site in sites
        })
        targets = list(sites)
        if spec.visual_dim:
            projector = next((n for n in modules if n.endswith(PROJECTOR)), None)
            if projector is None:
                raise ValueError(f"{type(self.model).__name__} has no {PROJECTOR} for the visual adapter")
            linears = [m for m in modules[projector].modules() if isinstance(m, nn.Linear)]
            group[_key(projector)] = VisualAdapter(linears[0].in_features, linears[-1].out_features, spec.visual_dim)
            targets.append(projector)
        group.to(next(self.model.parameters()).device)
        self.adapters[name] = group
        self.configs[name] = {"dim": spec.dim, "groups": spec.groups, "scale": spec.scale, "dropout": spec.dropout,
                              "preset": spec.preset, "visual_dim": spec.visual_dim, "target_modules": targets}
        for site in targets:
            if site not in self._hooked:
                hook = self._visual_hook(site) if site.endswith(PROJECTOR) else self._block_hook(site)
                if site.endswith(PROJECTOR):
                    modules[site].register_forward_hook(hook)
                else:
                    modules[site].register_forward_pre_hook(hook, with_kwargs=True)
                self._hooked.add(site)
        return targets

    def _current(self, site: str) -> nn.Module | None:
        if self.active is None or self.active not in self.adapters:
            return None
        return self.adapters[self.active][_key(site)] if _key(site) in self.adapters[self.active] else None

    def _block_hook(self, site: str):
        def hook(module, args, kwargs):
            adapter = self._current(site)
            if adapter is None:
                return None
            if args:
                return (adapter(args[0]), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else "hidden_state"
            return args, {**kwargs, key: adapter(kwargs[key])}
        return hook

    def _visual_hook(self, site: str):
        def hook(module, args, output):
            adapter = self._current(site)
            return None if adapter is None else adapter(args[0]).to(output.dtype)
        return hook

    def touches_vision(self, name: str) -> bool:
        return any(re.search(r"vision_model|vision_tower|multi_modal_projector|(^|\.)visual\.", t)
                   for t in self.configs[name]["target_modules"])
