"""What a run checks once its data is built, before any step (a real run and `--dry-run` alike).

- `check_batches_fit`: every stage's training examples fill at least one batch on every process, else a
  `ConfigError` (one `error:` line, exit 2) naming the key to change;
- `no_val_warning`: the one line said when a stage has no `val` examples (its val metrics are then left
  out everywhere, never reported as 0.0);
- `large_images_warning`: the one line naming images over 40 megapixels.

`datasets` maps a stage's name to its `(train, val, validation report)`, as `recipe.build_data` gives it.
"""

from __future__ import annotations

from alignment.errors import ConfigError

PAIR_TASK_TYPES = ("dpo", "reward")  # stages whose training examples are preference pairs


def trained_examples(recipe, train: list) -> int:
    """How many training examples a stage will draw from: `data.select.k` of them when pruning is on."""
    select = recipe.data.select
    return len(train) if select is None else min(len(train), select.k)


def check_batches_fit(recipe, datasets: dict, world_size: int = 1) -> None:
    """`ConfigError` for the first stage whose training examples are fewer than one batch
    (`batch_size` per process x `world_size` processes): the run would stop at its first step."""
    for index, stage in enumerate(recipe.stages):
        have = trained_examples(recipe, datasets[stage.name][0])
        need = stage.batch_size * world_size
        if have >= need:
            continue
        what = "pairs" if stage.type in PAIR_TASK_TYPES else "examples"
        per = f" per process x {world_size} processes" if world_size > 1 else ""
        fits = have // world_size
        fix = (f"set stages.{index}.batch_size={fits} (raise stages.{index}.grad_accum to keep the batch's "
               "size) or add rows" if fits else "add rows (or tag fewer of them `split: val`)")
        raise ConfigError(f"stages.{index}.batch_size: {stage.batch_size}{per} is more than the {have} training "
                          f"{what} of stage {stage.name!r} (data {recipe.data.source}); {fix}")


def no_val_warning(recipe, datasets: dict) -> str | None:
    """One line when some stage has no `val` examples, saying how to get some; None when all have."""
    names = [s.name for s in recipe.stages if not datasets[s.name][1]]
    if not names:
        return None
    data = recipe.data
    return (f"warning: no val examples for stage {', '.join(names)}: val metrics are left out of the console, "
            f"report.json and the model card (not reported as 0); to get some, tag rows `split: val` in the data "
            f"or raise data.eval_fraction (now {data.eval_fraction:g}; above 0, data with 2 or more images always "
            "holds one out)")


def large_images_warning(datasets: dict, image_processor=None) -> str | None:
    """One line naming the largest image over 40 megapixels (all stages' data together); None if none."""
    from alignment.data.images import large_image_warning

    large = {}
    for _, _, report in datasets.values():
        large.update(report.large_images)
    return large_image_warning(large, image_processor)
