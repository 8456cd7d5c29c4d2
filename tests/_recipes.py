"""A tiny recipe for stage tests: few covers, few steps, small evaluation."""

from alignment.recipe import recipe_from_dict


def tiny_recipe(output_dir, stages=("sft", "dpo"), steps=4, batch_size=4, **top):
    raw = {
        "name": "test",
        "output_dir": str(output_dir),
        "model": {"name": "tiny-mllama", "quantization": "none"},
        "data": {"num_covers": 60, "max_eval_examples": 8},
        "stages": [
            {"type": kind, "name": kind, "max_steps": steps, "batch_size": batch_size, "save_every": 2,
             "eval_examples": 4, "eval_batch_size": 4, "max_new_tokens": 4}
            for kind in stages
        ],
        **top,
    }
    return raw


def build(raw):
    return recipe_from_dict(raw, "test")


def run_every_stage(out, name: str, quantization: str = "none") -> dict:
    """SFT -> DPO -> reward -> PPO -> GRPO on model `name`, 4 steps each, through `run_recipe`; checks that
    every stage trained with finite losses and that DPO's loss fell from ln 2. Returns the stages by name."""
    import math

    from alignment.recipe import run_recipe

    raw = tiny_recipe(out, stages=("sft", "dpo", "reward", "ppo", "grpo"), steps=4, batch_size=4,
                      model={"name": name, "quantization": quantization})
    for stage in raw["stages"]:
        stage["lr"] = 5e-3 if stage["type"] == "dpo" else stage.get("lr", 1e-3)
    report = run_recipe(build(raw))
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["sft", "dpo", "reward", "ppo", "grpo"]
    for stage in stages.values():
        assert stage["steps"] == 4 and all(math.isfinite(h["loss"]) for h in stage["history"]), stage["name"]
    dpo = stages["dpo"]["train"]
    assert abs(dpo["loss_first"] - math.log(2)) < 1e-5 and dpo["loss_last"] < dpo["loss_first"] - 0.02, dpo
    assert name in str(report["model"])
    return stages
