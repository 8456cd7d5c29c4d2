"""BitFit: train only the biases of the base (seed 004's menu).

Each targeted module with a bias gets a trainable delta [out] (zeros at start) that a forward hook
adds to its output, which is exactly training that bias: for Linear / LayerNorm the delta is added
on the last dim, for Conv1d/2d on the channel dim. Keeping deltas per adapter name, instead of
editing the base's biases in place, keeps the base intact as the reference model. Trainable
parameters = the number of bias entries of the targeted modules.

Llama blocks have no biases, so on Llama 3.2 Vision only the vision tower, the projector and the
norms of the vision encoder carry any (preset `all` or `vision`; `language` finds none).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from alignment.adapters.base import OwnAdapters

SCOPES = {
    "language": r".*language_model\..*",
    "cross_attention": r".*(cross_attn|multi_modal_projector).*",
    "vision": r".*(vision_model|vision_tower|visual)\..*",
    "multimodal": r".*(cross_attn|multi_modal_projector|vision_model|vision_tower|visual).*",
    "all": r".*",
}


def _key(name: str) -> str:
    return name.replace(".", "__")


class BitFitAdapters(OwnAdapters):
    method = "bitfit"
    peft_type = "BITFIT"

    def add(self, name: str, spec) -> list[str]:
        modules = dict(self.model.named_modules())
        pattern = re.compile(SCOPES[spec.preset])
        targets = spec.target_modules or sorted(
            n for n, m in modules.items()
            if pattern.fullmatch(n) and isinstance(getattr(m, "bias", None), torch.Tensor)
            and isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d)))
        if not targets:
            raise ValueError(f"bitfit preset {spec.preset!r}: no module with a bias in {type(self.model).__name__} "
                             "(Llama blocks have none); use preset all or vision")
        device = next(self.model.parameters()).device
        deltas = nn.ParameterDict({_key(t): nn.Parameter(torch.zeros(modules[t].bias.shape, device=device))
                                   for t in targets})
        self.adapters[name] = nn.ModuleDict({"bias": _Holder(deltas)})
        self.configs[name] = {"preset": spec.preset, "target_modules": targets}
        for target in targets:
            if target not in self._hooked:
                modules[target].register_forward_hook(self._hook(target))
                self._hooked.add(target)
        return targets

    def _hook(self, target: str):
        def hook(module, args, output):
            if self.active is None or self.active not in self.adapters:
                return None
            delta = self.adapters[self.active]["bias"].deltas[_key(target)]
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                delta = delta.view(-1, *([1] * (output.dim() - 2)))
            return output + delta.to(output.dtype)
        return hook

    def touches_vision(self, name: str) -> bool:
        return any(re.search(r"vision_model|vision_tower|multi_modal_projector|(^|\.)visual\.", t)
                   for t in self.configs[name]["target_modules"])


class _Holder(nn.Module):
    def __init__(self, deltas: nn.ParameterDict):
        super().__init__()
        self.deltas = deltas
