"""Where an adapter goes: presets, and `lora.target_modules` as PEFT reads it (names as suffixes, or one regex)."""

import pytest

from alignment.adapters.spec import LoraSpec, resolve_targets
from alignment.config import ConfigError
from alignment.recipe import recipe_from_dict
from alignment.stages.common import lora_spec
from tests._policy import load


@pytest.fixture(scope="module")
def policy():
    return load("tiny-mllama")


def test_names_match_as_suffixes_and_a_string_is_a_regex(policy):
    model = policy.base_model
    linears = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"]
    by_names = resolve_targets(model, ["q_proj", "v_proj"])
    assert by_names == sorted(n for n in linears if n.endswith((".q_proj", ".v_proj")))
    assert any("vision" in n for n in by_names) and any("language" in n for n in by_names)
    by_regex = resolve_targets(model, r".*language_model.*\.(q_proj|v_proj)")
    assert by_regex == [n for n in by_names if "language_model" in n]
    full_name = by_regex[0]
    assert resolve_targets(model, [full_name]) == [full_name]  # a full name is its own suffix


def test_a_target_that_matches_nothing_is_one_line_naming_the_key(policy):
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\] matches no linear module") as error:
        resolve_targets(policy.base_model, ["qkv"])
    assert "\n" not in str(error.value)


def test_the_adapter_goes_where_target_modules_says(policy):
    targets = policy.add_adapter("only_v", LoraSpec(target_modules=r".*language_model.*\.v_proj"))
    assert targets and all(t.endswith(".v_proj") and "language_model" in t for t in targets)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.base_model.named_modules() if n.endswith(".lora_A")}
    assert lora_modules == set(targets)


def test_recipe_key_reaches_the_spec_and_is_checked():
    recipe = recipe_from_dict({"stages": [{"type": "sft", "lora": {"target_modules": ["q_proj", "v_proj"]}}]})
    assert lora_spec(recipe.stages[0]).target_modules == ["q_proj", "v_proj"]
    recipe = recipe_from_dict({"stages": [{"type": "sft", "lora": {"target_modules": "q_proj|v_proj"}}]})
    assert lora_spec(recipe.stages[0]).target_modules == "q_proj|v_proj"
    bad = [({"method": "bottleneck", "target_modules": ["q_proj"]}, "applies to the PEFT methods"),
           ({"target_modules": "q_proj("}, "not a valid regex"), ({"target_modules": []}, "at least one module")]
    for lora, message in bad:
        with pytest.raises(ConfigError, match=message):
            recipe_from_dict({"stages": [{"type": "sft", "lora": lora}]})
