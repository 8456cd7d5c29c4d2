"""Checking every example before training: a clear error, or a counted skip.

``validate_examples`` decodes each image (once per distinct image) into PIL RGB and checks:

    reason                  what
    missing_image           no image, or the image file does not exist
    image_outside_folder    an image path resolving outside the data folder (``..``, symlinks)
    corrupt_image           bytes or file that Pillow cannot decode
    unconvertible_image     an image with no faithful RGB form (NaN pixels, a mode Pillow cannot convert)
    empty_question          empty question
    empty_answer            empty answer / chosen / rejected
    chosen_equals_rejected  a preference pair whose two answers are the same
    too_long                prompt + completion over ``max_length`` tokens (never truncated:
                            truncating could cut the image tokens or the answer away)
    malformed_row           a row the loader could not read (see loaders.py)

Non-RGB images are converted faithfully (``images.to_rgb``: 16-bit rescaled, alpha laid on white) and
counted (``converted_to_rgb``), not skipped; images over 40 megapixels are listed (``large_images``) for
one warning line.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from alignment.data.catalog import DEFAULT_INSTRUCTION
from alignment.data.errors import SKIP_HINT, DataValidationError, row_error, where
from alignment.data.images import ImageProblem, images_of, is_large, open_image, to_rgb, with_images
from alignment.data.prompts import prompt_format, seed_000_format

Policy = Literal["error", "skip"]
POLICIES = ("error", "skip")

_FIXES = {
    "empty_question": f"Fill in the question or remove the row ({SKIP_HINT})",
    "empty_answer": f"Fill in the answer or remove the row ({SKIP_HINT})",
    "chosen_equals_rejected": "A preference pair needs two different answers; fix or remove the row",
    "too_long": f"Raise data.max_length, shorten the text, {SKIP_HINT}; rows are never truncated",
}


@dataclass
class ValidationReport:
    """What validation saw: rows in, rows kept, skips per reason, images converted to RGB, and the
    images over 40 megapixels (``{name: (width, height)}``)."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted_to_rgb: int = 0
    large_images: dict = field(default_factory=dict)

    def merge(self, other: ValidationReport) -> ValidationReport:
        """The sum of two reports (e.g. train and eval)."""
        return ValidationReport(self.total + other.total, self.kept + other.kept,
                                self.skipped + other.skipped, self.converted_to_rgb + other.converted_to_rgb,
                                {**self.large_images, **other.large_images})

    def summary(self) -> str:
        """One line, e.g. ``kept 98/100; skipped: missing_image=2; converted to RGB: 1``."""
        skips = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"kept {self.kept}/{self.total}; skipped: {skips}; converted to RGB: {self.converted_to_rgb}"


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"validation policy must be one of {POLICIES}, got {policy!r}")


def _token_count(tokenizer: Any, text: str) -> int:
    """Number of ids ``tokenizer(text)`` returns (no special tokens added: the text has them)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False)
    except TypeError:
        encoded = tokenizer(text)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if hasattr(ids, "shape") and len(ids.shape) == 2:  # a tensor [1, T]
        ids = ids[0]
    return len(ids)


def image_seq_length_of(processor: Any) -> int:
    """How many input tokens one image placeholder becomes, measured through the processor: 1 for
    Mllama (whatever its tiles: they are read by cross-attention), 576 for LLaVA at 336 px."""
    from alignment.data.covers import blank_cover
    from alignment.data.prompts import image_token_of

    token = image_token_of(processor)
    ids = processor(text=[token], images=[[blank_cover(112)]], add_special_tokens=False)["input_ids"][0]
    return list(ids).count(processor.tokenizer.convert_tokens_to_ids(token))


def _length_tools(tokenizer: Any, image_seq_length: int | None) -> tuple[Any, int, Any]:
    """(tokenizer, image_seq_length, ``fmt(n_images)`` -> PromptFormat); a processor gives its tokenizer, its
    image token count and its chat template's formats; a bare tokenizer seed 000's and one token per image."""
    fmt = seed_000_format
    if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "image_processor"):
        fmt = partial(prompt_format, tokenizer)
        if image_seq_length is None:
            image_seq_length = image_seq_length_of(tokenizer)
        tokenizer = tokenizer.tokenizer
    return tokenizer, 1 if image_seq_length is None else image_seq_length, fmt


def _text_problem(example: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """(reason, field, problem, fix) for the first bad text field of an SFT or preference example."""
    sample = example.get("id")
    if not str(example.get("question") or "").strip():
        return "empty_question", "question", f"empty question (sample {sample!r})", _FIXES["empty_question"]
    for name in ("chosen", "rejected") if "chosen" in example else ("answer",):
        if not str(example.get(name) or "").strip():
            return "empty_answer", name, f"empty {name} (sample {sample!r})", _FIXES["empty_answer"]
    if "chosen" in example and example["chosen"].strip() == example["rejected"].strip():
        return ("chosen_equals_rejected", "rejected", f"chosen == rejected == {example['chosen']!r} "
                f"(sample {sample!r})", _FIXES["chosen_equals_rejected"])
    return None


def _length_problem(example: dict[str, Any], tokenizer: Any, max_length: int | None, image_seq_length: int,
                    instruction: str, fmt=None) -> tuple[str, str, str, str] | None:
    """(reason, field, problem, fix) when prompt + the longest answer is over ``max_length`` tokens,
    counted as the model sees them (each image placeholder expanded to ``image_seq_length`` tokens).
    ``fmt(n_images)`` gives the prompt format of a turn with that many images."""
    if max_length is None:
        return None
    n_images = len(images_of(example))
    turn = fmt(n_images)
    prompt = turn.prompt(example["question"], instruction)
    names = ("chosen", "rejected") if "chosen" in example else ("answer",)
    lengths = {n: _token_count(tokenizer, prompt + turn.completion(example[n])) + n_images * (image_seq_length - 1)
               for n in names}
    name = max(lengths, key=lengths.get)
    if lengths[name] <= max_length:
        return None
    return ("too_long", name, f"prompt + {name} is {lengths[name]} tokens, over max_length={max_length} "
            f"(sample {example.get('id')!r})", _FIXES["too_long"])


def _field(example: dict[str, Any], name: str) -> str:
    """The row's field an example's ``name`` came from (``messages[1].content`` for a messages row's
    answer), else ``name``. A pair built from a QA row has its chosen answer from the row's answer."""
    fields = example.get("fields") or {}
    if name == "chosen" and "chosen" not in fields:
        name = "answer" if "answer" in fields else name
    return fields.get(name, name)


def _image_field(example: dict[str, Any], k: int) -> str:
    """The row's field of the example's image ``k`` (``images[1]``), else ``image`` / ``images``."""
    fields = (example.get("fields") or {}).get("images") or []
    return fields[k] if k < len(fields) else ("images" if "images" in example else "image")


def _image_name(raw: Any, example: dict[str, Any], index: int) -> str:
    """How a warning names an image: its path, else the row that holds it."""
    if isinstance(raw, dict) and raw.get("path"):
        raw = raw["path"]
    if isinstance(raw, str | os.PathLike):
        return os.fspath(raw)
    return f"of {where(example.get('source', '<examples>'), example.get('row', index), example.get('line'))}"


def validate_examples(
    examples: list[dict[str, Any]],
    *,
    policy: Policy = "error",
    base_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    image_seq_length: int | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    report: ValidationReport | None = None,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    """Check SFT or preference examples; return the usable ones (images as PIL RGB) and a report.

    ``base_dir`` is the data folder image paths are relative to and must stay inside (default:
    the working directory). ``tokenizer`` (any callable returning ``input_ids``, or a processor)
    and ``max_length`` enable the length check; ``image_seq_length`` is how many tokens the one
    ``<|image|>`` becomes in the model's input (default: 1, or measured when a processor is
    given: 1 for Mllama, LLaVA's patch count).
    With ``policy="error"`` the first problem raises ``DataValidationError`` naming the file,
    the row and the field; with ``"skip"`` the row is dropped and counted in ``report.skipped``.
    """
    check_policy(policy)
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count tokens")
    fmt = None
    if max_length is not None:
        tokenizer, image_seq_length, fmt = _length_tools(tokenizer, image_seq_length)
    report = report if report is not None else ValidationReport()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    decoded: dict[Any, tuple[Any, bool] | ImageProblem] = {}  # raw image -> (RGB, converted) or problem
    kept = []
    for index, example in enumerate(examples):
        report.total += 1
        images = []
        for raw in images_of(example):
            key = raw if isinstance(raw, str | os.PathLike) else id(raw)  # rows of one cover share it
            if key not in decoded:
                try:
                    opened = open_image(raw, base)
                    if is_large(opened):
                        report.large_images[_image_name(raw, example, index)] = opened.size
                    decoded[key] = to_rgb(opened)
                except ImageProblem as problem:
                    decoded[key] = problem
            images.append(decoded[key])
        bad = next((k for k, image in enumerate(images) if isinstance(image, ImageProblem)), None)
        if bad is not None:
            problem = (images[bad].reason, _image_field(example, bad), images[bad].problem, images[bad].fix)
        else:
            problem = _text_problem(example) or _length_problem(
                example, tokenizer, max_length, image_seq_length, instruction, fmt)
        if problem is None:
            report.converted_to_rgb += sum(image[1] for image in images)
            rgb = [image[0] for image in images]
            kept.append(with_images(example, rgb))
        elif policy == "error":
            reason, name, what, fix = problem
            raise row_error(example.get("source", "<examples>"), example.get("row", index), _field(example, name),
                            what, fix, example.get("line"))
        else:
            report.skipped[problem[0]] += 1
    report.kept += len(kept)
    return kept, report


__all__ = ["DataValidationError", "ValidationReport", "validate_examples", "check_policy", "image_seq_length_of", "POLICIES"]
