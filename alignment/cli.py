"""Command line: `vlm-align train RECIPE [key=value ...]` (also `launch/run.py`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USER_ERROR = 2


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-align train", description="Run a recipe's stages in order.")
    parser.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stages.1.beta=0.2")
    parser.add_argument("--dry-run", action="store_true", help="validate recipe, model and data; train nothing")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from alignment.config import ConfigError
    from alignment.data.errors import DataValidationError
    from alignment.stages.base import NonFiniteLossError
    from alignment.stages.checkpoint import CheckpointError

    return (ConfigError, DataValidationError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def train_main(argv: list[str]) -> int:
    args = _train_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from alignment.recipe import describe, load_recipe, run_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        print(describe(recipe), flush=True)
        report = run_recipe(recipe, dry_run=args.dry_run)
    except _user_errors() as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if report.get("dry_run"):
        print("dry run ok: " + json.dumps(report["stages"]))
    else:
        for stage in report["stages"]:
            metrics = {k: round(v, 4) for k, v in stage["eval"].items() if isinstance(v, float) and "/" not in k}
            print(f"{stage['name']}: {json.dumps(metrics)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    print("usage: vlm-align train RECIPE [key=value ...] [--dry-run] [--debug]", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
