"""Adapters of MultimodalPolicy on disk: exact round trips, the output head's LoRA."""

import pytest
import torch

from alignment.policy import LoraSpec, resolve_preset
from tests._policy import FAMILIES, load, make_batch


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    return request.param


def test_adapter_round_trip_is_exact(name, tmp_path):
    policy = load(name)
    policy.add_adapter("reward", LoraSpec(r=4, preset="language"), head=True)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    batch = make_batch(policy)
    with torch.no_grad():
        before = policy.sequence_scores(batch, "reward")
    policy.save_adapter("reward", tmp_path / "reward")
    assert (tmp_path / "reward" / "adapter_model.safetensors").exists()
    assert (tmp_path / "reward" / "adapter_config.json").exists()
    fresh = load(name)
    fresh.load_adapter("reward", tmp_path / "reward")
    with torch.no_grad():
        after = fresh.sequence_scores(batch, "reward")
    torch.testing.assert_close(after, before, atol=0, rtol=0)

def test_lm_head_lora_adapts_the_output_head_and_round_trips(name, tmp_path):
    """`lm_head: true` adds a LoRA on the vocabulary projection (only there beyond the preset); it
    trains, changes the logits, saves and loads exactly, and the reference (adapters off) ignores it."""
    policy = load(name, "4bit")
    policy.add_adapter("policy", LoraSpec(r=4, preset="language", lm_head=True))
    lora_modules = {n.split(".lora_A")[0] for n, _ in policy.base_model.named_parameters() if ".lora_A." in n}
    head = [n for n in lora_modules if n.endswith("lm_head")]
    assert len(head) == 1 and lora_modules - set(head) == set(resolve_preset(policy.base_model, "language"))
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if "lm_head.lora_" in n)
    batch = make_batch(policy)
    with torch.no_grad():
        reference = policy.completion_logprobs(batch)[1]
        for n, p in policy.model.named_parameters():
            if "lm_head.lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
        moved = policy.completion_logprobs(batch)[1]
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], reference, atol=1e-6, rtol=0)
    assert (moved - reference).abs().max() > 1e-3
    policy.save_adapter("policy", tmp_path / "policy")
    fresh = load(name, "4bit")
    fresh.load_adapter("policy", tmp_path / "policy")
    with torch.no_grad():
        torch.testing.assert_close(fresh.completion_logprobs(batch)[1], moved, atol=0, rtol=0)
