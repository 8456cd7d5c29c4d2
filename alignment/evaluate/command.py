"""`vlm-align eval RUN_DIR/STAGE`: a trained stage's own evaluation (the numbers of report.json) run again, on the
run's val or test split, on every row, or on another data source given as `data.*` overrides; with
`--adapters a,b`, several adapters on one base, a column each. Writes JSON and prints a table."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from alignment.errors import ConfigError
from alignment.evaluate.metrics import answer_metrics, generate_answers
from alignment.runs import adapter_folders, instruction_of, load_adapters, load_base, open_stage
from alignment.summary import format_table


def eval_setup(recipe, index: int, split: str, limit: int | None):
    """The base policy and the stage of `recipe.stages[index]` built as the run built it, holding the
    examples of `split` as its held-out examples; no adapter loaded. Returns (policy, stage, data)."""
    from alignment.recipe import build_data, build_test_data, make_accelerator
    from alignment.stages import STAGES, RunContext

    config = recipe.stages[index]
    if split == "all":  # every row as it is: no verbose rewriting of answers, no caps
        recipe.data = dataclasses.replace(recipe.data, sft_verbose_fraction=0.0, max_train_examples=None,
                                          max_eval_examples=None)
    accelerator = make_accelerator(recipe)
    policy = load_base(recipe, accelerator.device)
    if split == "test":
        examples, report = build_test_data(recipe, config, policy.processor)
        if not examples:
            raise ConfigError(f"data source {recipe.data.source} has no `test` split")
    else:
        train, evaluation, report = build_data(recipe, config, policy.processor)
        examples = train + evaluation if split == "all" else evaluation
        if not examples:
            raise ConfigError(f"data source {recipe.data.source} has no val examples; tag rows `split: val` or raise "
                              "data.eval_fraction, or use --split all / --split test")
    config.eval_examples = limit if limit is not None else (len(examples) if split == "all" else config.eval_examples)
    out = Path(recipe.output_dir)
    instruction = instruction_of(recipe)
    ctx = RunContext(
        accelerator=accelerator, output_dir=out, seed=recipe.seed, recipe_name=recipe.name, data_config=recipe.data,
        collate_kwargs={"instruction": instruction, "max_length": recipe.data.max_length},
        prompt_kwargs={"instruction": instruction},
        stage_types={s.name: s.type for s in recipe.stages[:index]},
        load_policy=lambda: load_base(recipe, accelerator.device), report_to=("none",),
    )
    stage = STAGES[config.type](config, policy, ctx, [], examples)
    data = {"source": str(recipe.data.source), "format": recipe.data.format, "split": split,
            "examples": min(len(examples), config.eval_examples), "validation": report.summary()}
    return policy, stage, data


def evaluate_stage(recipe, index: int, split: str = "eval", limit: int | None = None) -> tuple[dict, dict]:
    """The stage's own `evaluate()` on `split` ("eval": the data's held-out split, "all": every row)
    with its saved adapter, set up as the run set it up. Returns (metrics, data description)."""
    policy, stage, data = eval_setup(recipe, index, split, limit)
    out = Path(recipe.output_dir)
    previous = out / recipe.stages[index - 1].name if index > 0 else None
    with contextlib.redirect_stdout(sys.stderr):  # setup's notes are not the command's output
        stage.setup(previous)  # the adapters the run set up: reference, reward model, ...
    policy.load_adapter(stage.adapter_name, stage.dir, trainable=False)  # then the stage's trained weights
    for model in [policy, *getattr(stage, "models", {}).values()]:  # PPO's roles may sit on other bases
        model.eval()
    with torch.no_grad():
        metrics = stage.evaluate()
    return metrics, data


def evaluate_adapters(recipe, index: int, folders: dict[str, Path], split: str = "eval",
                      limit: int | None = None) -> tuple[dict[str, dict], dict]:
    """Each adapter of `folders` (`runs.adapter_folders`) evaluated in turn on one base: an sft stage's own
    evaluation, or for the other policy stages exact match and answer length of greedy answers (their
    preference / reward / KL metrics need the run's reference adapters, which are not loaded beside
    them). Returns ({adapter name: metrics}, data description)."""
    from alignment.data import collate_prompts

    config = recipe.stages[index]
    if config.type not in ("sft", "dpo", "ppo", "grpo"):
        raise ConfigError(f"--adapters: stage {config.name!r} is a {config.type} stage; evaluate adapters of a "
                          "policy stage (sft, dpo, ppo, grpo)")
    policy, stage, data = eval_setup(recipe, index, split, limit)
    load_adapters(policy, folders)
    results = {}
    for name in folders:
        policy.set_adapter(name)
        with torch.no_grad():
            if config.type == "sft":
                results[name] = stage.evaluate()
                continue
            examples = stage.eval_examples[: config.eval_examples]
            predictions, references, kinds = generate_answers(
                policy, examples, partial(collate_prompts, processor=policy.processor, **stage.ctx.prompt_kwargs),
                batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
            metrics = answer_metrics(predictions, references, kinds)
            metrics["samples"] = [{"question": e["question"], "answer": r, "prediction": p}
                                  for e, r, p in list(zip(examples, references, predictions))[:8]]
            results[name] = metrics
    return results, data


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_json(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)


def command(args) -> int:
    """`vlm-align eval` (arguments from `alignment.cli`'s parser)."""
    recipe, index, saved = open_stage(args.stage, args.recipe, args.overrides)
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be > 0, got {args.limit}")
    split = args.split
    if split == "auto":
        split = "eval" if dataclasses.asdict(recipe.data) == dataclasses.asdict(saved.data) else "all"
    config = recipe.stages[index]
    if args.adapters:
        return _eval_adapters(args, recipe, index, split)
    metrics, data = evaluate_stage(recipe, index, split, args.limit)
    scalars = _scalars(metrics)
    run_dir = Path(recipe.output_dir)
    payload = {"run": str(run_dir), "stage": config.name, "type": config.type, "data": data, "metrics": scalars,
               "samples": metrics.get("samples", [])}
    out = Path(args.out) if args.out else run_dir / f"eval-{config.name}.json"
    _write_json(out, payload)

    reported = {}
    if split in ("eval", "test") and (run_dir / "report.json").exists():
        entries = json.loads((run_dir / "report.json").read_text()).get("stages", [])
        key = "eval" if split == "eval" else "test"
        reported = next((_scalars(e.get(key, {})) for e in entries if e.get("name") == config.name), {})
    header = ["metric", "value"] + (["report.json"] if reported else [])
    rows = [header] + [[key, _fmt(value)] + ([_fmt(reported.get(key, "-"))] if reported else [])
                       for key, value in scalars.items()]
    print(f"{config.name} ({config.type}) on {data['source']} [{split}, {data['examples']} examples]")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


def _eval_adapters(args, recipe, index: int, split: str) -> int:
    """`eval --adapters a,b`: every adapter on one base, a column each."""
    config = recipe.stages[index]
    folders = adapter_folders(args.adapters)
    results, data = evaluate_adapters(recipe, index, folders, split, args.limit)
    run_dir = Path(recipe.output_dir)
    payload = {"run": str(run_dir), "stage": config.name, "type": config.type, "data": data,
               "adapters": {name: {"folder": str(folders[name]), "metrics": _scalars(metrics),
                                   "samples": metrics.get("samples", [])} for name, metrics in results.items()}}
    out = Path(args.out) if args.out else run_dir / f"eval-{config.name}-adapters.json"
    _write_json(out, payload)
    scalars = {name: _scalars(metrics) for name, metrics in results.items()}
    keys = list(dict.fromkeys(k for metrics in scalars.values() for k in metrics))
    rows = [["metric", *scalars]] + [[key, *(_fmt(m.get(key, "-")) for m in scalars.values())] for key in keys]
    print(f"{config.name} ({config.type}) on {data['source']} [{split}, {data['examples']} examples], "
          f"{len(folders)} adapters on one base")
    print(format_table(rows))
    print(f"wrote {out}")
    return 0
