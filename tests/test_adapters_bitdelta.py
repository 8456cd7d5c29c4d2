"""BitDelta adapters (`alignment/adapters/bitdelta.py`) on tiny-mllama: a served 1-bit delta is the dense
alpha * sign(delta) merged into the base; distillation lowers the logit MSE; save/load is exact; it
runs on a 4-bit base; two fine-tunes' deltas served from one base give each fine-tune's answers."""

import copy
import json
from functools import partial

import pytest
import torch

from alignment.adapters.bitdelta import BitDeltaAdapters
from alignment.bitdelta import bitdelta_linear, decompress
from alignment.compress import compress_adapter
from alignment.config import ConfigError
from alignment.data import build_datasets, collate_prompts, collate_sft
from alignment.evaluate import generate_answers
from alignment.losses import sft_loss_sum
from alignment.policy import ADAPTER_FILE, LoraSpec, MultimodalPolicy
from alignment.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


@pytest.fixture(scope="module")
def base():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


@pytest.fixture(scope="module")
def data():
    train, evaluation, _ = build_datasets(num_covers=60, seed=0, task="sft", max_eval_samples=8)
    return train, evaluation


def _fresh(policy):
    return MultimodalPolicy(copy.deepcopy(policy.model), policy.processor)


@pytest.fixture(scope="module")
def compressed(base, data, tmp_path_factory):
    """A perturbed LoRA "fine-tune" compressed with 5 distillation steps, saved to a folder."""
    policy = _fresh(base)
    torch.manual_seed(0)  # a module fixture runs before the per-test seed: LoRA's A init must not depend on test order
    policy.add_adapter("policy", LoraSpec(r=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    batches = [collate_sft(data[0][i : i + 4], policy.processor) for i in (0, 4)]
    onebit, stats = compress_adapter(policy, "policy", batches, steps=5, lr=1e-3)
    folder = tmp_path_factory.mktemp("bitdelta") / "sft-bitdelta"
    onebit.save("bitdelta", folder)
    return {"policy": policy, "onebit": onebit, "stats": stats, "folder": folder, "batches": batches}


def _logits(policy, batch):
    with torch.no_grad():
        return policy.forward(batch).logits


def _student_logits(policy, onebit, name, batch):
    """Logits of the base + 1-bit delta `name` (the LoRA fine-tune switched off), then the delta off again."""
    onebit.set_active(name)
    try:
        with policy.model.disable_adapter():
            return _logits(policy, batch)
    finally:
        onebit.set_active(None)


def test_distillation_lowers_the_logit_mse_and_the_delta_is_under_a_tenth_of_bf16(compressed):
    stats, folder = compressed["stats"], compressed["folder"]
    assert stats["targets"] == 34  # the language preset's linears
    assert stats["mse_distilled"] < stats["mse_init"] < stats["mse_base"], stats
    losses = stats["losses"]  # steps cycle over the two batches
    assert losses[2] < losses[0] and losses[3] < losses[1], losses
    assert stats["onebit_bytes"] <= stats["bf16_bytes"] / 10
    assert (folder / ADAPTER_FILE).stat().st_size <= stats["bf16_bytes"] / 10  # signs, scales, header
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITDELTA" and len(config["target_modules"]) == 34


def test_served_delta_is_the_dense_one_bit_delta_merged_into_the_base(base, compressed):
    """base + hooks == a copy of the base whose weights hold W + alpha * sign(delta)."""
    served = _fresh(base)
    served.load_adapter("tenant", compressed["folder"], trainable=False)
    merged = _fresh(base)
    modules = dict(merged.base_model.named_modules())
    onebit = served.own["bitdelta"]
    with torch.no_grad():
        for target, part in onebit.adapters["tenant"].items():
            linear = modules[target.replace("__", ".")]
            linear.weight.add_(decompress(part.signs, part.scale, part.in_features))
    batch = compressed["batches"][0]
    torch.testing.assert_close(_logits(served, batch), _logits(merged, batch), atol=1e-4, rtol=1e-4)
    with served.reference():  # no adapter: the bare base
        torch.testing.assert_close(_logits(served, batch), _logits(base, batch), atol=0, rtol=0)


def test_save_load_round_trip_gives_identical_outputs(base, compressed, tmp_path):
    """The loaded delta gives the distilled student's logits exactly; saving it again gives the same tensors."""
    from safetensors.torch import load_file

    policy, onebit, batch = compressed["policy"], compressed["onebit"], compressed["batches"][1]
    student = _student_logits(policy, onebit, "bitdelta", batch)
    served = _fresh(base)
    served.load_adapter("tenant", compressed["folder"], trainable=False)
    torch.testing.assert_close(_logits(served, batch), student, atol=0, rtol=0)
    served.save_adapter("tenant", tmp_path / "again")
    first, again = load_file(str(compressed["folder"] / ADAPTER_FILE)), load_file(str(tmp_path / "again" / ADAPTER_FILE))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_row_scales_round_trip_and_set_the_granularity_on_load(base, compressed, tmp_path):
    """A delta with one scale per output row ([out] scales) saves and loads exactly; the loaded
    adapter takes its scales' shape from the file."""
    policy, batch = compressed["policy"], compressed["batches"][0]
    onebit, stats = compress_adapter(policy, "policy", [batch], steps=2, lr=1e-3, name="rows", scales="row")
    # (per-row scales fit each weight delta at least as well as one per matrix, tests/test_bitdelta.py; the
    # logits' MSE at mean |delta| need not follow: measured both ways on tiny fine-tunes)
    assert stats["scales"] == "row" and stats["ratio"] <= 0.1
    onebit.save("rows", tmp_path / "rows")
    student = _student_logits(policy, onebit, "rows", batch)
    served = _fresh(base)
    served.load_adapter("tenant", tmp_path / "rows", trainable=False)
    part = served.own["bitdelta"].adapters["tenant"]["model__language_model__layers__0__mlp__up_proj"]
    assert part.scale.shape == (512,) and served.own["bitdelta"].configs["tenant"]["scales"] == "row"
    torch.testing.assert_close(_logits(served, batch), student, atol=0, rtol=0)


def test_a_one_bit_delta_serves_on_a_4bit_base(compressed):
    """The base stays NF4; each targeted Linear4bit's output gains alpha * x @ sign^T exactly."""
    policy = MultimodalPolicy.from_pretrained("tiny-mllama", quantization="4bit")
    policy.load_adapter("tenant", compressed["folder"], trainable=False)
    onebit = policy.own["bitdelta"]
    target = "model.language_model.layers.0.self_attn.q_proj"
    linear = dict(policy.base_model.named_modules())[target]
    assert type(linear).__name__ == "Linear4bit"
    part = onebit.adapters["tenant"][target.replace(".", "__")]
    x = torch.randn(2, 3, linear.in_features)
    with torch.no_grad():
        with onebit.disabled():
            plain = linear(x)
        torch.testing.assert_close(linear(x), plain + bitdelta_linear(x, part.signs, part.scale, part.in_features))
        batch = compressed["batches"][0]
        with policy.reference():
            bare = policy.forward(batch).logits
        assert (policy.forward(batch).logits - bare).abs().max() > 1e-3


def _fine_tune(base, examples, answer: str, steps: int = 20, lr: float = 3e-3):
    """A LoRA SFT of a few steps that teaches one answer to every question."""
    policy = _fresh(base)
    policy.add_adapter("policy", LoraSpec(r=4))
    batch = collate_sft([{**e, "answer": answer} for e in examples], policy.processor)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)
    for _ in range(steps):
        nll, count = sft_loss_sum(*policy.windowed_logits(batch)[:2])
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.eval()
    return policy, batch


def _answers(policy, examples):
    collate = partial(collate_prompts, processor=policy.processor)
    return generate_answers(policy, examples, collate, batch_size=8, max_new_tokens=4)[0]


def test_two_fine_tunes_served_from_one_base_give_each_fine_tunes_answers(base, data, tmp_path):
    """Fine-tune A learns to answer "yes", B "no"; their 1-bit deltas, both loaded on one base and
    switched with set_adapter, answer the held-out prompts as A and B do."""
    train, held_out = data
    folders, expected = {}, {}
    for name, answer in (("a", "yes"), ("b", "no")):
        tuned, batch = _fine_tune(base, train[:8], answer)
        expected[name] = _answers(tuned, held_out)
        onebit, _ = compress_adapter(tuned, "policy", [batch], steps=3, lr=1e-3)
        onebit.save("bitdelta", tmp_path / name)
        folders[name] = tmp_path / name
    assert sum(a != b for a, b in zip(expected["a"], expected["b"])) >= len(held_out) // 2, expected
    served = _fresh(base)
    for name, folder in folders.items():
        served.load_adapter(name, folder, trainable=False)
    assert sorted(served.own["bitdelta"].names) == ["a", "b"]
    for name in ("a", "b", "a"):  # switching back and forth
        served.set_adapter(name)
        assert _answers(served, held_out) == expected[name], name


def test_a_stage_does_not_train_a_bitdelta_and_kinds_do_not_mix(base, compressed):
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.method: bitdelta is not trained.*vlm-align compress"):
        recipe_from_dict({"model": {"quantization": "none"}, "stages": [{"type": "sft", "lora": {"method": "bitdelta"}}]})
    policy = _fresh(base)
    policy.add_adapter("policy", LoraSpec(r=4))
    with pytest.raises(ValueError, match="cannot join adapters"):
        policy.load_adapter("tenant", compressed["folder"], trainable=False)
    assert isinstance(compressed["onebit"], BitDeltaAdapters)
