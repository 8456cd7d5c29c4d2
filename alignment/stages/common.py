"""Small helpers the stages share."""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.policy import LoraSpec


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def lora_spec(config) -> LoraSpec:
    lora = config.lora
    return LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, preset=lora.preset)


def ensure_policy_adapter(policy, config, previous_adapter: Path | None, name: str = "policy") -> None:
    """Make `name` the trainable, active adapter: loaded from `config.init_adapter` or the previous
    stage's folder when given, kept when it exists already, else freshly initialised."""
    source = Path(config.init_adapter) if config.init_adapter else previous_adapter
    if source is not None and (name not in policy.adapters or config.init_adapter):
        policy.load_adapter(name, source, trainable=True)
    elif name not in policy.adapters:
        targets = policy.add_adapter(name, lora_spec(config))
        print(f"[{config.name}] LoRA on {len(targets)} modules ({config.lora.preset}): "
              f"{', '.join(targets[:4])}{' ...' if len(targets) > 4 else ''}; "
              f"{sum(p.numel() for p in policy.trainable_parameters()):,} trainable parameters")
    policy.trainable_adapters.add(name)
    policy.set_adapter(name)
