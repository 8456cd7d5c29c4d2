"""The PEFT menu: for each method exactly the intended parameters train and a few steps lower the
loss; the refusals (4-bit LoHa, qlora without 4-bit, mixed kinds) are clear ConfigErrors."""

import copy

import pytest
import torch

from alignment.adapters.menu import METHODS, TUNER_PARAM, check_method
from alignment.config import ConfigError
from alignment.losses import sft_loss_sum
from alignment.policy import LoraSpec, MultimodalPolicy
from alignment.recipe import recipe_from_dict
from tests._policy import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

# method -> (spec, predicate over trainable parameter names of the policy)
CASES = {
    "lora": (dict(r=4), lambda n: ".lora_A.policy." in n or ".lora_B.policy." in n),
    "dora": (dict(r=4), lambda n: any(f".{k}.policy" in n for k in ("lora_A", "lora_B", "lora_magnitude_vector"))),
    "ia3": (dict(), lambda n: ".ia3_l.policy" in n),
    "loha": (dict(r=4), lambda n: ".hada_" in n and n.endswith(".policy")),
    "lora_fa": (dict(r=4), lambda n: ".lora_B.policy." in n),
    "bitfit": (dict(preset="all"), lambda n: n.startswith("own.bitfit.")),
    "prompt_tuning": (dict(num_virtual_tokens=4), lambda n: n.startswith("own.prompt_tuning.")),
    "bottleneck": (dict(preset="language"), lambda n: n.startswith("own.bottleneck.")),
    "prefix_tuning": (dict(num_virtual_tokens=4), lambda n: n.startswith("own.prefix_tuning.adapters.policy.")),
    "tinytl": (dict(dim=8), lambda n: n.startswith("own.tinytl.adapters.policy.")),
    "full": (dict(), lambda n: n.startswith("model.") and (".language_model." in n or ".lm_head." in n)),
}


@pytest.fixture(scope="module")
def base():
    return MultimodalPolicy.from_pretrained("tiny-mllama")


def _fresh(policy):
    return MultimodalPolicy(copy.deepcopy(policy.model), policy.processor)


def _losses(policy, batch, steps=3, lr=2e-2):
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        nll, count = sft_loss_sum(policy.forward(batch).logits.float(), batch["labels"])
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((nll / count).item())
    with torch.no_grad():
        nll, count = sft_loss_sum(policy.forward(batch).logits.float(), batch["labels"])
    return losses + [(nll / count).item()]


@pytest.mark.parametrize("method", sorted(CASES))
def test_only_intended_parameters_train_and_loss_drops(base, method):
    policy = _fresh(base)
    batch = make_batch(policy)
    spec, intended = CASES[method]
    policy.add_adapter("policy", LoraSpec(method=method, **spec))
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(intended(n) for n in names), [n for n in names if not intended(n)][:3]
    if method == "lora_fa":  # A exists, frozen at its random init
        frozen_a = [p for n, p in policy.named_parameters() if ".lora_A.policy." in n]
        assert frozen_a and not any(p.requires_grad for p in frozen_a)
        before = [p.detach().clone() for p in frozen_a]
    if method == "bitfit":  # one delta per bias entry of the targeted modules
        modules = dict(policy.base_model.named_modules())
        targets = policy.own["bitfit"].configs["policy"]["target_modules"]
        assert sum(p.numel() for p in policy.trainable_parameters()) == sum(modules[t].bias.numel() for t in targets)
    if method == "prompt_tuning":  # n x hidden
        assert sum(p.numel() for p in policy.trainable_parameters()) == 4 * policy.hidden_size
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    losses = _losses(policy, batch)
    assert losses[-1] < losses[0] - 0.2, losses
    changed = [n for n, p in policy.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert changed == []
    if method == "lora_fa":
        assert all(torch.equal(p, b) for p, b in zip(frozen_a, before))


def test_every_menu_method_is_covered():
    assert set(CASES) | {"qlora", "bitdelta"} == set(METHODS)  # bitdelta: made by `vlm-align compress` (test_adapters_bitdelta.py)


def test_refusals_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"lora\.method: loha cannot run on the 4bit base.*quantization: none"):
        check_method("loha", "4bit")
    with pytest.raises(ConfigError, match=r"qlora is LoRA on the 4-bit base; set model.quantization: 4bit"):
        check_method("qlora", "none")
    raw = {"model": {"quantization": "4bit"}, "stages": [{"type": "sft", "lora": {"method": "loha"}}]}
    with pytest.raises(ConfigError, match=r"stages\.0\.lora\.method: loha"):
        recipe_from_dict(raw)
    with pytest.raises(ConfigError, match=r"lora\.method: must be one of"):
        recipe_from_dict({"stages": [{"type": "sft", "lora": {"method": "lorax"}}]})
    with pytest.raises(ConfigError, match=r"lora\.groups: must divide lora\.dim"):
        recipe_from_dict({"stages": [{"type": "sft", "lora": {"method": "bottleneck", "dim": 16, "groups": 3}}]})
    recipe = recipe_from_dict({"stages": [{"type": "sft", "lora": {"method": "qlora"}}]})  # 4bit is the default
    assert recipe.stages[0].lora.method == "qlora"


def test_mixing_kinds_is_refused_but_lora_roles_still_coexist(base):
    policy = _fresh(base)
    policy.add_adapter("policy", LoraSpec(method="bottleneck"))
    with pytest.raises(ValueError, match="cannot join adapters"):
        policy.add_adapter("reward", LoraSpec(r=4), head=True)
    policy = _fresh(base)
    policy.add_adapter("policy", LoraSpec(r=4))
    policy.add_adapter("critic", LoraSpec(method="dora", r=4), head=True)  # both PEFT LoRA: fine
    with pytest.raises(ValueError, match="cannot join adapters"):
        policy.add_adapter("reward", LoraSpec(method="ia3"))


def test_peft_methods_save_and_load_with_their_method(base, tmp_path):
    """lora_fa keeps A frozen after a reload (the method travels in adapter_method.json); ia3 reloads
    as ia3 with identical outputs."""
    for method in ("lora_fa", "ia3"):
        policy = _fresh(base)
        batch = make_batch(policy)
        policy.add_adapter("policy", LoraSpec(method=method, r=4))
        _losses(policy, batch, steps=1)
        with torch.no_grad():
            trained = policy.completion_logprobs(batch)[1]
        policy.save_adapter("policy", tmp_path / method)
        loaded = _fresh(base)
        loaded.load_adapter("policy", tmp_path / method, trainable=True)
        assert loaded.adapter_methods["policy"] == method
        with torch.no_grad():
            torch.testing.assert_close(loaded.completion_logprobs(batch)[1], trained)
        tuner = [n for n, p in loaded.named_parameters() if p.requires_grad and TUNER_PARAM.search(n)]
        assert tuner and (method != "lora_fa" or not any(".lora_A." in n for n in tuner))


@pytest.mark.slow
def test_qlora_and_dora_on_the_4bit_base():
    policy = MultimodalPolicy.from_pretrained("tiny-mllama", quantization="4bit")
    batch = make_batch(policy)
    policy.add_adapter("policy", LoraSpec(method="qlora", r=4))
    losses = _losses(policy, batch)
    assert losses[-1] < losses[0] - 0.2
    with pytest.raises(ConfigError, match="loha cannot run on the 4bit base"):
        policy.add_adapter("other", LoraSpec(method="loha"))
