"""What one adapter is (`LoraSpec`) and where a preset puts it on a model (`resolve_preset`).

Below the policy and every adapter method: it reads the preset and method tables (`alignment.presets`) and
the model's family (`alignment.models`), nothing above them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from alignment.errors import ConfigError
from alignment.models import family_of
from alignment.presets import METHODS, PRESETS


@dataclass
class LoraSpec:
    """Settings of one adapter: LoRA's, or another method's of the PEFT menu."""

    method: str = "lora"  # lora | qlora | dora | ia3 | loha | lora_fa | bitfit | prompt_tuning | bottleneck | prefix_tuning | tinytl | bitdelta | full
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    preset: str = "language"  # language | cross_attention | vision | multimodal | all
    target_modules: list[str] | str | None = None  # overrides the preset: names or a regex (PEFT methods: `resolve_targets`)
    lm_head: bool = False  # LoRA methods: also adapt the output head (the vocabulary projection)
    extra_trainable: list[str] = field(default_factory=list)  # regexes of base params trained in full
    dim: int = 16  # bottleneck: adapter dimension d
    groups: int = 2  # bottleneck: groups k of the up-projection
    scale: float = 1.0  # bottleneck: fixed scale s of the adapter's output
    visual_dim: int | None = None  # bottleneck: SwiGLU visual adapter width d_v (None: keep the projector)
    num_virtual_tokens: int = 8  # prompt_tuning, prefix_tuning: prompt / prefix length n
    prefix_projection: bool = False  # prefix_tuning: through PEFT's reparameterisation MLP (width dim)

    def __post_init__(self):
        if self.method not in METHODS + ("base_weights",):
            raise ValueError(f"adapter method must be one of {METHODS}, got {self.method!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"lora preset must be one of {PRESETS}, got {self.preset!r}")
        if self.r <= 0:
            raise ValueError(f"lora r must be positive, got {self.r}")


def _linear_names(model: nn.Module) -> list[str]:
    """The names of `model`'s linear modules (a module LoRA already wraps keeps its name: its linear moves to
    `.base_layer`)."""
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or hasattr(m, "base_layer")) and "lora_" not in n
            and not n.endswith(".base_layer")]


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The exact, sorted names of `model`'s linear modules that `targets` names, as PEFT reads `target_modules`:
    a list matches a module whose name is an entry or ends with `.entry`; a string is a regex over full names.
    `ConfigError` naming `lora.target_modules` when nothing matches."""
    names = _linear_names(model)
    if isinstance(targets, str):
        pattern = re.compile(targets)
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    if not found:
        example = next((n for n in names if "proj" in n), names[0] if names else "")
        raise ConfigError(f"lora.target_modules: {targets!r} matches no linear module of {type(model).__name__} "
                          f"(its names look like {example!r})")
    return sorted(found)


def resolve_preset(model: nn.Module, preset: str) -> list[str]:
    """The exact, sorted names of the linear modules a LoRA preset targets in `model`."""
    if preset not in PRESETS:
        raise ValueError(f"lora preset must be one of {PRESETS}, got {preset!r}")
    pattern = re.compile(family_of(model).PRESET_PATTERNS[preset])
    names = [n for n in _linear_names(model) if pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"lora preset {preset!r} matches no linear module of {type(model).__name__}")
    return sorted(names)
