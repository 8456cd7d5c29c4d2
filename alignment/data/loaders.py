"""Converting rows of a known format into examples (SFT or preference, see ``__init__``).

Formats (``data.format``; detected from the columns when not given):

    ocrvqa      image, questions[], answers[] (+ image_id, title, ...): one row per image, split
                into one example per question (howard-hou/OCR-VQA, synthetic_bookcover)
    messages    messages, images: TRL's conversational SFT; each user/assistant turn -> example
    preference  prompt, chosen, rejected, images: TRL's preference format (strings or messages)
    rlaifv      image, question, chosen, rejected: RLAIF-V

An example shows one ``image``, or ``images`` (a list, in placeholder order) when its row holds several
(messages, preference and rlaifv rows may: ``images: [a, b]``); a preference pair's rows share all of them.
Images stay undecoded here; ``validate_examples`` opens them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from alignment.data.errors import DataSourceError, row_error
from alignment.data.images import image_fingerprint
from alignment.data.tables import Table, read_table
from alignment.data.transforms import question_kind, split_qa
from alignment.data.validate import ValidationReport, check_policy

FORMATS: dict[str, tuple[str, ...]] = {
    "ocrvqa": ("image", "questions", "answers"),
    "messages": ("messages", "images"),
    "preference": ("prompt", "chosen", "rejected", "images"),
    "rlaifv": ("image", "question", "chosen", "rejected"),
}
_IMAGE_PLACEHOLDER = re.compile(r"<\|image\|>|<image>")


def _expected() -> str:
    return "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMATS.items())


def _has(columns: set[str], fmt: str) -> bool:
    needed = set(FORMATS[fmt])
    if "images" in needed and "image" in columns:  # one image column, either name
        needed = (needed - {"images"}) | {"image"}
    return needed <= columns


def detect_format(columns: list[str], source: str = "<data>") -> str:
    """The format whose columns ``columns`` holds; ``DataSourceError`` listing all otherwise."""
    found = [fmt for fmt in FORMATS if _has(set(columns), fmt)]
    if not found:
        raise DataSourceError(
            f"{source}: cannot tell the data format from the columns {sorted(columns)}; expected "
            f"the columns of one of these formats ({_expected()}), or set data.format")
    return found[0]


def check_columns(columns: list[str], fmt: str, source: str = "<data>") -> None:
    """``DataSourceError`` naming the missing columns when ``columns`` do not fit ``fmt``."""
    if fmt not in FORMATS:
        raise DataSourceError(f"{source}: unknown data format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if not _has(set(columns), fmt):
        missing = sorted(set(FORMATS[fmt]) - set(columns) - ({"images"} if "image" in columns else set()))
        raise DataSourceError(
            f"{source}: format {fmt!r} expects columns {list(FORMATS[fmt])}, missing {missing} "
            f"(found {sorted(columns)}); rename the columns or pick another format ({_expected()})")


def _text(content: Any) -> str:
    """The text of a message content (a string or a list of typed parts), image markers removed."""
    if isinstance(content, list):
        content = " ".join(str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    elif isinstance(content, dict):
        content = content.get("content", content.get("text", ""))
        return _text(content)
    return " ".join(_IMAGE_PLACEHOLDER.sub(" ", str(content or "")).split())


def _turns_text(value: Any, role: str) -> str:
    """A string, or the text of the last ``role`` message of a message list."""
    if isinstance(value, list):
        texts = [_text(m.get("content")) for m in value if isinstance(m, dict) and m.get("role") == role]
        if not texts:
            raise ValueError(f"no {role!r} message")
        return texts[-1]
    return _text(value)


def _image_fields(row: dict[str, Any]) -> dict[str, Any]:
    """``{"image_id", "image"}`` for a row with one image, ``{"image_id", "images"}`` for several (ids of
    each joined by '+'), from its ``images`` (a list or one value) or ``image`` column."""
    images = row["images"] if "images" in row else row.get("image")
    images = list(images) if isinstance(images, list | tuple) else [images]
    if not images:
        raise ValueError("no image")
    image_id = str(row.get("image_id") or "+".join(image_fingerprint(i) for i in images))
    return {"image_id": image_id, "image": images[0]} if len(images) == 1 else {"image_id": image_id, "images": images}


def _messages_examples(row: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
    shown = _image_fields(row)
    image_id = shown["image_id"]
    examples, question = [], None
    for message in row["messages"]:
        role, text = message.get("role"), _text(message.get("content"))
        if role == "user":
            question = text
        elif role == "assistant":
            if question is None:
                raise ValueError("an assistant message comes before any user message")
            examples.append({"id": f"{row.get('id') or f'{image_id}/r{index}'}/t{len(examples)}", **shown,
                             "question": question, "answer": text,
                             "kind": question_kind(question, text), "source": source, "row": index})
            question = None
    if not examples:
        raise ValueError("no user/assistant turn")
    return examples


def _preference_example(row: dict[str, Any], source: str, index: int, fmt: str) -> list[dict[str, Any]]:
    shown = _image_fields(row)
    image_id = shown["image_id"]
    question = _turns_text(row["prompt"], "user") if fmt == "preference" else _text(row["question"])
    chosen, rejected = _turns_text(row["chosen"], "assistant"), _turns_text(row["rejected"], "assistant")
    return [{"id": str(row.get("id") or f"{image_id}/r{index}"), **shown,
             "question": question, "chosen": chosen, "rejected": rejected, "answer": chosen,
             "kind": question_kind(question, chosen), "source": source, "row": index}]


def to_examples(table: Table, fmt: str | None = None, *, policy: str = "error",
                report: ValidationReport | None = None) -> list[dict[str, Any]]:
    """Examples from ``table``'s rows (images undecoded); each carries ``source``, ``row`` and
    ``split`` (the row's split tag: set_name/split column, or the hub split; None if unknown).

    A row that cannot be read raises ``DataValidationError`` (policy "error") or is counted as
    ``malformed_row`` in ``report`` (policy "skip").
    """
    check_policy(policy)
    source = table.names[0] if table.names else "<data>"
    fmt = fmt or detect_format(table.columns, source)
    check_columns(table.columns, fmt, source)
    examples = []
    for row, name, index, split in zip(table.rows, table.names, table.indices, table.splits):
        try:
            if fmt == "ocrvqa":
                made = split_qa(row, source=name, row_index=index)
            elif fmt == "messages":
                made = _messages_examples(row, name, index)
            else:
                made = _preference_example(row, name, index, fmt)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            if policy == "error":
                raise row_error(name, index, fmt, f"malformed {fmt} row ({type(err).__name__}: {err})",
                                f"Make the row match the {fmt} format ({', '.join(FORMATS[fmt])}) "
                                "or validate with policy='skip'") from err
            if report is not None:
                report.total += 1
                report.skipped["malformed_row"] += 1
            continue
        tag = split or row.get("set_name") or row.get("split")
        examples.extend({**e, "split": tag if isinstance(tag, str) else None} for e in made)
    return _unique_ids(examples)


def _unique_ids(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Suffix ``~2``, ``~3``, ... to repeated ids (rows repeating an id or an image), in order."""
    seen: dict[str, int] = {}
    for example in examples:
        count = seen[example["id"]] = seen.get(example["id"], 0) + 1
        if count > 1:
            example["id"] = f"{example['id']}~{count}"
    return examples


def load_examples(source: str | os.PathLike, format: str | None = None, *, policy: str = "error",
                  report: ValidationReport | None = None, max_rows: int | None = None,
                  ) -> tuple[list[dict[str, Any]], Table]:
    """``read_table`` then ``to_examples``: (examples with undecoded images, the table read)."""
    table = read_table(source, max_rows=max_rows)
    if not table.rows:
        raise DataSourceError(f"{source}: no rows")
    return to_examples(table, format, policy=policy, report=report), table
