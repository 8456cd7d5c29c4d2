"""Adapters that look trained, for stage tests: saved SFT (`policy`) and reward (adapter + head)
folders whose LoRA B matrices and heads are perturbed, so that no adapter is a no-op."""

from pathlib import Path

import torch

from alignment.policy import LoraSpec, MultimodalPolicy


def save_perturbed_adapters(root: Path, model: str = "tiny-mllama", seed: int = 1, preset: str = "language") -> Path:
    """`root/sft` (a `policy` LoRA of `preset`) and `root/reward` (a language LoRA + head)."""
    policy = MultimodalPolicy.from_pretrained(model)
    generator = torch.Generator().manual_seed(seed)
    policy.add_adapter("policy", LoraSpec(r=4, preset=preset))
    policy.add_adapter("reward", LoraSpec(r=4), head=True)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or name.startswith("heads."):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    policy.save_adapter("policy", root / "sft")
    policy.save_adapter("reward", root / "reward")
    return root
