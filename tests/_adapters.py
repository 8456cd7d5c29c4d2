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


def check_lora_gradients_survive_an_eval_pass(policy, batch: dict, prompts: dict) -> None:
    """A `policy` LoRA (perturbed so it is not a no-op) gets bit-identical gradients on `batch` before and
    after an eval-mode no-grad pass (log-probs on `batch`, then a 2-token generation from `prompts`)."""
    import torch

    from alignment.policy import LoraSpec

    policy.add_adapter("policy", LoraSpec(r=4))
    with torch.no_grad():
        for key, param in policy.model.named_parameters():
            if "lora_B" in key:
                param.add_(0.05 * torch.randn_like(param))

    def lora_gradients():
        policy.model.train()
        policy.model.zero_grad(set_to_none=True)
        (-policy.completion_logprobs(batch)[1].sum()).backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    before = lora_gradients()
    policy.model.eval()
    with torch.no_grad():
        policy.completion_logprobs(batch)
        policy.generate(prompts, max_new_tokens=2)
    after = lora_gradients()
    assert len(before) == len(after) > 0 and any(a.abs().sum() > 0 for a in before)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
