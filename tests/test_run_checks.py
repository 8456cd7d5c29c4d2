"""run_checks: a batch larger than a stage's training data is one ConfigError naming the key and the size
that fits (processes and data.select counted); the no-val warning names the stages without val examples."""

import pytest

from alignment.config import ConfigError
from alignment.data import ValidationReport
from alignment.recipe import recipe_from_dict
from alignment.run_checks import check_batches_fit, no_val_warning


def recipe(**data):
    return recipe_from_dict({"data": {"source": "rows.jsonl", **data},
                             "stages": [{"type": "sft", "batch_size": 4}, {"type": "dpo", "batch_size": 8}]})


def datasets(sft_train: int, dpo_train: int, val: int = 1) -> dict:
    return {"sft": (list(range(sft_train)), list(range(val)), ValidationReport()),
            "dpo": (list(range(dpo_train)), list(range(val)), ValidationReport())}


def test_batches_that_fit_pass():
    check_batches_fit(recipe(), datasets(4, 8))
    check_batches_fit(recipe(), datasets(8, 16), world_size=2)


def test_the_first_stage_over_its_data_is_named_with_the_size_that_fits():
    with pytest.raises(ConfigError, match=r"^stages.1.batch_size: 8 is more than the 5 training pairs of stage 'dpo' "
                                          r"\(data rows.jsonl\); set stages.1.batch_size=5 "):
        check_batches_fit(recipe(), datasets(4, 5))
    with pytest.raises(ConfigError, match=r"stages.0.batch_size: 4 per process x 2 processes is more than the 7 "
                                          r"training examples .*set stages.0.batch_size=3 "):
        check_batches_fit(recipe(), datasets(7, 16), world_size=2)
    with pytest.raises(ConfigError, match=r"more than the 0 training examples .*; add rows"):
        check_batches_fit(recipe(), datasets(0, 16))


def test_data_select_keeps_k_examples():
    with pytest.raises(ConfigError, match="stages.0.batch_size: 4 is more than the 3 training examples"):
        check_batches_fit(recipe(select={"k": 3}), datasets(100, 100))


def test_no_val_warning_names_the_stages():
    assert no_val_warning(recipe(), datasets(4, 8)) is None
    line = no_val_warning(recipe(eval_fraction=0.0), datasets(4, 8, val=0))
    assert line.startswith("warning: no val examples for stage sft, dpo: ") and "\n" not in line
    assert "`split: val`" in line and "data.eval_fraction (now 0;" in line
