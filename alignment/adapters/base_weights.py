"""`BaseWeights`: a named set of the base model's own parameters trained in full.

The `projector` stage (LLaVA's first phase) trains the multi-modal projector (and, for Mllama,
the cross-attention gates) of the base itself. Those weights are then part of the base every
later stage starts from and compares against (its reference), so `disabled()` leaves them on.
Saved as an adapter folder (`peft_type: BASE_WEIGHTS`, the parameters by their full names).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from alignment.adapters.base import OwnAdapters


class BaseWeights(OwnAdapters):
    method = "base_weights"
    peft_type = "BASE_WEIGHTS"
    multiple = False

    def add(self, name: str, spec) -> list[str]:
        """`spec.target_modules` are regexes over parameter names (full match)."""
        if self.configs:
            raise ValueError(f"base weights {self.names[0]!r} exist already; one set per model")
        patterns = [re.compile(p) for p in spec.target_modules or []]
        names = sorted(n for n in map(_plain, dict(self.model.named_parameters())) if any(p.fullmatch(n) for p in patterns))
        if not names:
            raise ValueError(f"no parameter of {type(self.model).__name__} matches {spec.target_modules}")
        self.configs[name] = {"target_modules": list(spec.target_modules), "parameters": names}
        return names

    def _params(self, name: str) -> dict[str, nn.Parameter]:
        wanted = set(self.configs[name]["parameters"])
        return {_plain(n): p for n, p in self.model.named_parameters() if _plain(n) in wanted}

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self._params(name).values())

    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self._params(name))

    def set_active(self, name: str | None) -> None:
        """Base weights are always on."""


def _plain(name: str) -> str:
    """A base parameter's name without PEFT's `.base_layer` (it moves there when LoRA wraps its module)."""
    return name.replace(".base_layer", "")
