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


# ---- helpers of the own-method tests (test_adapters_prefix.py, test_adapters_tinytl.py) ----------------------
def fresh_copy(policy):
    """An adapter-free copy of an adapter-free policy (faster than loading the model again)."""
    import copy

    return MultimodalPolicy(copy.deepcopy(policy.model), policy.processor)


def sft_losses(policy, batch: dict, steps: int = 4, lr: float = 2e-2) -> list[float]:
    """`steps` AdamW steps on the trainable parameters; the SFT loss before each, and after the last."""
    from alignment.losses import sft_loss_sum

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)
    losses = []
    for step in range(steps + 1):
        with torch.set_grad_enabled(step < steps):
            nll, count = sft_loss_sum(policy.forward(batch).logits.float(), batch["labels"])
        losses.append((nll / count).item())
        if step < steps:
            (nll / count).backward()
            optimizer.step()
            optimizer.zero_grad()
    return losses


def perturb(parameters, scale: float = 0.05, seed: int = 1) -> None:
    """Add scale * N(0, 1) noise to each parameter (an adapter that looks trained)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param.device, param.dtype))


def tensor_batch(batch: dict) -> dict:
    """A collated batch's tensors (and `num_pairs`), as the policy takes them."""
    return {k: v for k, v in batch.items() if torch.is_tensor(v) or k == "num_pairs"}


def cached_decoding_error(policy, prompts: dict) -> float:
    """Largest |logit| difference between the family's KV-cache generation (prefill, then one decode step
    on the greedy token) and one full forward over prompt + that token, on `prompts` (left-padded)."""
    features = policy.features_of(prompts, None)
    with torch.no_grad():
        first, state = policy.family.prefill(policy.model, prompts["input_ids"], prompts["attention_mask"], features,
                                             policy.image_index(prompts), **policy.token_inputs(prompts))
        token = first.argmax(-1)
        mask = torch.cat([prompts["attention_mask"], torch.ones_like(token[:, None])], dim=1)
        second = policy.family.decode(policy.model, state, token, mask)
        full = {**prompts, "input_ids": torch.cat([prompts["input_ids"], token[:, None]], dim=1), "attention_mask": mask}
        if "cross_attention_mask" in prompts:  # Mllama: the new token sees the row's image like the last one
            cross = prompts["cross_attention_mask"]
            full["cross_attention_mask"] = torch.cat([cross, cross[:, -1:]], dim=1)
        logits = policy.forward(full, features).logits
    return max((logits[:, -2] - first).abs().max().item(), (logits[:, -1] - second).abs().max().item())


def run_stages(out: Path, lora: dict, stages=("sft", "dpo")) -> dict:
    """The real stages `stages` on tiny-mllama through `run_recipe` (sft, dpo, reward: 2 steps; ppo, grpo:
    one rollout's 4 updates), 2 rows a step, each with the `lora:` block `lora`; checks every stage ran its
    steps with finite losses and returns the stages' reports by name."""
    import math

    from alignment.recipe import run_recipe
    from tests._recipes import build, tiny_recipe

    raw = tiny_recipe(out, stages=stages, steps=2, batch_size=2, report_to=["none"])
    raw["data"]["num_covers"] = 20
    for stage in raw["stages"]:
        stage.update(lora=dict(lora), eval_examples=2, eval_batch_size=2, max_new_tokens=2)
        if stage["type"] in ("ppo", "grpo"):
            stage["max_steps"] = 4
    report = {s["name"]: s for s in run_recipe(build(raw))["stages"]}
    assert list(report) == list(stages)
    for stage in report.values():
        assert stage["steps"] == (4 if stage["type"] in ("ppo", "grpo") else 2), stage["name"]
        assert all(math.isfinite(h["loss"]) for h in stage["history"]), stage["name"]
    return report
