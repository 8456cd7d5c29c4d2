"""The adapter registry of a `MultimodalPolicy`: add, switch, freeze, and the reference role.

One base serves every role of post-training as named adapters: the actor / policy (`policy`), the
reference (`reference()`: a frozen copy of the adapter a stage started from, else the bare base), the critic
and the reward model (their own adapters plus a scalar head each). Adapters are LoRA by default; their
`LoraSpec.method` picks another of the menu (`alignment.adapters.menu`). Several named adapters coexist when
they are of one kind (all PEFT of one type, or all of one own method); base weights trained in full (the
`projector` stage's) sit under any of them.

A mixin of `MultimodalPolicy`: it reads and writes `self.model` (the base, wrapped by PEFT once a PEFT adapter
is added), `self.own` (own-method adapter sets), `self.heads`, `self.adapter_methods`, `self.adapter_specs`,
`self.trainable_adapters` and `self.active_adapter`.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from alignment.adapters.menu import PEFT_METHODS, TUNER_PARAM, check_method, own_adapters_class, peft_config
from alignment.adapters.spec import LoraSpec, resolve_preset, resolve_targets

REFERENCE = "reference"
PEFT_TYPES = {"ia3": "IA3", "loha": "LOHA"}  # menu method -> PEFT's peft_type where it is not LORA


def adapter_kind(method: str) -> str:
    """What must agree between adapters on one base: the PEFT type, or the own method."""
    return f"peft:{PEFT_TYPES.get(method, 'LORA')}" if method in PEFT_METHODS else method


class AdapterRoles:
    """Named adapters and heads on one base; see the module docstring."""

    def _output_head_name(self) -> str:
        """The module name of the vocabulary projection (lm_head)."""
        head = self.base_model.get_output_embeddings()
        names = [n for n, m in self.base_model.named_modules() if m is head or getattr(m, "base_layer", None) is head]
        if not names:
            raise ValueError(f"{type(self.base_model).__name__} has no output head to adapt (lora.lm_head)")
        return names[0]

    def add_adapter(self, name: str, spec: LoraSpec, trainable: bool = True, head: bool = False) -> list[str]:
        """Add an adapter of `spec.method` (and optionally a scalar head); returns the targeted module
        names. Refuses (ValueError) a method the base cannot run, and mixing kinds of adapters."""
        if name in self.adapter_methods:
            raise ValueError(f"adapter {name!r} exists already")
        method = spec.method
        if method != "base_weights":
            check_method(method, self.quantization)
            kinds = {adapter_kind(m) for n, m in self.adapter_methods.items() if m != "base_weights"}
            if kinds - {adapter_kind(method)}:
                raise ValueError(f"adapter {name!r} ({method}) cannot join adapters {self.adapters} of another "
                                 f"kind ({sorted(kinds)}): one model holds adapters of one PEFT type or one own method")
        if method in PEFT_METHODS:
            targets = (resolve_targets(self.base_model, spec.target_modules) if spec.target_modules
                       else resolve_preset(self.base_model, spec.preset))
            if spec.lm_head:
                targets = sorted({*targets, self._output_head_name()})
            self._add_peft(name, peft_config(spec, targets))
        else:
            if method not in self.own:
                self.own[method] = own_adapters_class(method)(self.base_model)
            targets = self.own[method].add(name, spec)
        self.adapter_methods[name] = method
        self.adapter_specs[name] = spec
        if trainable:
            self.trainable_adapters.add(name)
        if head:
            self.heads[name] = nn.Linear(self.hidden_size, 1, dtype=torch.float32, device=self.device)
            nn.init.normal_(self.heads[name].weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
            nn.init.zeros_(self.heads[name].bias)
        self.set_adapter(name)
        return targets

    def _add_peft(self, name: str, config) -> None:
        from peft import get_peft_model

        if hasattr(self.model, "peft_config"):
            self.model.add_adapter(name, config)
        else:
            self.model = get_peft_model(self.model, config, adapter_name=name)

    def _own_of(self, name: str):
        method = self.adapter_methods.get(name)
        return self.own[method] if method in self.own else None

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {})) + [n for own in self.own.values() for n in own.names]

    def set_adapter(self, name: str) -> None:
        """Make `name` the adapter that forwards use; trainability of every adapter is kept
        (lora_fa's A stays frozen; base weights are always on)."""
        method = self.adapter_methods.get(name, "lora")
        if method != "base_weights":
            if name in getattr(self.model, "peft_config", {}):
                self.model.set_adapter(name)
            for own in self.own.values():
                own.set_active(name if name in own.names else None)
        self.active_adapter = name
        for param_name, param in self.model.named_parameters():
            match = TUNER_PARAM.search(param_name)
            if match:
                adapter = match.group(2)
                frozen_a = self.adapter_methods.get(adapter) == "lora_fa" and match.group(1) == "lora_A"
                param.requires_grad_(adapter in self.trainable_adapters and not frozen_a)
        for own in self.own.values():
            for adapter in own.names:
                for param in own.parameters_of(adapter):
                    param.requires_grad_(adapter in self.trainable_adapters)

    def freeze_adapter(self, name: str) -> None:
        """Stop training adapter `name` (its weights stay in use)."""
        self.trainable_adapters.discard(name)
        if self.active_adapter is not None:
            self.set_adapter(self.active_adapter)

    @contextmanager
    def use_adapter(self, name: str):
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            if previous is not None:
                self.set_adapter(previous)

    @contextmanager
    def reference(self):
        """The reference model: the frozen `reference` adapter when one exists (a copy of the
        adapter a stage started from, e.g. SFT's for DPO), else every adapter off (the base)."""
        if REFERENCE in self.adapters:
            with self.use_adapter(REFERENCE):
                yield self
            return
        with ExitStack() as stack:
            if hasattr(self.model, "disable_adapter"):
                stack.enter_context(self.model.disable_adapter())
            for own in self.own.values():
                stack.enter_context(own.disabled())
            yield self

    def freeze_reference(self, source: str) -> None:
        """Make a frozen `reference` adapter holding a copy of adapter `source`."""
        if REFERENCE not in self.adapters:
            if source in getattr(self.model, "peft_config", {}):
                self.model.add_adapter(REFERENCE, self.model.peft_config[source])
                self.adapter_methods[REFERENCE] = self.adapter_methods.get(source, "lora")
            else:
                self.add_adapter(REFERENCE, self.adapter_specs[source], trainable=False)
            self.set_adapter(source)
        self.copy_adapter(source, REFERENCE)

    def reference_adapter(self) -> str | None:
        """The adapter `reference()` runs under: the frozen `reference` copy, else None (the bare base)."""
        return REFERENCE if REFERENCE in self.adapters else None

    @property
    def vision_is_adapted(self) -> bool:
        """True when any adapter touches the vision tower or projector (features then differ per adapter)."""
        return any(self.vision_adapted_by(name) for name in self.adapters)

    def vision_adapted_by(self, name: str | None) -> bool:
        """True when adapter `name` touches the vision tower or projector, so that image features under
        it differ from the bare base's (None: no adapter, the base). Base weights trained in full (the
        projector stage's) sit under every adapter and do not make one adapter's features differ."""
        if name is None:
            return False
        vision = self.family.VISION_PATTERN
        for param_name, _ in self.model.named_parameters():
            match = TUNER_PARAM.search(param_name)
            if match and match.group(2) == name and re.search(vision, param_name):
                return True
        own = self._own_of(name)
        return own is not None and self.adapter_methods.get(name) != "base_weights" and own.touches_vision(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter's and head's parameters, trained or frozen (not the base's)."""
        segments = tuple(f".{name}." for name in self.adapters)
        return [p for n, p in self.named_parameters()
                if n.startswith("heads.") or p.requires_grad or any(s in f".{n}." for s in segments)]
