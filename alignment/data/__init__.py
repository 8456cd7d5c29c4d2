"""Data: sources, seed 000's prompt format, multi-QA splitting, preference pairs, validation, collators.

Example schema (what transforms produce and collators take):

- SFT: ``{"id": str, "image_id": str, "image": PIL.Image (RGB), "question": str, "answer": str,
  "kind": "author" | "title" | "genre" | "yesno" | "other"}``
- preference: ``{"id", "image_id", "image", "question", "kind", "chosen": str, "rejected": str,
  "answer": str}`` where ``answer`` is the concise correct answer when known, else ``chosen``.
- an example showing several images carries ``"images": [PIL.Image, ...]`` (placeholder order) in place of
  ``"image"``; a preference pair's two rows share all of them.

Loaded examples also carry provenance: ``source`` (file), ``row`` (index in it) and ``split``
(the row's split tag or None). Images stay undecoded until ``validate_examples``.

Typical use::

    train, evaluation, report = build_datasets("synthetic_bookcover", task="sft", seed=0)
    batch = collate_sft(train[:8], load_processor("tiny-mllama"))
"""

from alignment.data.catalog import DEFAULT_INSTRUCTION
from alignment.data.collate import collate_preference, collate_prompts, collate_sft, processor_family
from alignment.data.covers import blank_cover, render_cover
from alignment.data.errors import DataSourceError, DataValidationError
from alignment.data.loaders import FORMATS, check_columns, detect_format, load_examples, to_examples
from alignment.data.prompts import render_completion, render_prompt
from alignment.data.sources import build_datasets, split_by_cover
from alignment.data.synthetic import synthetic_bookcover, synthetic_bookcover_path
from alignment.data.tables import read_table
from alignment.data.transforms import (
    KINDS,
    image_blind,
    make_preference_pairs,
    question_kind,
    sft_verbose_mix,
    split_qa,
    verbose_answer,
    verbose_questions,
    wrong_answer,
)
from alignment.data.validate import ValidationReport, image_seq_length_of, validate_examples

__all__ = [
    "DEFAULT_INSTRUCTION",
    "FORMATS",
    "KINDS",
    "DataSourceError",
    "DataValidationError",
    "ValidationReport",
    "blank_cover",
    "build_datasets",
    "check_columns",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "detect_format",
    "image_blind",
    "image_seq_length_of",
    "load_examples",
    "make_preference_pairs",
    "processor_family",
    "question_kind",
    "read_table",
    "render_completion",
    "render_cover",
    "render_prompt",
    "sft_verbose_mix",
    "verbose_questions",
    "split_by_cover",
    "split_qa",
    "synthetic_bookcover",
    "synthetic_bookcover_path",
    "to_examples",
    "validate_examples",
    "verbose_answer",
    "wrong_answer",
]
