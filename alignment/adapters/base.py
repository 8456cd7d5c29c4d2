"""`OwnAdapters`: named adapters that PEFT does not provide, kept beside the base model.

A subclass (Bottleneck, BitFit, prompt tuning, the projector's base weights) holds each named
adapter's parameters under `adapters[name]` and applies the `active` one through hooks on the
base model; `active = None` is the bare base (the reference model). Saved like a PEFT adapter:
`adapter_config.json` (with `peft_type` naming the method) and `adapter_model.safetensors`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class OwnAdapters(nn.Module):
    """Subclasses set `method` and `peft_type` and implement `add` (and hooks)."""

    method = ""
    peft_type = ""
    multiple = True  # several named adapters (policy, reference, ...) can coexist

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the base stays registered once, in the policy
        self.configs: dict[str, dict] = {}
        self.active: str | None = None
        self.adapters = nn.ModuleDict()  # name -> the adapter's modules / parameters
        self._hooked: set[str] = set()  # modules that already carry this method's forward hook

    # ---- what a subclass provides ----------------------------------------------
    def add(self, name: str, spec) -> list[str]:
        """Create adapter `name` from a `LoraSpec`; returns the targeted module names."""
        raise NotImplementedError

    def touches_vision(self, name: str) -> bool:
        return False

    # ---- shared -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters())

    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.adapters[name].state_dict())

    def load_state_of(self, name: str, state: dict[str, torch.Tensor], source: str = "<state>") -> None:
        own = self.state_of(name)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{self.method} adapter in {source} does not fit this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key].to(value.device, value.dtype))

    def copy(self, source: str, target: str) -> None:
        self.load_state_of(target, self.state_of(source))

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.configs:
            raise KeyError(f"no {self.method} adapter {name!r}; adapters: {self.names}")
        self.active = name

    @contextmanager
    def disabled(self):
        """The bare base: no adapter applied."""
        previous, self.active = self.active, None
        try:
            yield
        finally:
            self.active = previous

    def save(self, name: str, folder: Path) -> None:
        from alignment.files import save_safetensors

        config = {"peft_type": self.peft_type, "method": self.method, **self.configs[name]}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.state_of(name).items()}, folder / WEIGHTS_FILE)


def read_config(folder: Path) -> dict:
    """The adapter_config.json of an adapter folder ({} when absent)."""
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}
