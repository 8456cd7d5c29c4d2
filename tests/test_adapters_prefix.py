"""Prefix tuning (`adapters.prefix`): PEFT's prefix tuning on a Llama text model given the same prefix
(the oracle), a fresh prefix as the base reading its tokens first, tiny-mllama's self-attention layers
only, training, save/load, switching names, KV-cache generation on every family, checkpointing, and
the real sft and dpo stages."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from alignment.adapters.prefix import PrefixAdapters
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

SELF_ATTENTION = [f"model.language_model.layers.{i}.self_attn" for i in (0, 2, 3, 5)]  # 1 and 4: cross-attention


def llama(attention: str = "sdpa"):
    """A 3-layer Llama text model with grouped-query attention (4 heads, 2 key/value heads of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = attention
    return LlamaForCausalLM(config).eval()


def spec(n: int = 3, projection: bool = False, dim: int = 8):
    return SimpleNamespace(num_virtual_tokens=n, prefix_projection=projection, dim=dim, target_modules=None)


@pytest.fixture(scope="module")
def mllama():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("projection", [False, True])
def test_equals_peft_prefix_tuning_given_the_same_prefix(attention, projection):
    """PEFT hands the prefix over as a filled KV cache (real tokens at positions 3, 4, ...); ours puts it in
    each attention module. With PEFT's encoder weights copied over, the logits agree on every real token,
    with and without padding, with and without the reparameterisation MLP."""
    from peft import PrefixTuningConfig, get_peft_model

    base = llama(attention)
    ours = copy.deepcopy(base)
    peft = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                   prefix_projection=projection, encoder_hidden_size=8)).eval()
    adapters = PrefixAdapters(ours)
    adapters.add("p", spec(projection=projection))
    adapters.set_active("p")
    adapters.load_state_of("p", peft.prompt_encoder["default"].state_dict())
    ids = torch.randint(96, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        for attention_mask, real in ((None, slice(None)), (mask, mask.bool())):
            expected = peft(input_ids=ids, attention_mask=attention_mask).logits
            got = ours(input_ids=ids, attention_mask=attention_mask).logits
            torch.testing.assert_close(got[real], expected[real])
            assert not torch.allclose(got, base(input_ids=ids, attention_mask=attention_mask).logits)


def test_fresh_prefix_is_the_base_reading_its_tokens_first(mllama):
    """Initialised from tokens `t` (n = 3), the prefix holds the base's own keys and values of `t` at
    positions 0..2, so model(x) equals base(t + x) on x's positions: on a Llama and on Mllama's text path."""
    base = llama()
    model = copy.deepcopy(base)
    adapters = PrefixAdapters(model)
    adapters.add("p", spec())
    tokens = torch.randint(96, (1, 3))
    adapters.init_from_tokens("p", tokens)
    adapters.set_active("p")
    x = torch.randint(96, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=torch.cat([tokens.expand(2, -1), x], 1)).logits[:, 3:])

    policy = fresh_copy(mllama)
    policy.add_adapter("policy", LoraSpec(method="prefix_tuning", num_virtual_tokens=3))
    tokens = torch.randint(100, 500, (1, 3))
    policy.own["prefix_tuning"].init_from_tokens("policy", tokens)
    x = torch.randint(100, 500, (2, 5))
    with torch.no_grad():
        got = policy.model(input_ids=x).logits
        with policy.reference():
            expected = policy.model(input_ids=torch.cat([tokens.expand(2, -1), x], 1)).logits[:, 3:]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("projection", [False, True])
def test_only_self_attention_prefixes_train_with_the_stated_count(mllama, projection):
    """tiny-mllama: 4 self-attention layers (cross-attention at 1 and 4 gets none), 2 key/value heads of 48:
    c = 96. n = 4: 4 * 4*2*96 = 3072 parameters; with the MLP (e = 8): n*c + c*e + e + e*L*2*c + L*2*c =
    384 + 768 + 8 + 6144 + 768 = 8072."""
    policy = fresh_copy(mllama)
    lora = LoraSpec(method="prefix_tuning", num_virtual_tokens=4, dim=8)
    lora.prefix_projection = projection  # no LoraSpec field yet: read with getattr
    assert policy.add_adapter("policy", lora) == SELF_ATTENTION
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("own.prefix_tuning.adapters.policy.") for n in names)
    assert sum(p.numel() for p in policy.trainable_parameters()) == (8072 if projection else 3072)


@pytest.mark.parametrize("projection", [False, True])
def test_trains_alone_saves_and_loads(mllama, tmp_path, projection):
    policy = fresh_copy(mllama)
    batch = make_batch(policy)
    with torch.no_grad():
        base = policy.completion_logprobs(batch)[1]
    lora = LoraSpec(method="prefix_tuning", num_virtual_tokens=4, dim=8)
    lora.prefix_projection = projection
    policy.add_adapter("policy", lora)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    losses = sft_losses(policy, batch)
    assert losses[-1] < losses[0] - 0.5, losses
    assert [n for n, p in policy.named_parameters() if n in frozen and not torch.equal(p, frozen[n])] == []
    with torch.no_grad():
        trained = policy.completion_logprobs(batch)[1]
        with policy.reference():  # the prefix off: the base, exactly
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], base, atol=0, rtol=0)
    policy.save_adapter("policy", tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VLM_PREFIX_TUNING" and config["prefix_projection"] == projection
    loaded = fresh_copy(mllama)
    loaded.load_adapter("policy", tmp_path / "prefix", trainable=False)  # the loader's spec has no projection field
    with torch.no_grad():
        torch.testing.assert_close(loaded.completion_logprobs(batch)[1], trained, atol=0, rtol=0)
    assert loaded.trainable_parameters() == []


def test_named_prefixes_switch_and_the_reference_copy_is_frozen(mllama):
    policy = fresh_copy(mllama)
    batch = make_batch(policy)
    policy.add_adapter("policy", LoraSpec(method="prefix_tuning", num_virtual_tokens=4))
    policy.add_adapter("reward", LoraSpec(method="prefix_tuning", num_virtual_tokens=2), head=True)
    own = policy.own["prefix_tuning"]
    perturb(own.parameters_of("policy"))
    with torch.no_grad():
        values = {}
        for name in ("policy", "reward", "policy"):
            with policy.use_adapter(name):
                values.setdefault(name, []).append(policy.completion_logprobs(batch)[1])
        torch.testing.assert_close(values["policy"][0], values["policy"][1], atol=0, rtol=0)
        assert not torch.allclose(values["policy"][0], values["reward"][0])
        policy.set_adapter("policy")
        policy.freeze_reference("policy")
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], values["policy"][0], atol=0, rtol=0)
    assert not any(p.requires_grad for p in own.parameters_of("reference"))
    assert all(p.requires_grad for p in own.parameters_of("policy"))


@pytest.mark.parametrize("name", ["tiny-mllama", "tiny-llava", "tiny-qwen25vl", "tiny-qwen3vl"])
def test_kv_cache_generation_sees_the_prefix_on_every_family(mllama, name):
    """Prefill + one decode step equal one full forward over prompt + token (Qwen: M-RoPE positions
    shifted too); the reference (prefix off) is the bare base."""
    from alignment.data import build_datasets, collate_prompts, collate_sft

    policy = fresh_copy(mllama) if name == "tiny-mllama" else MultimodalPolicy.from_pretrained(name)
    examples = build_datasets(num_covers=8, seed=0, task="sft", max_eval_samples=1)[0][:2]
    batch, prompts = (tensor_batch(c(examples, policy.processor)) for c in (collate_sft, collate_prompts))
    with torch.no_grad():
        base = policy.completion_logprobs(batch)[1]
    policy.add_adapter("policy", LoraSpec(method="prefix_tuning", num_virtual_tokens=3))
    perturb(policy.trainable_parameters())
    assert cached_decoding_error(policy, prompts) < 1e-4
    with torch.no_grad():
        assert not torch.allclose(policy.completion_logprobs(batch)[1], base)
        with policy.reference():
            torch.testing.assert_close(policy.completion_logprobs(batch)[1], base, atol=0, rtol=0)
        if hasattr(policy, "pair_logprobs") and name in ("tiny-mllama", "tiny-qwen25vl"):  # pairs as one row each
            pairs = build_datasets(num_covers=8, seed=0, task="preference", max_eval_samples=1)[0][:2]
            from alignment.data import collate_preference

            pair_batch = tensor_batch(collate_preference(pairs, policy.processor))
            torch.testing.assert_close(policy.pair_logprobs(pair_batch, share_prefix=True)[1],
                                       policy.pair_logprobs(pair_batch, share_prefix=False)[1])


def test_gradient_checkpointing_keeps_the_gradients(mllama):
    """The prefix enters inside the attention modules, so checkpointed layers (which drop any cache passed
    to them) still see it, and recompute it in backward: the same gradients."""
    grads = []
    for checkpointing in (False, True):
        policy = fresh_copy(mllama)
        if checkpointing:
            policy.family.enable_gradient_checkpointing(policy.model)
        batch = make_batch(policy)
        torch.manual_seed(0)
        policy.add_adapter("policy", LoraSpec(method="prefix_tuning", num_virtual_tokens=4))
        policy.model.train()
        (-policy.completion_logprobs(batch)[1].sum()).backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert grads[0][0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_refused_where_it_cannot_run():
    model = llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match=r"lora\.method: prefix_tuning supports .*sdpa.* not 'flex_attention'"):
        PrefixAdapters(model)
    with pytest.raises(ConfigError, match="has no text decoder"):
        PrefixAdapters(torch.nn.Linear(2, 2))
    adapters = PrefixAdapters(llama())
    with pytest.raises(ConfigError, match="self-attention modules only"):
        adapters.add("p", SimpleNamespace(**{**vars(spec()), "target_modules": ["model.layers.0.mlp"]}))


def test_sft_then_dpo_stages(tmp_path):
    """The real stages: SFT trains a prefix, DPO continues it against a frozen copy (its first loss ln 2)."""
    import math

    stages = run_stages(tmp_path, {"method": "prefix_tuning", "num_virtual_tokens": 4})
    assert abs(stages["dpo"]["train"]["loss_first"] - math.log(2)) < 1e-5
    for stage in ("sft", "dpo"):
        assert json.loads((tmp_path / stage / "adapter_config.json").read_text())["peft_type"] == "VLM_PREFIX_TUNING"


@pytest.mark.slow
def test_every_stage(tmp_path):
    """sft, dpo, reward (its own prefix_tuning adapter + head), ppo (policy, critic, reward and reference sets in
    one model) and grpo, as one recipe; the fast variant is test_sft_then_dpo_stages."""
    stages = run_stages(tmp_path, {"method": "prefix_tuning", "num_virtual_tokens": 4}, stages=("sft", "dpo", "reward", "ppo", "grpo"))
    assert json.loads((tmp_path / "reward" / "adapter_config.json").read_text())["peft_type"] == "VLM_PREFIX_TUNING"
    assert (tmp_path / "reward" / "head.safetensors").exists() and stages["grpo"]["steps"] == 4
