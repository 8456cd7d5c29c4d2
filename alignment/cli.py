"""Command line: `vlm-align {train,eval,generate,merge,compress}` (`launch/run.py` is `vlm-align train`).

A dispatcher: the parsers live here, each command's logic beside what it uses (`alignment.recipe` for train,
`alignment.evaluate.command`, `alignment.generation.command`, `alignment.merge`, `alignment.compress`), imported
only when that command runs.

    vlm-align train recipes/dpo_bookcover.yaml output_dir=outputs/run stages.1.beta=0.2
    vlm-align eval outputs/run/dpo [data.path=heldout.jsonl data.format=messages] [--out m.json]
    vlm-align generate outputs/run/dpo --image alignment/assets/sample_cover.png --question "Who wrote this book?"
    vlm-align report outputs/run                                                  (rebuild report.html)
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
import importlib
import json
import os
import sys

EXIT_USER_ERROR = 2
SPLITS = ("auto", "eval", "test", "all")  # `eval --split` (alignment.evaluate.command)


# ----------------------------------------------------------------------------- parsers
def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stages.1.beta=0.2")
    parser.add_argument("--dry-run", action="store_true", help="validate recipe, model and data; train nothing")
    _add_output_args(parser)


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-align train", description="Run a recipe's stages in order.")
    _add_train_args(parser)
    return parser


def _add_stage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", metavar="RUN_DIR/STAGE",
                        help="a stage's folder in a run's output_dir, e.g. outputs/dpo_bookcover/dpo")
    parser.add_argument("--recipe", metavar="YAML", default=None,
                        help="the run's recipe when RUN_DIR has no recipe.yaml (runs made before it was saved)")
    _add_output_args(parser)


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own warnings and progress bars too (hidden by default)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlm-align")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-align",
        description="Post-training (SFT, reward model, PPO, DPO, GRPO) for vision-language models.",
        epilog="Run `vlm-align COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
        "generate", help="answer a question about an image (greedy, or sampled)",
        description="Answer one question about one image with a policy stage (sft, dpo, ppo, grpo), in the "
                    "book-cover prompt format with the run's instruction: greedily by default, or --num-samples "
                    "answers sampled at --temperature / --top-p. Prints the answers, one a line.")
    _add_stage_arg(generate)
    generate.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    generate.add_argument("--question", required=True, help="the question about the image")
    generate.add_argument("--max-new-tokens", type=int, default=None,
                          help="generation budget (default: the stage's max_new_tokens)")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="sampling temperature (default: 0, greedy)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    generate.add_argument("--num-samples", type=int, default=1,
                          help="answers to sample (default: 1); more than 1 needs --temperature > 0")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
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
    report = commands.add_parser(
        "report", help="rebuild a run's page, RUN_DIR/report.html",
        description="Write RUN_DIR/report.html again from the run's files (report.json, recipe.yaml, each stage's "
                    "samples): one self-contained page with the recipe, curves, metrics and held-out answers.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    _add_output_args(report)
    return parser


def _add_adapters_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", metavar="DIR,DIR", default=None,
                        help="comma-separated adapter folders (e.g. `vlm-align compress` outputs) to load together "
                             "on the run's base in place of the stage's adapter; answers with each in turn")


def _user_errors() -> tuple[type[BaseException], ...]:
    from alignment.data.errors import DataValidationError
    from alignment.errors import ConfigError
    from alignment.merge import MergeError
    from alignment.models.registry import ModelAccessError, UnsupportedModelError
    from alignment.stages.base import NonFiniteLossError
    from alignment.stages.checkpoint import CheckpointError

    return (ConfigError, DataValidationError, CheckpointError, NonFiniteLossError, MergeError, FileNotFoundError,
            ModelAccessError, UnsupportedModelError)


def _guarded(command, args) -> int:
    """Run `command(args)`; a user error prints one line and returns 2 (raises with --debug)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.verbose:
        from alignment.quiet import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # for every process accelerate starts, too
    try:
        return command(args)
    except KeyboardInterrupt:  # before a stage's loop (which checkpoints, then exits 130 itself): nothing to save
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
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
    return 0  # each stage printed its metrics table, and the run its summary (alignment.summary)


COMMANDS = {  # command -> module whose `command(args)` runs it
    "eval": "alignment.evaluate.command",
    "generate": "alignment.generation.command",
    "merge": "alignment.merge",
    "compress": "alignment.compress",
    "report": "alignment.run_page",
}


def _command(name: str):
    if name == "train":
        return _train
    return importlib.import_module(COMMANDS[name]).command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    if argv[0] == "train":
        return train_main(argv[1:])
    args = parser.parse_args(argv)
    return _guarded(_command(args.command), args)


if __name__ == "__main__":
    sys.exit(main())
