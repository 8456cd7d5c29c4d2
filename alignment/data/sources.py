"""``build_datasets``: one call from a data config to validated train and eval examples."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from alignment.data.catalog import DEFAULT_INSTRUCTION
from alignment.data.errors import DataSourceError
from alignment.data.loaders import load_examples
from alignment.data.scienceqa import is_scienceqa, load_scienceqa
from alignment.data.scienceqa_fixture import FIXTURE as SCIENCEQA_FIXTURE
from alignment.data.scienceqa_fixture import scienceqa_fixture_path
from alignment.data.synthetic import synthetic_bookcover_path
from alignment.data.transforms import image_blind, make_preference_pairs, sft_verbose_mix
from alignment.data.validate import ValidationReport, check_policy, validate_examples

SYNTHETIC = "synthetic_bookcover"
TASKS = ("sft", "preference")
_SPLIT_ALIASES = {"val": {"val", "validation", "valid", "dev"}, "validation": {"val", "validation", "valid", "dev"}}


def _in_split(tag: str | None, name: str) -> bool:
    return tag is not None and tag.lower() in _SPLIT_ALIASES.get(name.lower(), {name.lower()})


def _cover_draw(image_id: str) -> float:
    """A fixed pseudo-random number in [0, 1) per cover: covers drawing under ``eval_fraction`` are held out."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) / 2**32


def _is_eval_cover(image_id: str, eval_fraction: float) -> bool:
    """A fixed pseudo-random draw per cover, so a cover never lands in both splits."""
    return _cover_draw(image_id) < eval_fraction


def split_by_cover(examples: list[dict[str, Any]], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval) with about ``eval_fraction`` of the distinct ``image_id`` s in eval.

    Small data sets: train is never left empty by the draw (the highest-drawn cover goes back to train),
    and with ``eval_fraction > 0`` and at least two covers eval is not either (the lowest-drawn cover is
    held out)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    covers = sorted({e["image_id"] for e in examples}, key=_cover_draw)
    held = {c for c in covers if _is_eval_cover(c, eval_fraction)}
    if covers and len(held) == len(covers):
        held.discard(covers[-1])
    if eval_fraction > 0 and not held and len(covers) >= 2:
        held = {covers[0]}
    train, evaluation = [], []
    for example in examples:
        (evaluation if example["image_id"] in held else train).append(example)
    return train, evaluation


def _splits(examples: list[dict[str, Any]], train_split: str, eval_split: str, eval_fraction: float,
            source: str) -> tuple[list[dict], list[dict]]:
    """Use the rows' own split tags when present; carve eval out of train by cover otherwise."""
    if all(e.get("split") is None for e in examples):
        return split_by_cover(examples, eval_fraction)
    train = [e for e in examples if _in_split(e.get("split"), train_split)]
    evaluation = [e for e in examples if _in_split(e.get("split"), eval_split)]
    if not train:
        found = sorted({str(e.get("split")) for e in examples})
        raise DataSourceError(f"{source}: no rows in split {train_split!r}; the splits found are {found}")
    if not evaluation:
        train, evaluation = split_by_cover(train, eval_fraction)
    return train, evaluation


def _subsample(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _as_sft(examples: list[dict]) -> list[dict]:
    """Preference examples as SFT examples on their chosen answer."""
    return [{k: v for k, v in e.items() if k not in ("chosen", "rejected")} | {"answer": e["chosen"]}
            for e in examples]


def _load_scienceqa(source, task: str) -> tuple[list[dict], Path]:
    """ScienceQA-format problems (alignment/data/scienceqa.py) and their image folder: SFT only."""
    if task != "sft":
        raise DataSourceError(f"{source}: ScienceQA gives multiple-choice SFT examples, not preference pairs; "
                              "use it with sft or projector stages")
    examples = load_scienceqa(source)
    if not examples:
        raise DataSourceError(f"{source}: no ScienceQA problems")
    path = Path(source)
    return examples, path if path.is_dir() else path.parent


def build_datasets(
    source: str | os.PathLike = SYNTHETIC,
    *,
    format: str | None = None,
    task: str = "sft",
    train_split: str = "train",
    eval_split: str = "val",
    eval_fraction: float = 0.1,
    num_covers: int = 700,
    image_size: int | tuple[int, int] = 112,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_rows: int | None = None,
    verbose_fraction: float = 0.5,
    off_kind_fraction: float = 0.0,
    sft_verbose_fraction: float = 0.3,
    sft_verbose_rate: float = 1.0,
    sft_verbose_style: str = "any",
    instruction: str = DEFAULT_INSTRUCTION,
    validation: str = "error",
    tokenizer: Any = None,
    max_length: int | None = None,
    image_seq_length: int | None = None,
    blind: bool = False,
    cache_dir: str | os.PathLike | None = None,
    test_split: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], ValidationReport]:
    """(train examples, eval examples, validation report) for one data config.

    ``source`` is "synthetic_bookcover" (``num_covers`` covers of ``image_size`` px, square or (width,
    height), drawn with
    ``seed``, cached under ``cache_dir``), "scienceqa_fixture" (a generated ScienceQA-format folder of
    ``num_covers`` problems), a local file or folder (ScienceQA's problems.json or parquet included:
    format "scienceqa"), or a hub dataset name;
    ``format`` is detected from the columns when None. Splits come from the rows' tags
    (``set_name``/``split`` column, hub splits); without them, or without an eval split,
    ``eval_fraction`` of the covers go to eval. ``task="sft"`` gives SFT examples, with
    ``sft_verbose_fraction`` of the train answers made verbose (QA sources only; of those
    phrasings' examples, ``sft_verbose_rate``, with ``sft_verbose_style``'s templates);
    ``task="preference"`` gives preference examples, pairs built from QA sources with
    ``verbose_fraction`` verbose rejections (the rest wrong answers, ``off_kind_fraction`` of those
    answering another kind of question: training pairs only, so held-out pairs stay comparable). Every example is then
    validated with policy ``validation`` ("error" or "skip"); ``tokenizer`` (or the processor)
    and ``max_length`` add the length check. ``blind=True`` replaces every image by one gray
    image (the image-blind control).

    With ``test_split`` (e.g. "test"), only that split's rows come back, as the eval examples (train
    is empty): held out like eval, paired and capped the same way, never carved out of train (a source
    without such rows gives none).
    """
    check_policy(validation)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if str(source) == SYNTHETIC:
        source, format = synthetic_bookcover_path(num_covers, seed, image_size, cache_dir=cache_dir), "ocrvqa"
    if str(source) == SCIENCEQA_FIXTURE:
        source, format = scienceqa_fixture_path(num_covers, seed, cache_dir=cache_dir), "scienceqa"
    report = ValidationReport()
    scienceqa = format == "scienceqa" or (format is None and is_scienceqa(source))
    if scienceqa:  # multiple-choice SFT: answers are option letters, never made verbose or paired
        examples, base_dir = _load_scienceqa(source, task)
    else:
        examples, table = load_examples(source, format, policy=validation, report=report, max_rows=max_rows)
        base_dir = table.base_dir
    if not examples:
        raise DataSourceError(f"{source}: no usable rows ({report.summary()})")
    is_pairs = "chosen" in examples[0]  # preference and rlaifv rows
    if test_split is not None:
        train, evaluation = [], [e for e in examples if _in_split(e.get("split"), test_split)]
    else:
        train, evaluation = _splits(examples, train_split, eval_split, eval_fraction, str(source))
    train = _subsample(train, max_train_samples, seed)
    evaluation = _subsample(evaluation, max_eval_samples, seed + 1)

    if task == "sft" and not scienceqa:
        train, evaluation = (_as_sft(train), _as_sft(evaluation)) if is_pairs else (
            sft_verbose_mix(train, sft_verbose_fraction, seed, sft_verbose_rate, sft_verbose_style), evaluation)
    elif task == "preference" and not is_pairs:
        train = make_preference_pairs(train, verbose_fraction, seed, off_kind_fraction)
        evaluation = make_preference_pairs(evaluation, verbose_fraction, seed + 1)

    checks = dict(policy=validation, base_dir=base_dir, tokenizer=tokenizer, max_length=max_length,
                  image_seq_length=image_seq_length, instruction=instruction, report=report)
    train, _ = validate_examples(train, **checks)
    evaluation, _ = validate_examples(evaluation, **checks)
    if blind:
        train, evaluation = image_blind(train), image_blind(evaluation)
    return train, evaluation, report
