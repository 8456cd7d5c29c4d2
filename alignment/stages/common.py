"""Small helpers the stages share."""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.policy import ADAPTER_FILE, LoraSpec

PROJECTOR_ADAPTER = "projector"  # the base weights a `projector` stage trains


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def lora_spec(config) -> LoraSpec:
    """The `LoraSpec` of a stage's `lora:` block (any method of the PEFT menu)."""
    lora = config.lora
    return LoraSpec(method=lora.method, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, preset=lora.preset,
                    target_modules=lora.target_modules, lm_head=lora.lm_head, dim=lora.dim, groups=lora.groups, scale=lora.scale, visual_dim=lora.visual_dim,
                    num_virtual_tokens=lora.num_virtual_tokens, prefix_projection=lora.prefix_projection)


def is_base_weights_folder(folder: Path | None) -> bool:
    """True for the output of a `projector` stage (base weights, no adapter to continue)."""
    from alignment.adapters.base import read_config

    return folder is not None and (Path(folder) / ADAPTER_FILE).exists() and \
        read_config(Path(folder)).get("peft_type") == "BASE_WEIGHTS"


def ensure_policy_adapter(policy, config, previous_adapter: Path | None, name: str = "policy") -> None:
    """Make `name` the trainable, active adapter: loaded from `config.init_adapter` or the previous
    stage's folder when given, kept when it exists already, else freshly initialised. A previous
    `projector` stage's folder gives its trained base weights (kept frozen) and a fresh adapter."""
    source = Path(config.init_adapter) if config.init_adapter else previous_adapter
    if is_base_weights_folder(source):
        if PROJECTOR_ADAPTER not in policy.adapters or config.init_adapter:
            policy.load_adapter(PROJECTOR_ADAPTER, source, trainable=False)
        source = None
    if PROJECTOR_ADAPTER in policy.adapters:
        policy.freeze_adapter(PROJECTOR_ADAPTER)
    if source is not None and (name not in policy.adapters or config.init_adapter):
        policy.load_adapter(name, source, trainable=True)
    elif name not in policy.adapters:
        targets = policy.add_adapter(name, lora_spec(config))
        print(f"[{config.name}] {config.lora.method} on {len(targets)} modules ({config.lora.preset}): "
              f"{', '.join(targets[:4])}{' ...' if len(targets) > 4 else ''}; "
              f"{sum(p.numel() for p in policy.trainable_parameters()):,} trainable parameters")
    policy.trainable_adapters.add(name)
    policy.set_adapter(name)


def pair_reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Logged means of a batch's pair rewards, chosen [P] and rejected [P] (DPO's implicit ones or a
    reward model's): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
    }
