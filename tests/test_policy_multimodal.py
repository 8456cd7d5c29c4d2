"""MultimodalPolicy's loading and facts on both tiny families: quantisation, dtypes."""

import pytest
import torch

from alignment.policy import LoraSpec, MultimodalPolicy
from tests._policy import FAMILIES, load, make_batch


@pytest.fixture(scope="module", params=FAMILIES)
def name(request):
    return request.param


def test_four_bit_quantizes_text_only(name):
    import bitsandbytes as bnb

    policy = load(name, "4bit")
    quantized = [n for n, m in policy.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model." in n for n in quantized)
    assert not any("vision" in n or "multi_modal_projector" in n or "lm_head" in n for n in quantized)
    assert isinstance(policy.model.lm_head, torch.nn.Linear) and not isinstance(policy.model.lm_head, bnb.nn.Linear4bit)
    assert policy.model.lm_head.weight.dtype == torch.float32

def test_four_bit_keeps_the_unquantised_weights_in_the_checkpoint_dtype(name):
    """bf16 vision tower, embeddings and lm_head stay bf16 (PEFT's kbit preparation would make them fp32:
    +3.9 GB on the 11B); LoRA weights added on top are fp32."""
    policy = MultimodalPolicy.from_pretrained(name, quantization="4bit", dtype=torch.bfloat16,
                                              gradient_checkpointing=True)
    unquantised = {p.dtype for n, p in policy.model.named_parameters() if p.__class__.__name__ != "Params4bit"}
    assert unquantised == {torch.bfloat16}
    policy.add_adapter("policy", LoraSpec(r=4, preset="all"))
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}

def test_four_bit_gradients_after_an_eval_pass_equal_those_before(name):
    """bitsandbytes repacks 4-bit weights for an inference kernel on the first eval-mode forward without
    gradients (on CPUs with AVX512-BF16) and never undoes it; LoRA gradients backpropagated through the
    repacked weights differed by 114% (relative norm). Every stage that evaluates or rolls out before
    it trains (DPO after SFT's evaluation, PPO, GRPO) depends on this equality."""
    from tests._adapters import check_lora_gradients_survive_an_eval_pass

    torch.manual_seed(0)
    policy = load(name, "4bit")
    check_lora_gradients_survive_an_eval_pass(
        policy, make_batch(policy), make_batch(policy, with_answer=False, padding_side="left"))

def test_eight_bit_refused_for_mllama():
    with pytest.raises(ValueError, match="8-bit"):
        load("tiny-mllama", "8bit")
