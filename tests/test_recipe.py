"""Recipes: every shipped YAML validates; unknown keys, bad types and stage types are refused."""

from pathlib import Path

import pytest
import yaml

from alignment.config import ConfigError, DataConfig, SFTConfig, field_docs
from alignment.recipe import apply_override, load_recipe, recipe_from_dict

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.output_dir


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"sft_bookcover.yaml", "dpo_bookcover.yaml", "dpo_llama32_vision_11b.yaml"} <= names


def minimal(**extra):
    return {"stages": [{"type": "sft"}], **extra}


def test_unknown_key_is_refused_with_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"type": "sft", "learning_rat": 1e-3}]}))
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message and "learning_rat" in message and "'lr'" in message


def test_unknown_stage_type_and_bad_types():
    with pytest.raises(ConfigError, match="unknown stage type 'rlhf'"):
        recipe_from_dict({"stages": [{"type": "rlhf"}]})
    with pytest.raises(ConfigError, match=r"stages.0.batch_size: expected int, got 'big'"):
        recipe_from_dict({"stages": [{"type": "sft", "batch_size": "big"}]})
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        recipe_from_dict({"stages": [{"type": "sft", "lr": 0}]})
    with pytest.raises(ConfigError, match="batch_size: must be > 0"):
        recipe_from_dict({"stages": [{"type": "dpo", "batch_size": -2}]})
    with pytest.raises(ConfigError, match="model.quantization"):
        recipe_from_dict(minimal(model={"quantization": "3bit"}))
    with pytest.raises(ConfigError, match="loss_type"):
        recipe_from_dict({"stages": [{"type": "dpo", "loss_type": "kto"}]})
    with pytest.raises(ConfigError, match=r"data.sft_verbose_style: must be one of \('any', 'answer_first'\)"):
        recipe_from_dict(minimal(data={"sft_verbose_style": "last"}))
    with pytest.raises(ConfigError, match=r"stages.reward.center_rewards: must be >= 0"):
        recipe_from_dict({"stages": [{"type": "reward", "center_rewards": -1}]})


def test_yaml_scientific_notation_and_renamed_keys():
    recipe = recipe_from_dict({"stages": [{"type": "sft", "lr": "2e-4"}]})
    assert recipe.stages[0].lr == 2e-4
    with pytest.warns(FutureWarning, match="grad_accum"):
        recipe = recipe_from_dict({"stages": [{"type": "sft", "gradient_accumulation_steps": 4}]})
    assert recipe.stages[0].grad_accum == 4


def test_dotted_overrides():
    raw = {"output_dir": "a", "data": {}, "stages": [{"type": "sft"}, {"type": "dpo", "beta": 0.1}]}
    for override in ("output_dir=/tmp/x", "stages.1.beta=0.2", "data.path=/data/c.parquet", "data.format=ocrvqa",
                     "resume=true"):
        apply_override(raw, override)
    recipe = recipe_from_dict(raw)
    assert recipe.output_dir == "/tmp/x" and recipe.stages[1].beta == 0.2 and recipe.resume is True
    assert recipe.data.source == "/data/c.parquet" and recipe.data.format == "ocrvqa"
    with pytest.raises(ConfigError, match="stages.5 does not exist"):
        apply_override(raw, "stages.5.beta=1")
    with pytest.raises(ConfigError, match="not key=value"):
        apply_override(raw, "beta")


def test_every_config_field_has_a_doc_line():
    for cls in (DataConfig, SFTConfig):
        docs = field_docs(cls)
        assert all(docs.values()), [k for k, v in docs.items() if not v]


@pytest.mark.parametrize("raw, guess", [
    ({"outptu_dir": "x", "stages": [{"type": "sft"}]}, "did you mean 'output_dir'?"),
    ({"stages": [{"type": "dpoo"}]}, "did you mean 'dpo'?"),
    ({"stages": [{"type": "sft", "learning_rat": 1e-3}]}, "did you mean 'lr'?"),  # through the renamed key
    ({"stages": [{"type": "sft", "lora": {"rr": 4}}]}, "stages.0.lora: unknown key(s) ['rr']"),
    ({"stages": [{"type": "sft", "bacth_size": 4, "zzz": 1}]}, "did you mean 'batch_size' for 'bacth_size'?"),
])
def test_misspelt_keys_and_stage_types_get_a_did_you_mean(raw, guess):
    with pytest.raises(ConfigError) as error:
        recipe_from_dict(raw)
    assert guess in str(error.value)
    assert "zzz'?" not in str(error.value)  # nothing close: no guess


def test_dpo_loss_types_and_their_weights():
    recipe = recipe_from_dict({"stages": [{"type": "dpo", "loss_type": ["sigmoid", "bco_pair", "sft"],
                                           "loss_weights": [0.8, 0.2, 1]}]})
    assert recipe.stages[0].loss_type == ["sigmoid", "bco_pair", "sft"] and recipe.stages[0].loss_weights == [0.8, 0.2, 1.0]
    for loss_type in ("apo_zero", "apo_down", "bco_pair", "orpo", "simpo", "cpo", "sft"):
        assert recipe_from_dict({"stages": [{"type": "dpo", "loss_type": loss_type}]}).stages[0].loss_type == loss_type
    for stage, needle in [
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, r"stages.dpo.loss_weights: 1 weight\(s\) for the 2"),
        ({"loss_type": "sigmoid", "loss_weights": [1.0]}, "stages.dpo.loss_weights: weights a list loss_type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1]}, "loss_weights: must be >= 0, got -1.0 .for sft."),
        ({"loss_type": ["sigmoid", "kto"]}, r"stages.dpo.loss_type: unknown loss type 'kto'; valid: \['apo_down'"),
        ({"loss_type": []}, "stages.dpo.loss_type: an empty list"),
        ({"loss_type": "cpo", "precompute_ref_logprobs": True}, "precompute_ref_logprobs: loss_type cpo is reference-free"),
        ({"loss_type": ["orpo", "sft"], "precompute_ref_logprobs": True}, "precompute_ref_logprobs: .*reference-free"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing: applies to the sigmoid loss only"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            recipe_from_dict({"stages": [{"type": "dpo", **stage}]})
    # A list holding a loss with a reference may precompute it; label smoothing goes to its sigmoid term.
    recipe_from_dict({"stages": [{"type": "dpo", "loss_type": ["sigmoid", "simpo"], "precompute_ref_logprobs": True,
                                  "label_smoothing": 0.1}]})


def test_dpo_loss_keys_have_doc_lines():
    from alignment.config import DPOConfig

    docs = field_docs(DPOConfig)
    assert "simpo" in docs["loss_type"] and "MPO" in docs["loss_weights"]
    assert "2.0" in docs["simpo_gamma"] and "every loss_type" in docs["beta"] and DPOConfig().simpo_gamma == 0.5
