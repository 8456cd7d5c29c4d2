"""One tiny SFT -> DPO run made through `vlm-align train`, shared by the CLI and merge tests."""

from pathlib import Path

import yaml

from tests._recipes import tiny_recipe

_RUNS: dict[str, Path] = {}


def tiny_run(tmp_path_factory) -> Path:
    """The run folder (made once per test session): 2 steps per stage, 4 held-out examples each."""
    if "run" not in _RUNS:
        from alignment.cli import main

        root = tmp_path_factory.mktemp("cli-run")
        raw = tiny_recipe(root / "run", steps=2, batch_size=4)
        for stage in raw["stages"]:
            stage["max_new_tokens"] = 6
        recipe = root / "tiny.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        assert main(["train", str(recipe)]) == 0
        _RUNS["run"] = root / "run"
    return _RUNS["run"]


def held_out(run: Path, stage: str = "dpo") -> list[dict]:
    """The stage's eval examples, as the run built them."""
    from alignment.models import load_processor
    from alignment.recipe import build_data, load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    config = next(s for s in recipe.stages if s.name == stage)
    return build_data(recipe, config, load_processor(recipe.model.name))[1][: config.eval_examples]
