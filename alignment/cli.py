"""Command line: `vlm-align {train,eval,generate,merge,compress}` (`launch/run.py` is `vlm-align train`).

    vlm-align train recipes/dpo_bookcover.yaml output_dir=outputs/run stages.1.beta=0.2
    vlm-align eval outputs/run/dpo [data.path=heldout.jsonl data.format=messages] [--out m.json]
    vlm-align generate outputs/run/dpo --image cover.png --question "Who wrote this book?"
    vlm-align merge outputs/run/dpo merged/ [--dtype bf16|fp32]
    vlm-align compress outputs/run/sft [--out DIR] [--steps 200] [--lr 1e-4]      (BitDelta: a 1-bit delta)
    vlm-align eval outputs/run/sft --adapters outputs/run/sft-bitdelta,other/sft-bitdelta

`eval`, `generate`, `merge` and `compress` read the run's settings (base model, quantization,
instruction, data) from `RUN_DIR/recipe.yaml`, which `train` writes. With `--adapters a,b`, `eval`
and `generate` load every listed adapter folder on one base in one process (the multi-tenant case:
several fine-tunes, e.g. their 1-bit deltas, served from one base) and answer with each in turn.
Errors print one line and exit with status 2 (full traceback with --debug).
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
    evaluate.add_argument("--out", default=None, help="JSON file to write (default: RUN_DIR/eval-STAGE.json, "
                                                      "with --adapters RUN_DIR/eval-STAGE-adapters.json)")
    _add_adapters_arg(evaluate)

    generate = commands.add_parser(
        "generate", help="one greedy answer to a question about an image",
        description="Answer one question about one image with a policy stage (sft, dpo, ppo, grpo), greedily, "
                    "with seed 000's prompt and the run's instruction. Prints the answer.")
    _add_stage_arg(generate)
    generate.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    generate.add_argument("--question", required=True, help="the question about the image")
    generate.add_argument("--max-new-tokens", type=int, default=None,
                          help="generation budget (default: the stage's max_new_tokens)")
    _add_adapters_arg(generate)

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

    compress = commands.add_parser(
        "compress", help="BitDelta: a stage's fine-tuned delta as 1-bit signs + scales (per row, or per matrix)",
        description="Compress a policy stage's LoRA delta (scaling * B @ A per targeted linear) to its signs, "
                    "packed 8 per byte, and one scale per matrix (or per row), initialised at mean |delta| and distilled "
                    "(Adam on the scales only) to match the fine-tune's logits on the stage's training data. "
                    "Writes an adapter folder that `eval`/`generate` load like any other (--adapters) and prints "
                    "the bf16 delta's bytes against the 1-bit delta's.")
    _add_stage_arg(compress)
    compress.add_argument("--out", metavar="DIR", default=None,
                          help="adapter folder to write (default: RUN_DIR/STAGE-bitdelta)")
    compress.add_argument("--steps", type=int, default=200, help="scale distillation steps (default: 200; 0: "
                                                                 "keep mean |delta|)")
    compress.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the scales (default: 1e-4)")
    compress.add_argument("--scales", choices=("matrix", "row"), default="row",
                          help="one scale per output row (default: 4 more bytes a row; on sft_bookcover's LoRA delta "
                               "test EM 0.87 vs the fine-tune's 0.875) or one per matrix (the paper's: 0.73 there)")
    compress.add_argument("--samples", type=int, default=64,
                          help="training examples the distillation cycles over (default: 64)")
    compress.add_argument("--batch-size", type=int, default=8, help="examples per distillation step (default: 8)")
    compress.add_argument("--overwrite", action="store_true", help="replace DIR if it holds files")
    return parser


def _add_adapters_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", metavar="DIR,DIR", default=None,
                        help="comma-separated adapter folders (e.g. `vlm-align compress` outputs) to load together "
                             "on the run's base in place of the stage's adapter; answers with each in turn")


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
def _eval_setup(recipe, index: int, split: str, limit: int | None):
    """The base policy and the stage of `recipe.stages[index]` built as the run built it, holding the
    examples of `split` as its held-out examples; no adapter loaded. Returns (policy, stage, data)."""
    import dataclasses

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
    data = {"source": str(recipe.data.source), "format": recipe.data.format, "split": split,
            "examples": min(len(examples), config.eval_examples), "validation": report.summary()}
    return policy, stage, data


def evaluate_stage(recipe, index: int, split: str = "eval", limit: int | None = None) -> tuple[dict, dict]:
    """The stage's own `evaluate()` on `split` ("eval": the data's held-out split, "all": every row)
    with its saved adapter, set up as the run set it up. Returns (metrics, data description)."""
    import contextlib

    import torch

    policy, stage, data = _eval_setup(recipe, index, split, limit)
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


# ----------------------------------------------------------------------------- several adapters on one base
def adapter_folders(spec: str) -> dict[str, Path]:
    """`--adapters a,b` -> {adapter name: folder}: names from the folders' names (made unique, and safe as
    module keys), every folder checked to hold an adapter, and all of one kind (one base holds adapters
    of one PEFT type or one own method)."""
    import re

    from alignment.adapters.base import read_config
    from alignment.adapters.menu import method_of_peft_type
    from alignment.config import ConfigError
    from alignment.policy import ADAPTER_FILE

    folders = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if not folders:
        raise ConfigError("--adapters: give one or more adapter folders, separated by commas")
    named: dict[str, Path] = {}
    kinds: dict[str, str] = {}
    for folder in folders:
        if not (folder / ADAPTER_FILE).exists():
            raise FileNotFoundError(f"--adapters: no {ADAPTER_FILE} in {folder}")
        peft_type = read_config(folder).get("peft_type", "")
        kind = method_of_peft_type(peft_type) or f"PEFT {peft_type or 'LORA'}"
        if kind == "base_weights":
            raise ConfigError(f"--adapters: {folder} holds a projector stage's base weights, not an adapter")
        base = re.sub(r"\W", "_", folder.name) or "adapter"
        name, n = base, 2
        while name in named:
            name, n = f"{base}_{n}", n + 1
        named[name], kinds[name] = folder, kind
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{named[n]} ({k})" for n, k in kinds.items())
        raise ConfigError(f"--adapters: one base serves adapters of one kind at a time; got {listed}")
    return named


def load_adapters(policy, folders: dict[str, Path]) -> None:
    """Load every folder of `adapter_folders` as a frozen adapter of its name."""
    for name, folder in folders.items():
        policy.load_adapter(name, folder, trainable=False)
    policy.eval()


def evaluate_adapters(recipe, index: int, folders: dict[str, Path], split: str = "eval",
                      limit: int | None = None) -> tuple[dict[str, dict], dict]:
    """Each adapter of `folders` (`adapter_folders`) evaluated in turn on one base: an sft stage's own
    evaluation, or for the other policy stages exact match and answer length of greedy answers (their
    preference / reward / KL metrics need the run's reference adapters, which are not loaded beside
    them). Returns ({adapter name: metrics}, data description)."""
    from functools import partial

    import torch

    from alignment.config import ConfigError
    from alignment.data import collate_prompts
    from alignment.evaluate import answer_metrics, generate_answers

    config = recipe.stages[index]
    if config.type not in ("sft", "dpo", "ppo", "grpo"):
        raise ConfigError(f"--adapters: stage {config.name!r} is a {config.type} stage; evaluate adapters of a "
                          "policy stage (sft, dpo, ppo, grpo)")
    policy, stage, data = _eval_setup(recipe, index, split, limit)
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
    print(_table(rows))
    print(f"wrote {out}")
    return 0


def _write_json(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)


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
    folders = adapter_folders(args.adapters) if args.adapters else None
    image = _read_image(args.image)
    policy = load_base(recipe)
    budget = args.max_new_tokens or config.max_new_tokens
    if folders:  # several adapters on one base: one answer each, in turn
        load_adapters(policy, folders)
        for name in folders:
            policy.set_adapter(name)
            print(f"{name}: {generate_answer(policy, image, args.question, _instruction(recipe), budget)}")
        return 0
    policy.load_adapter("policy", Path(args.stage), trainable=False)
    policy.eval()
    print(generate_answer(policy, image, args.question, _instruction(recipe), budget))
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


# ----------------------------------------------------------------------------- compress
COMPRESSIBLE = ("lora", "qlora", "lora_fa")  # adapters whose update is a weight delta scaling * B @ A
COMPRESSED_NAME = "bitdelta"


def _adapter_method(folder: Path) -> str:
    """The menu method of a saved adapter folder (own methods by their peft_type, PEFT's from its config)."""
    from alignment.adapters.base import read_config
    from alignment.adapters.menu import method_of_peft_type
    from alignment.policy import METHOD_FILE, PEFT_TYPES

    saved = read_config(folder)
    own = method_of_peft_type(saved.get("peft_type", ""))
    if own is not None:
        return own
    if (folder / METHOD_FILE).exists():
        return json.loads((folder / METHOD_FILE).read_text())["method"]
    if saved.get("use_dora"):
        return "dora"
    return {v: k for k, v in PEFT_TYPES.items()}.get(saved.get("peft_type", "LORA"), "lora")


def compress_stage(recipe, index: int, out: Path, steps: int = 200, lr: float = 1e-4, samples: int = 64,
                   batch_size: int = 8, scales: str = "row") -> dict:
    """BitDelta of the stage's LoRA adapter (`alignment.bitdelta.compress_adapter`), its scales distilled on
    the stage's first `samples` training examples (collated as the stage trains on them); writes adapter
    folder `out` (with the base weights the stage's folder carries). Returns the stats."""
    import contextlib
    import shutil

    from alignment.bitdelta import compress_adapter
    from alignment.config import ConfigError
    from alignment.data import collate_preference, collate_sft
    from alignment.policy import ADAPTER_FILE, BASE_WEIGHTS_CONFIG, BASE_WEIGHTS_FILE
    from alignment.recipe import build_data, data_task, make_accelerator
    from alignment.stages.common import to_device

    config = recipe.stages[index]
    folder = Path(recipe.output_dir) / config.name
    if config.type not in ("sft", "dpo", "ppo", "grpo"):
        raise ConfigError(f"stage {config.name!r} is a {config.type} stage; compress a policy stage (sft, dpo, ppo, "
                          "grpo)")
    method = _adapter_method(folder)
    if method == "full":
        raise ConfigError(f"{folder} holds a full fine-tune; compressing one is not supported yet (its embeddings "
                          "and norms would travel in full precision beside the 1-bit linears); "
                          "`alignment.bitdelta.weight_deltas` gives its linears' deltas")
    if method not in COMPRESSIBLE:
        raise ConfigError(f"{folder} holds a {method} adapter; BitDelta compresses a weight delta (scaling * B @ A): "
                          f"a stage trained with lora.method {' / '.join(COMPRESSIBLE)}")
    accelerator = make_accelerator(recipe)
    policy = load_base(recipe, accelerator.device)
    with contextlib.redirect_stdout(sys.stderr):
        train = build_data(recipe, config, policy.processor)[0][:samples]
    if not train:
        raise ConfigError(f"stage {config.name!r} has no training examples to distil the scales on")
    collate = collate_sft if data_task(config) == "sft" else collate_preference
    kwargs = {"instruction": _instruction(recipe), "max_length": recipe.data.max_length}
    batches = [to_device(collate(train[i : i + batch_size], policy.processor, **kwargs), policy.device)
               for i in range(0, len(train), batch_size)]
    policy.load_adapter("policy", folder, trainable=False)
    onebit, stats = compress_adapter(policy, "policy", batches, steps=steps, lr=lr, name=COMPRESSED_NAME,
                                     autocast=accelerator.autocast, scales=scales)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (BASE_WEIGHTS_FILE, BASE_WEIGHTS_CONFIG):
        (out / stale).unlink(missing_ok=True)
    onebit.configs[COMPRESSED_NAME].update({
        "base_model_name_or_path": recipe.model.name, "source": str(folder), "source_method": method,
        "distillation": {"steps": steps, "lr": lr, "samples": len(train), "batch_size": batch_size,
                         "mse_base": stats["mse_base"], "mse_init": stats["mse_init"],
                         "mse_distilled": stats["mse_distilled"]},
        "bf16_delta_bytes": stats["bf16_bytes"], "onebit_bytes": stats["onebit_bytes"]})
    onebit.save(COMPRESSED_NAME, out)
    for carried in (BASE_WEIGHTS_FILE, BASE_WEIGHTS_CONFIG):  # a projector stage's weights travel along
        if (folder / carried).exists():
            shutil.copyfile(folder / carried, out / carried)
    stats.update(method=method, samples=len(train), source_file_bytes=(folder / ADAPTER_FILE).stat().st_size,
                 file_bytes=(out / ADAPTER_FILE).stat().st_size)
    return stats


def _compress(args) -> int:
    from alignment.config import ConfigError

    recipe, index, _ = open_stage(args.stage, args.recipe)
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    for flag, value in (("--lr", args.lr), ("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    config = recipe.stages[index]
    out = Path(args.out) if args.out else Path(recipe.output_dir) / f"{config.name}-{COMPRESSED_NAME}"
    if out.resolve() == Path(args.stage).resolve():
        raise ConfigError("--out must not be the stage's own folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new folder (or pass --overwrite)")
    stats = compress_stage(recipe, index, out, steps=args.steps, lr=args.lr, samples=args.samples,
                           batch_size=args.batch_size, scales=args.scales)
    print(f"compressed {config.name} ({stats['method']}, {stats['targets']} linear layers, one scale per "
          f"{args.scales}) into {out}")
    print(f"  delta: bf16 {stats['bf16_bytes']:,} bytes -> 1-bit {stats['onebit_bytes']:,} bytes "
          f"({stats['ratio']:.4f}, {1 / stats['ratio']:.1f}x smaller)")
    print(f"  files: {stats['method']} adapter {stats['source_file_bytes']:,} bytes, 1-bit adapter "
          f"{stats['file_bytes']:,} bytes")
    print(f"  logit MSE to the fine-tune on {stats['samples']} training examples: base {stats['mse_base']:.4g}, "
          f"1-bit at mean|delta| {stats['mse_init']:.4g}, distilled {stats['mse_distilled']:.4g} "
          f"({args.steps} steps, lr {args.lr:g})")
    print(f"serve it: vlm-align eval {args.stage} --adapters {out}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "generate": _generate, "merge": _merge, "compress": _compress}


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
