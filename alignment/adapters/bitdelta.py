"""BitDelta adapters: fine-tunes served as 1-bit deltas beside one base (`alignment/bitdelta.py`).

Each named adapter holds, per targeted linear [out, in], the packed signs of its fine-tune's delta
(`signs` [out, ceil(in/8)] uint8, a buffer) and its scale (`scale`, float32, the only parameter: []
per matrix as the paper, or [out] per row); a forward hook on the linear adds `(x @ sign^T) * scale`
to the base's output. A saved adapter's scales decide the granularity when it is loaded. The base weights are never
touched, so the base may stay 4-bit, and several adapters (several fine-tunes, one per tenant) share it:
`set_active` switches between them, `None` is the bare base.

They are made by `vlm-align compress` from a trained stage (`from_deltas`); a stage does not train one.
The signs are unpacked in each forward (no dense copy is kept): memory stays at 1 bit per weight.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from alignment.adapters.base import OwnAdapters
from alignment.adapters.spec import LoraSpec, resolve_preset
from alignment.bitdelta import SCALES, bitdelta_linear, compress


def _key(name: str) -> str:
    return name.replace(".", "__")


class OneBitDelta(nn.Module):
    """One linear's 1-bit delta: signs [out, ceil(in/8)] uint8 (buffer) and scale [] or [out] (parameter)."""

    def __init__(self, out_features: int, in_features: int, device=None, scales: str = "matrix"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("signs", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        self.scale = nn.Parameter(torch.zeros(() if scales == "matrix" else (out_features,), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> the delta's output [..., out]."""
        return bitdelta_linear(x, self.signs, self.scale, self.in_features)


class BitDeltaAdapters(OwnAdapters):
    method = "bitdelta"
    peft_type = "BITDELTA"

    def add(self, name: str, spec, scales: str = "matrix") -> list[str]:
        """Empty 1-bit deltas (all signs -1, scales 0: the base) on `spec.target_modules`, else on the
        linears of `spec.preset`; `load_state_of` or `set_delta` fills them."""

        if scales not in SCALES:
            raise ValueError(f"bitdelta scales must be one of {SCALES}, got {scales!r}")

        modules = dict(self.model.named_modules())
        targets = list(spec.target_modules or resolve_preset(self.model, spec.preset))
        missing = [t for t in targets if t not in modules or not hasattr(modules[t], "in_features")]
        if missing:
            raise ValueError(f"bitdelta: no linear module {missing[:3]} in {type(self.model).__name__}")
        device = next(self.model.parameters()).device
        self.adapters[name] = nn.ModuleDict({
            _key(t): OneBitDelta(modules[t].out_features, modules[t].in_features, device, scales) for t in targets})
        self.configs[name] = {"preset": spec.preset, "target_modules": targets, "scales": scales}
        for target in targets:
            if target not in self._hooked:
                modules[target].register_forward_hook(self._hook(target))
                self._hooked.add(target)
        return targets

    def from_deltas(self, name: str, deltas: dict[str, torch.Tensor], scales: str = "matrix") -> list[str]:
        """Adapter `name` from dense deltas {module name: [out, in]}: signs packed, scales at mean |delta|
        (per matrix, or per row)."""
        targets = self.add(name, LoraSpec(method=self.method, target_modules=sorted(deltas)), scales)
        for target in targets:
            self.set_delta(name, target, deltas[target])
        return targets

    def set_delta(self, name: str, target: str, delta: torch.Tensor) -> None:
        part = self.adapters[name][_key(target)]
        if tuple(delta.shape) != (part.out_features, part.in_features):
            raise ValueError(f"bitdelta {target}: delta {tuple(delta.shape)}, linear "
                             f"{(part.out_features, part.in_features)}")
        signs, scale = compress(delta.to(part.signs.device), "matrix" if part.scale.dim() == 0 else "row")
        with torch.no_grad():
            part.signs.copy_(signs)
            part.scale.copy_(scale)

    def load_state_of(self, name: str, state: dict[str, torch.Tensor], source: str = "<state>") -> None:
        """As `OwnAdapters.load_state_of`, the saved scales' shape ([] or [out]) setting the granularity."""
        row = any(k.endswith(".scale") and v.dim() == 1 for k, v in state.items())
        if row != (self.configs[name]["scales"] == "row"):
            for part in self.adapters[name].values():
                shape = (part.out_features,) if row else ()
                part.scale = nn.Parameter(torch.zeros(shape, device=part.signs.device),
                                          requires_grad=part.scale.requires_grad)
            self.configs[name]["scales"] = "row" if row else "matrix"
        super().load_state_of(name, state, source)

    def save(self, name: str, folder) -> None:
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        super().save(name, Path(folder))

    def scales_of(self, name: str) -> dict[str, nn.Parameter]:
        """{module name: scale parameter} of adapter `name`."""
        return {t: self.adapters[name][_key(t)].scale for t in self.configs[name]["target_modules"]}

    def shapes_of(self, name: str) -> dict[str, tuple[int, int]]:
        """{module name: (out, in)} of adapter `name`."""
        return {t: (p.out_features, p.in_features) for t, p in
                ((t, self.adapters[name][_key(t)]) for t in self.configs[name]["target_modules"])}

    def _hook(self, target: str):
        key = _key(target)

        def hook(module, args, output):
            if self.active is None or self.active not in self.adapters or key not in self.adapters[self.active]:
                return None
            return output + self.adapters[self.active][key](args[0].to(output.dtype))
        return hook

    def touches_vision(self, name: str) -> bool:
        return any(re.search(r"vision_model|vision_tower|multi_modal_projector|(^|\.)visual\.", t)
                   for t in self.configs[name]["target_modules"])
