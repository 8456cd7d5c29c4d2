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
