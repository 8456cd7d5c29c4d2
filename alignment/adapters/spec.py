"""What one adapter is (`LoraSpec`) and where a preset puts it on a model (`resolve_preset`).

Below the policy and every adapter method: it reads the preset and method tables (`alignment.presets`) and
the model's family (`alignment.models`), nothing above them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

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
    target_modules: list[str] | None = None  # exact module names; overrides the preset
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


def resolve_preset(model: nn.Module, preset: str) -> list[str]:
    """The exact, sorted names of the linear modules a LoRA preset targets in `model`."""
    if preset not in PRESETS:
        raise ValueError(f"lora preset must be one of {PRESETS}, got {preset!r}")
    pattern = re.compile(family_of(model).PRESET_PATTERNS[preset])
    # A module LoRA already wraps keeps its name (its linear moves to `.base_layer`).
    names = [
        n for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or hasattr(m, "base_layer")) and "lora_" not in n
        and not n.endswith(".base_layer") and pattern.fullmatch(n)
    ]
    if not names:
        raise ValueError(f"lora preset {preset!r} matches no linear module of {type(model).__name__}")
    return sorted(names)
