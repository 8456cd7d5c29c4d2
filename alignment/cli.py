"""Command line: `vlm-align {train,eval,generate,merge}` (`launch/run.py` is `vlm-align train`).

    vlm-align train recipes/dpo_bookcover.yaml output_dir=outputs/run stages.1.beta=0.2
    vlm-align eval outputs/run/dpo [data.path=heldout.jsonl data.format=messages] [--out m.json]
    vlm-align generate outputs/run/dpo --image cover.png --question "Who wrote this book?"
    vlm-align merge outputs/run/dpo merged/ [--dtype bf16|fp32]

`eval`, `generate` and `merge` read the run's settings (base model, quantization, instruction,
data) from `RUN_DIR/recipe.yaml`, which `train` writes. Errors print one line and exit with
status 2 (full traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
SPLITS = ("auto", "eval", "test", "all")


# ----------------------------------------------------------------------------- parsers
def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stages.1.beta=0.2")
    parser.add_argument("--dry-run", action="store_true", help="validate recipe, model and data; train nothing")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-align train", description="Run a recipe's stages in order.")
    _add_train_args(parser)
    return parser


def _add_stage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", metavar="RUN_DIR/STAGE",
                        help="a stage's folder in a run's output_dir, e.g. outputs/dpo_bookcover/dpo")
    parser.add_argument("--recipe", metavar="YAML", default=None,
                        help="the run's recipe when RUN_DIR has no recipe.yaml (runs made before it was saved)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-align", description="Post-training (SFT, reward model, PPO, DPO) for vision-language models.",
        epilog="Run `vlm-align COMMAND --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="run a recipe (also: accelerate launch -m alignment.cli train ...)",
                                description="Run a recipe's stages in order; the same as launch/run.py.")
    _add_train_args(train)

    evaluate = commands.add_parser(
        "eval", help="a stage's metrics on its eval split or any data source",
        description="Evaluate a trained stage with the stage's own evaluation (the numbers of report.json) on "
                    "the run's eval split, or on another data source given as data.* overrides. Writes JSON "
                    "and prints a table.")
    _add_stage_arg(evaluate)
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="overrides of the run's recipe, e.g. data.path=heldout.jsonl data.format=messages "
                               "stages.1.eval_batch_size=8")
    evaluate.add_argument("--split", choices=SPLITS, default="auto",
                          help="eval: the data's held-out (val) split; test: its test split (never tuned on); "
                               "all: every row; auto (default): eval for the run's own data, all when data.* "
                               "settings are overridden")
    evaluate.add_argument("--limit", type=int, default=None,
                          help="evaluate at most N examples (default: the stage's eval_examples for the eval "
                               "split, every example for --split all)")
    evaluate.add_argument("--out", default=None, help="JSON file to write (default: RUN_DIR/eval-STAGE.json)")

    generate = commands.add_parser(
        "generate", help="one greedy answer to a question about an image",
        description="Answer one question about one image with a policy stage (sft, dpo, ppo, grpo), greedily, "
                    "with seed 000's prompt and the run's instruction. Prints the answer.")
    _add_stage_arg(generate)
    generate.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    generate.add_argument("--question", required=True, help="the question about the image")
    generate.add_argument("--max-new-tokens", type=int, default=None,
                          help="generation budget (default: the stage's max_new_tokens)")

    merge = commands.add_parser(
        "merge", help="merge a stage's LoRA into its base: a plain transformers checkpoint",
        description="Merge a policy stage's LoRA adapter into the base model (loaded unquantised, also for "
                    "4-bit runs) and save model and processor to OUT_DIR, loadable with "
                    "AutoModelForImageTextToText.from_pretrained(OUT_DIR) and AutoProcessor.from_pretrained(OUT_DIR).")
    _add_stage_arg(merge)
    merge.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist or be empty)")
    merge.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16",
                       help="dtype of the merged weights (default: bf16)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from alignment.config import ConfigError
    from alignment.data.errors import DataValidationError
    from alignment.merge import MergeError
    from alignment.models.registry import ModelAccessError, UnsupportedModelError
    from alignment.stages.base import NonFiniteLossError
    from alignment.stages.checkpoint import CheckpointError

    return (ConfigError, DataValidationError, CheckpointError, NonFiniteLossError, MergeError, FileNotFoundError,
            ModelAccessError, UnsupportedModelError)


def _guarded(command, args) -> int:
    """Run `command(args)`; a user error prints one line and returns 2 (raises with --debug)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return command(args)
    except _user_errors() as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


# ----------------------------------------------------------------------------- train
def train_main(argv: list[str]) -> int:
    # Intermixed: `RECIPE --dry-run key=value` works as well as `RECIPE key=value --dry-run`.
    return _guarded(_train, _train_parser().parse_intermixed_args(argv))


def _train(args) -> int:
    from alignment.recipe import describe, load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(describe(recipe), flush=True)
    report = run_recipe(recipe, dry_run=args.dry_run)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if report.get("dry_run"):
        print("dry run ok: " + json.dumps(report["stages"]))
    else:
        for stage in report["stages"]:
            for split, key in (("val", "eval"), ("test", "test")):
                metrics = {k: round(v, 4) for k, v in stage.get(key, {}).items() if isinstance(v, float) and "/" not in k}
                if metrics:
                    print(f"{stage['name']} [{split}]: {json.dumps(metrics)}")
    return 0


# ----------------------------------------------------------------------------- a run's stage
def open_stage(target: str | os.PathLike, recipe_path: str | None = None, overrides=()):
    """(recipe with `overrides`, stage index, saved recipe) for `RUN_DIR/STAGE`; output_dir = RUN_DIR."""
    from alignment.config import ConfigError
    from alignment.policy import ADAPTER_FILE
    from alignment.recipe import RECIPE_FILE, load_recipe

    folder = Path(target)
    run_dir = folder.parent
    recipe_file = Path(recipe_path) if recipe_path else run_dir / RECIPE_FILE
    if not recipe_file.exists():
        raise ConfigError(f"{run_dir} has no {RECIPE_FILE} (the resolved recipe `vlm-align train` saves); "
                          "give RUN_DIR/STAGE of a run, or pass --recipe with the recipe the run was trained with")
    saved = load_recipe(recipe_file)
    recipe = load_recipe(recipe_file, list(overrides))
    saved.output_dir = recipe.output_dir = str(run_dir)
    names = [s.name for s in recipe.stages]
    if folder.name not in names:
        raise ConfigError(f"{folder.name!r} is not a stage of the run in {run_dir}; its stages: {names}")
    if not (folder / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_FILE}: stage {folder.name!r} has not finished")
    return recipe, names.index(folder.name), saved


def load_base(recipe, device=None):
    """The run's base model (quantised as it was trained) as a `MultimodalPolicy`, on `device`."""
    import torch

    from alignment.policy import MultimodalPolicy
    from alignment.recipe import model_dtype

    policy = MultimodalPolicy.from_pretrained(recipe.model.name, quantization=recipe.model.quantization,
                                              dtype=model_dtype(recipe), trust_remote_code=recipe.model.trust_remote_code,
                                              min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels)
    if recipe.model.quantization == "none":
        policy.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return policy


def _instruction(recipe) -> str:
    from alignment.data.catalog import DEFAULT_INSTRUCTION

    return recipe.data.instruction or DEFAULT_INSTRUCTION


# ----------------------------------------------------------------------------- eval
def evaluate_stage(recipe, index: int, split: str = "eval", limit: int | None = None) -> tuple[dict, dict]:
    """The stage's own `evaluate()` on `split` ("eval": the data's held-out split, "all": every row)
    with its saved adapter, set up as the run set it up. Returns (metrics, data description)."""
    import contextlib
    import dataclasses

    import torch

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
            from alignment.config import ConfigError

            raise ConfigError(f"data source {recipe.data.source} has no `test` split")
    else:
        train, evaluation, report = build_data(recipe, config, policy.processor)
        examples = train + evaluation if split == "all" else evaluation
    config.eval_examples = limit if limit is not None else (len(examples) if split == "all" else config.eval_examples)
    out = Path(recipe.output_dir)
    instruction = _instruction(recipe)
    ctx = RunContext(
        accelerator=accelerator, output_dir=out, seed=recipe.seed, recipe_name=recipe.name, data_config=recipe.data,
        collate_kwargs={"instruction": instruction, "max_length": recipe.data.max_length},
        prompt_kwargs={"instruction": instruction},
        stage_types={s.name: s.type for s in recipe.stages[:index]},
        load_policy=lambda: load_base(recipe, accelerator.device), report_to=("none",),
    )
    stage = STAGES[config.type](config, policy, ctx, [], examples)
    previous = out / recipe.stages[index - 1].name if index > 0 else None
    with contextlib.redirect_stdout(sys.stderr):  # setup's notes are not the command's output
        stage.setup(previous)  # the adapters the run set up: reference, reward model, ...
    policy.load_adapter(stage.adapter_name, stage.dir, trainable=False)  # then the stage's trained weights
    for model in [policy, *getattr(stage, "models", {}).values()]:  # PPO's roles may sit on other bases
        model.eval()
    with torch.no_grad():
        metrics = stage.evaluate()
    data = {"source": str(recipe.data.source), "format": recipe.data.format, "split": split,
            "examples": min(len(examples), config.eval_examples), "validation": report.summary()}
    return metrics, data


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _eval(args) -> int:
    import dataclasses

    from alignment.config import ConfigError

    recipe, index, saved = open_stage(args.stage, args.recipe, args.overrides)
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be > 0, got {args.limit}")
    split = args.split
    if split == "auto":
        split = "eval" if dataclasses.asdict(recipe.data) == dataclasses.asdict(saved.data) else "all"
    config = recipe.stages[index]
    metrics, data = evaluate_stage(recipe, index, split, args.limit)
    scalars = _scalars(metrics)
    run_dir = Path(recipe.output_dir)
    payload = {"run": str(run_dir), "stage": config.name, "type": config.type, "data": data, "metrics": scalars,
               "samples": metrics.get("samples", [])}
    out = Path(args.out) if args.out else run_dir / f"eval-{config.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)

    reported = {}
    if split in ("eval", "test") and (run_dir / "report.json").exists():
        entries = json.loads((run_dir / "report.json").read_text()).get("stages", [])
        key = "eval" if split == "eval" else "test"
        reported = next((_scalars(e.get(key, {})) for e in entries if e.get("name") == config.name), {})
    header = ["metric", "value"] + (["report.json"] if reported else [])
    rows = [header] + [[key, _fmt(value)] + ([_fmt(reported.get(key, "-"))] if reported else [])
                       for key, value in scalars.items()]
    print(f"{config.name} ({config.type}) on {data['source']} [{split}, {data['examples']} examples]")
    print(_table(rows))
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- generate
def _read_image(path: str):
    from alignment.data.errors import DataValidationError
    from alignment.data.images import ImageProblem, open_image, to_rgb

    file = Path(path).expanduser().resolve()
    try:
        return to_rgb(open_image(file, file.parent))[0]
    except ImageProblem as problem:
        raise DataValidationError(f"--image: {problem.problem}") from None


def generate_answer(policy, image, question: str, instruction: str, max_new_tokens: int) -> str:
    """One greedy answer of the policy's active adapter, with seed 000's prompt."""
    import torch

    from alignment.data import collate_prompts

    example = {"id": "cli", "image_id": "cli", "image": image, "question": question, "answer": "", "kind": "other"}
    batch = collate_prompts([example], policy.processor, instruction=instruction)
    batch = {k: v.to(policy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = policy.generate(batch, max_new_tokens=max_new_tokens, temperature=0.0)
    return policy.decode(tokens)[0]


def _generate(args) -> int:
    from alignment.config import ConfigError

    recipe, index, _ = open_stage(args.stage, args.recipe)
    config = recipe.stages[index]
    if config.type == "reward":
        raise ConfigError(f"stage {config.name!r} is a reward model; generate with a policy stage (sft, dpo, ppo, grpo)")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    image = _read_image(args.image)
    policy = load_base(recipe)
    policy.load_adapter("policy", Path(args.stage), trainable=False)
    policy.eval()
    answer = generate_answer(policy, image, args.question, _instruction(recipe),
                             args.max_new_tokens or config.max_new_tokens)
    print(answer)
    return 0


# ----------------------------------------------------------------------------- merge
def _merge(args) -> int:
    from alignment.merge import merge_adapter

    recipe, index, _ = open_stage(args.stage, args.recipe)
    if recipe.model.quantization != "none":
        print(f"note: the run trained on a {recipe.model.quantization} base; merging into the unquantised "
              f"base weights in {args.dtype}", file=sys.stderr)
    out = merge_adapter(recipe.model.name, args.stage, args.out_dir, dtype=args.dtype,
                        trust_remote_code=recipe.model.trust_remote_code, overwrite=args.overwrite)
    print(f"merged {args.stage} into {recipe.model.name} ({args.dtype}): {out}")
    print(f"load it with AutoModelForImageTextToText.from_pretrained({str(out)!r}) and "
          f"AutoProcessor.from_pretrained({str(out)!r})")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "generate": _generate, "merge": _merge}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if argv[0] == "train":
        return train_main(argv[1:])
    args = parser.parse_args(argv)
    return _guarded(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
