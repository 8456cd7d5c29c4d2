"""The adapter registry of MultimodalPolicy on both tiny families: presets, the reference, switching."""

import pytest
import torch

from alignment.policy import LoraSpec, resolve_preset
from tests._policy import FAMILIES, load, make_batch


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    return request.param


def test_fresh_lora_leaves_logprobs_unchanged_and_reference_is_base(name):
    policy = load(name)
    batch = make_batch(policy)
    with torch.no_grad():
        base = policy.completion_logprobs(batch)[1]
    policy.add_adapter("policy", LoraSpec(r=4, preset="language"))
    with torch.no_grad():
        fresh = policy.completion_logprobs(batch)[1]
    torch.testing.assert_close(fresh, base, atol=1e-6, rtol=0)
    with torch.no_grad():  # perturb the adapter: policy moves, reference stays the base
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
        moved = policy.completion_logprobs(batch)[1]
        with policy.reference():
            ref = policy.completion_logprobs(batch)[1]
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(ref, base, atol=1e-6, rtol=0)

EXPECTED_PRESET_SUFFIXES = {
    # 4 self-attention layers x (4 attention + 3 MLP) + the MLPs of the 2 cross-attention layers
    ("tiny-mllama", "language"): ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 4 * 7 + 2 * 3),
    ("tiny-mllama", "cross_attention"): ({"q_proj", "k_proj", "v_proj", "o_proj"}, 2 * 4),
    ("tiny-mllama", "vision"): ({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}, 4 * 6),
    ("tiny-mllama", "multimodal"): ({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "multi_modal_projector"}, 2 * 4 + 4 * 6 + 1),
    ("tiny-llava", "language"): ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 4 * 7),
    ("tiny-llava", "vision"): ({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, 3 * 6),
    ("tiny-llava", "multimodal"): ({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2"}, 3 * 6 + 2),
}

@pytest.mark.parametrize("preset", ["language", "cross_attention", "vision", "multimodal", "all"])
def test_presets_select_exactly_the_intended_modules(name, preset):
    policy = load(name)
    names = resolve_preset(policy.model, preset)
    suffixes = {n.split(".")[-1] for n in names}
    if (name, preset) in EXPECTED_PRESET_SUFFIXES:
        want_suffixes, want_count = EXPECTED_PRESET_SUFFIXES[(name, preset)]
        assert suffixes == want_suffixes
        assert len(names) == want_count
    if preset == "language":
        assert all(".language_model.layers." in n and "cross_attn" not in n for n in names)
    if preset == "cross_attention" and name == "tiny-mllama":
        assert all(".cross_attn." in n for n in names)
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in names} == {1, 4}
    if preset == "vision":
        assert all("vision" in n for n in names)
    if preset == "all":
        everything = set()
        for other in ("language", "cross_attention", "vision", "multimodal"):
            everything |= set(resolve_preset(policy.model, other))
        assert set(names) == everything
    assert "lm_head" not in names

def test_adapters_switch_and_stay_trainable(name):
    policy = load(name)
    policy.add_adapter("policy", LoraSpec(r=4))
    policy.add_adapter("critic", LoraSpec(r=4), head=True)
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable == {"policy", "critic"}
    batch = make_batch(policy)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n and ".critic." in n:
                p.add_(0.1)
        with policy.use_adapter("policy"):
            a = policy.completion_logprobs(batch)[1]
        with policy.use_adapter("critic"):
            b = policy.completion_logprobs(batch)[1]
        with policy.reference():
            ref = policy.completion_logprobs(batch)[1]
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)  # policy adapter still fresh
    assert (a - b).abs().max() > 1e-3
