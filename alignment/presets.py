"""The names of the adapter presets and methods a recipe may pick: a table below the config, the policy and the
adapters, which all read it (it imports nothing of the project's).

A preset names where adapters go; each family (`alignment/models/<family>.py`, `PRESET_PATTERNS`) says which of
its linear modules that is. A method names what trains (the menu in `alignment/adapters/menu.py`).
"""

from __future__ import annotations

PRESETS = ("language", "cross_attention", "vision", "multimodal", "all")

PEFT_METHODS = ("lora", "qlora", "dora", "ia3", "loha", "lora_fa")  # built by PEFT
OWN_METHODS = ("bitfit", "prompt_tuning", "bottleneck", "prefix_tuning", "tinytl", "bitdelta", "full")  # built here
METHODS = PEFT_METHODS + OWN_METHODS

# A DPO stage's `loss_type` values (`alignment/stages/dpo.py` maps each to its loss) and those that need no
# reference model.
REFERENCE_PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "apo_zero", "apo_down", "bco_pair")
REFERENCE_FREE_PAIR_LOSSES = ("orpo", "simpo", "cpo", "sft")
PAIR_LOSSES = REFERENCE_PAIR_LOSSES + REFERENCE_FREE_PAIR_LOSSES


def loss_names(loss_type: str | list[str]) -> list[str]:
    """The loss types a `loss_type` value names (one, or a list)."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def needs_reference(loss_type: str | list[str]) -> bool:
    """True when any of the losses needs the reference's log-probs."""
    return any(name in REFERENCE_PAIR_LOSSES for name in loss_names(loss_type))
