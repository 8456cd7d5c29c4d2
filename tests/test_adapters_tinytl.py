"""TinyTL (`adapters.tinytl`): the lite residual branch by hand and against a float64 reference, its
parameter count, a fresh branch as the identity, only branches and biases training, save/load,
KV-cache generation, the biases where the base has them, and the real sft and dpo stages."""

import json

import pytest
import torch

from alignment.adapters.tinytl import LiteResidual, lite_residual_parameter_count
from alignment.config import ConfigError
from alignment.policy import LoraSpec, MultimodalPolicy
from tests._adapters import (
    cached_decoding_error,
    fresh_copy,
    perturb,
    run_stages,
    sft_losses,
    tensor_batch,
)
from tests._policy import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def mllama():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


def test_lite_residual_by_hand():
    """c = 2, d = 2, k = 1. W_d = I, b_d = 0: h = x = [1, 3]; GroupNorm over the 2 features (eps 1e-5):
    mean 2, var 1, so [-1, 1] (times ~1 - 5e-6); ReLU: [0, 1]; W_u = [[1, 2], [3, 4]], b_u = [0.5, 0.5],
    s = 2: 2 * ([2, 4] + 0.5) = [5, 9]."""
    branch = LiteResidual(width=2, dim=2, groups=1, scale=2.0)
    with torch.no_grad():
        branch.down.weight.copy_(torch.eye(2))
        branch.down.bias.zero_()
        branch.up.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        branch.up.bias.fill_(0.5)
    torch.testing.assert_close(branch(torch.tensor([[1.0, 3.0]])), torch.tensor([[5.0, 9.0]]), atol=1e-4, rtol=0)


def test_lite_residual_equals_a_float64_reference_and_starts_at_zero():
    torch.manual_seed(1)
    c, d, k = 12, 8, 2
    branch = LiteResidual(c, d, k, scale=0.5).double()
    x = torch.randn(2, 5, c, dtype=torch.float64)
    assert torch.equal(branch(x), torch.zeros_like(x))  # W_u, b_u start at zero
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_()
    h = (x @ branch.down.weight.T + branch.down.bias).unflatten(-1, (k, d // k))  # [..., k, d/k]
    h = ((h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).flatten(-2)
    h = torch.relu(h * branch.norm.weight + branch.norm.bias)
    torch.testing.assert_close(branch(x), 0.5 * (h @ branch.up.weight.T + branch.up.bias))
    assert sum(p.numel() for p in branch.parameters()) == lite_residual_parameter_count(c, d) == 2 * 12 * 8 + 3 * 8 + 12
    with pytest.raises(ValueError, match="divisible by groups"):
        LiteResidual(c, 6, 4)


def test_branches_only_on_llama_blocks_and_the_count(mllama):
    """tiny-mllama, preset language: 6 decoder layers (cross-attention ones included) of width 192; d = 16:
    2*192*16 + 3*16 + 192 = 6384 per branch, 38304 in all. Llama layers have no bias: nothing else trains."""
    policy = fresh_copy(mllama)
    blocks = policy.add_adapter("policy", LoraSpec(method="tinytl", dim=16, groups=2))
    assert blocks == [f"model.language_model.layers.{i}" for i in range(6)]
    assert policy.own["tinytl"].configs["policy"]["biases"] == []
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("own.tinytl.adapters.policy.branch.") for n in names)
    assert sum(p.numel() for p in policy.trainable_parameters()) == 6 * 6384 == 38304


def test_vision_blocks_bring_their_biases(mllama):
    """Preset all adds the vision encoder's 3 + 1 layers (width 96) and every bias inside them (the
    attention/MLP linears' and the layer norms'): branches + those bias entries train."""
    policy = fresh_copy(mllama)
    blocks = policy.add_adapter("policy", LoraSpec(method="tinytl", dim=16, groups=2, preset="all"))
    modules = dict(policy.base_model.named_modules())
    vision = [b for b in blocks if "vision_model" in b]
    assert len(blocks) == 10 and len(vision) == 4
    biases = policy.own["tinytl"].configs["policy"]["biases"]
    assert biases and all(any(t.startswith(b + ".") for b in vision) for t in biases)
    expected = 6 * lite_residual_parameter_count(192, 16) + 4 * lite_residual_parameter_count(96, 16)
    expected += sum(modules[t].bias.numel() for t in biases)
    assert sum(p.numel() for p in policy.trainable_parameters()) == expected
    assert policy.vision_is_adapted


def test_fresh_branch_is_the_base_trains_alone_saves_and_loads(mllama, tmp_path):
    policy = fresh_copy(mllama)
    batch = make_batch(policy)
    with torch.no_grad():
        base = policy.completion_logprobs(batch)[1]
    policy.add_adapter("policy", LoraSpec(method="tinytl", dim=16, groups=2, preset="all"))
    with torch.no_grad():  # W_u = b_u = 0 and zero bias deltas: the base's outputs, exactly
        torch.testing.assert_close(policy.completion_logprobs(batch)[1], base, atol=0, rtol=0)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    losses = sft_losses(policy, batch)
    assert losses[-1] < losses[0] - 0.5, losses
    assert [n for n, p in policy.named_parameters() if n in frozen and not torch.equal(p, frozen[n])] == []
    changed = [n for n, p in policy.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any(".branch." in n for n in changed) and any(".bias.deltas." in n for n in changed)
    with torch.no_grad():
        trained = policy.completion_logprobs(batch)[1]
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], base, atol=0, rtol=0)
    policy.save_adapter("policy", tmp_path / "tinytl")
    config = json.loads((tmp_path / "tinytl" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TINYTL" and config["dim"] == 16 and config["preset"] == "all"
    loaded = fresh_copy(mllama)
    loaded.load_adapter("policy", tmp_path / "tinytl", trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.completion_logprobs(batch)[1], trained, atol=0, rtol=0)
    assert loaded.trainable_parameters() == []


def test_named_sets_switch_and_the_reference_copy_is_frozen(mllama):
    policy = fresh_copy(mllama)
    batch = make_batch(policy)
    policy.add_adapter("policy", LoraSpec(method="tinytl", dim=8, groups=2))
    policy.add_adapter("reward", LoraSpec(method="tinytl", dim=8, groups=2), head=True)
    own = policy.own["tinytl"]
    perturb(own.parameters_of("policy"))
    with torch.no_grad():
        now = policy.completion_logprobs(batch)[1]  # `reward` is active: a fresh set, the base
        with policy.use_adapter("policy"):
            trained = policy.completion_logprobs(batch)[1]
        assert not torch.allclose(trained, now)
        policy.set_adapter("policy")
        policy.freeze_reference("policy")
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], trained, atol=0, rtol=0)
    assert not any(p.requires_grad for p in own.parameters_of("reference"))
    assert all(p.requires_grad for p in own.parameters_of("policy"))


@pytest.mark.parametrize("name", ["tiny-mllama", "tiny-qwen25vl"])
def test_kv_cache_generation_and_qwen_biases(mllama, name):
    """Generation with a KV cache (prefill, decode) equals a full forward under a trained-looking set. Qwen2's
    text layers have q/k/v biases: those train beside the branches."""
    from alignment.data import build_datasets, collate_prompts

    policy = fresh_copy(mllama) if name == "tiny-mllama" else MultimodalPolicy.from_pretrained(name)
    policy.add_adapter("policy", LoraSpec(method="tinytl", dim=8, groups=2))
    perturb(policy.trainable_parameters())
    examples = build_datasets(num_covers=8, seed=0, task="sft", max_eval_samples=1)[0][:2]
    assert cached_decoding_error(policy, tensor_batch(collate_prompts(examples, policy.processor))) < 1e-4
    biases = policy.own["tinytl"].configs["policy"]["biases"]
    if name == "tiny-qwen25vl":
        assert biases and {t.rsplit(".", 1)[-1] for t in biases} == {"q_proj", "k_proj", "v_proj"}


def test_gradient_checkpointing_keeps_the_gradients(mllama):
    """The branch hooks sit on the layer modules, outside transformers' checkpointed `forward`, and the
    bias hooks inside it (recomputed): the same gradients with checkpointing as without."""
    grads = []
    for checkpointing in (False, True):
        policy = fresh_copy(mllama)
        if checkpointing:
            policy.family.enable_gradient_checkpointing(policy.model)
        batch = make_batch(policy)
        torch.manual_seed(0)
        policy.add_adapter("policy", LoraSpec(method="tinytl", dim=8, groups=2, preset="all"))
        perturb(policy.trainable_parameters())
        policy.model.train()
        (-policy.completion_logprobs(batch)[1].sum()).backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_refused_where_it_cannot_run(mllama):
    llava = MultimodalPolicy.from_pretrained("tiny-llava")
    with pytest.raises(ConfigError, match=r"lora\.method: tinytl preset 'cross_attention' finds no block"):
        llava.add_adapter("policy", LoraSpec(method="tinytl", preset="cross_attention"))
    with pytest.raises(ConfigError, match="lora.method: tinytl blocks not in"):
        fresh_copy(mllama).add_adapter("policy", LoraSpec(method="tinytl", target_modules=["model.nowhere"]))


def test_sft_then_dpo_stages(tmp_path):
    """The real stages: SFT trains the branches, DPO continues them against a frozen copy (first loss ln 2)."""
    import math

    stages = run_stages(tmp_path, {"method": "tinytl", "dim": 8, "groups": 2})
    sft = stages["sft"]["train"]
    assert sft["loss_last"] < sft["loss_first"]
    assert abs(stages["dpo"]["train"]["loss_first"] - math.log(2)) < 1e-5
    for stage in ("sft", "dpo"):
        assert json.loads((tmp_path / stage / "adapter_config.json").read_text())["peft_type"] == "TINYTL"


@pytest.mark.slow
def test_every_stage(tmp_path):
    """sft, dpo, reward (its own tinytl adapter + head), ppo (policy, critic, reward and reference sets in
    one model) and grpo, as one recipe; the fast variant is test_sft_then_dpo_stages."""
    stages = run_stages(tmp_path, {"method": "tinytl", "dim": 8, "groups": 2}, stages=("sft", "dpo", "reward", "ppo", "grpo"))
    assert json.loads((tmp_path / "reward" / "adapter_config.json").read_text())["peft_type"] == "TINYTL"
    assert (tmp_path / "reward" / "head.safetensors").exists() and stages["grpo"]["steps"] == 4
