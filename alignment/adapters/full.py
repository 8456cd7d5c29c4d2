"""`lora.method: full`: full-parameter fine-tuning as an adapter method - the base's own weights train.

Targets (regexes over parameter names, full match; only floating-point parameters):
preset `language` (the default) is the whole text decoder - embeddings, every layer (Mllama's
cross-attention layers and gates included), the final norm and the LM head; `cross_attention`,
`vision`, `multimodal`, `all` as BitFit's scopes; `spec.target_modules` (regexes) in place of the
preset. Trainable parameters = every element of the targeted tensors.

Named sets. The first set added (`policy`) starts as the base's current weights. A later one (DPO's
frozen `reference`, from `freeze_reference`) starts as a copy of the set in use and costs one copy
of the targeted weights. Every set covers the same parameters. The set in use (`active`) lives in
the model's parameters. The others are plain tensors. `set_active` swaps them in by exchanging
`param.data` (no copy), so an optimizer's state stays attached to the same `Parameter` objects. The
parameters train while a set that is trainable is active. Only one set of a model may train in a
stage: the loop refuses more (PPO's actor and critic sharing one model need a LoRA-family method, or
`separate_models`).

The bare base (`disabled()`: the reference when no `reference` set exists, e.g. DPO from the base)
is the weights the stage started from. It is not kept by default: SFT never needs it, and its copy
would cost as much as the weights. It is copied by `keep_start()`, which the loop calls before the
first update of a stage that compares against it. Otherwise the copy is made lazily at the first
`disabled()`, provided the weights have not changed since they were added or last loaded (tracked by
the parameters' version counters); after a change, `disabled()` raises. `drop_start()` frees it.

Refused on a 4-bit / 8-bit base (`menu.NOT_ON_4BIT`). Swapping needs whole parameters: under
DeepSpeed ZeRO-3 (partitioned parameters) a second set or the bare base is refused. Saved as an
adapter folder (`peft_type: FULL`): the targeted parameters by their full names.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from alignment.adapters.base import OwnAdapters

SCOPES = {
    "language": r"(.*\.)?(language_model|lm_head)\..*",
    "cross_attention": r".*(cross_attn|multi_modal_projector).*",
    "vision": r"(.*\.)?(vision_model|vision_tower|visual)\..*",
    "multimodal": r".*(cross_attn|multi_modal_projector).*|(.*\.)?(vision_model|vision_tower|visual)\..*",
    "all": r".*",
}
VISION = re.compile(r"vision_model|vision_tower|multi_modal_projector|(^|\.)visual\.")


class FullAdapters(OwnAdapters):
    method = "full"
    peft_type = "FULL"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._stored: dict[str | None, dict[str, torch.Tensor]] = {}  # sets not in use; None: the kept start
        self._versions: dict[str, int] | None = None  # parameter versions when the weights were added / loaded

    # ---- targets -----------------------------------------------------------------
    def _resolve(self, spec) -> list[str]:
        patterns = [re.compile(p) for p in spec.target_modules] if spec.target_modules else \
            [re.compile(SCOPES[spec.preset])]
        names = sorted(_plain(n) for n, p in self.model.named_parameters()
                       if p.is_floating_point() and any(q.fullmatch(_plain(n)) for q in patterns))
        if not names:
            raise ValueError(f"full fine-tuning: no floating-point parameter of {type(self.model).__name__} matches "
                             f"{spec.target_modules or spec.preset!r}")
        return names

    def _params(self) -> dict[str, nn.Parameter]:
        wanted = set(self.configs[self.names[0]]["parameters"])
        return {_plain(n): p for n, p in self.model.named_parameters() if _plain(n) in wanted}

    # ---- what a subclass provides ---------------------------------------------------
    def add(self, name: str, spec) -> list[str]:
        names = self._resolve(spec)
        if self.configs and names != self.configs[self.names[0]]["parameters"]:
            raise ValueError(f"full set {name!r} would cover other parameters than {self.names}: the sets of one model "
                             "share their parameters (use the same preset / target_modules)")
        targets = list(spec.target_modules) if spec.target_modules else None
        first = not self.configs
        self.configs[name] = {"preset": spec.preset, "target_modules": targets, "parameters": names}
        if first:
            self.active = name
            self._versions = self._current_versions()
        else:
            self._stored[name] = {k: p.detach().clone() for k, p in self._params().items()}
        return names

    def touches_vision(self, name: str) -> bool:
        return any(VISION.search(n) for n in self.configs[name]["parameters"])

    # ---- sets ------------------------------------------------------------------------
    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """The model's parameters while `name` is in use (they then hold its weights), else none."""
        return list(self._params().values()) if name == self.active else []

    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self._params()) if name == self.active else dict(self._stored[name])

    def load_state_of(self, name: str, state: dict[str, torch.Tensor], source: str = "<state>") -> None:
        super().load_state_of(name, state, source)
        if name == self.active:
            self._versions = self._current_versions()  # the loaded weights are what the stage starts from

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.configs:
            raise KeyError(f"no full adapter {name!r}; adapters: {self.names}")
        self._swap_in(name)

    @contextmanager
    def disabled(self):
        """The bare base: the weights the stage started from (see the module docstring)."""
        previous = self.active
        self._swap_in(None)
        try:
            yield
        finally:
            self._swap_in(previous)

    def _swap_in(self, target: str | None) -> None:
        """Make `target` (None: the bare base) the weights the parameters hold."""
        if not self.configs or target == self.active:
            return
        if target is None and None not in self._stored:
            if not self._unchanged():
                raise RuntimeError(
                    "full fine-tuning: the bare base (the weights this stage started from) was not kept, and the "
                    "weights have changed since; call keep_start() before the first update (the loop does so for "
                    "stages that compare against the bare base) or freeze_reference() for a reference set")
            self.keep_start()
        params = self._params()
        if any(hasattr(p, "ds_id") for p in params.values()):
            raise RuntimeError("full fine-tuning: swapping weight sets needs whole parameters, and DeepSpeed ZeRO-3 "
                               "partitions them; use ZeRO-2 or DDP for a stage with a reference")
        incoming, outgoing = self._stored.pop(target), {}
        for key, param in params.items():
            outgoing[key] = param.data
            param.data = incoming[key]
        self._stored[self.active] = outgoing
        self.active = target
        torch.clear_autocast_cache()  # casts cached under autocast belong to the weights swapped out

    # ---- the bare base ---------------------------------------------------------------
    @property
    def start_kept(self) -> bool:
        return None in self._stored or (bool(self.configs) and self.active is None)

    def keep_start(self) -> None:
        """Copy the weights now in use as the bare base (`disabled()`), unless a copy is kept already."""
        if not self.start_kept:
            self._stored[None] = {k: p.detach().clone() for k, p in self._params().items()}

    def drop_start(self) -> None:
        """Free the kept bare base (a set in use stays in use)."""
        if self.active is None and self.configs:
            self._swap_in(self.names[0])
        self._stored.pop(None, None)
        self._versions = self._current_versions()

    def _current_versions(self) -> dict[str, int]:
        return {k: p._version for k, p in self._params().items()}

    def _unchanged(self) -> bool:
        """Whether the first set is in use and no in-place update touched it since it was added or loaded."""
        return self.active == self.names[0] and self._versions == self._current_versions()


def _plain(name: str) -> str:
    """A base parameter's name without PEFT's `.base_layer` (as `base_weights` names them)."""
    return name.replace(".base_layer", "")
