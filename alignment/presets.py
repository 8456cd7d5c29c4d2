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
