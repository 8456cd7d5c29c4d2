"""Converting rows of a known format into examples (SFT or preference, see ``__init__``).

Formats (``data.format``; detected from the columns when not given):

    ocrvqa      image, questions[], answers[] (+ image_id, title, ...): one row per image, split
                into one example per question (howard-hou/OCR-VQA, synthetic_bookcover)
    messages    messages, images: TRL's conversational SFT; each user/assistant turn -> example
    preference  prompt, chosen, rejected, images: TRL's preference format (strings or messages)
    rlaifv      image, question, chosen, rejected: RLAIF-V

An example shows one ``image``, or ``images`` (a list, in placeholder order) when its row holds several
(messages, preference and rlaifv rows may: ``images: [a, b]``); a preference pair's rows share all of them.
Images stay undecoded here; ``validate_examples`` opens them. Each example carries ``fields``: the row's
field each of its values came from (``{"answer": "messages[1].content", "images": ["images[0]"]}``), so
that an error names the field the user wrote.
"""

from __future__ import annotations

import os
import re
from typing import Any

from alignment.data.errors import SKIP_HINT, DataSourceError, row_error
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


def _turns_text(value: Any, role: str, column: str) -> tuple[str, str]:
    """(text, field): a string column, or the last ``role`` message of a message list
    (field ``column[k].content``)."""
    if isinstance(value, list):
        found = [(k, m) for k, m in enumerate(value) if isinstance(m, dict) and m.get("role") == role]
        if not found:
            raise ValueError(f"no {role!r} message")
        k, message = found[-1]
        return _text(message.get("content")), f"{column}[{k}].content"
    return _text(value), column


def _image_fields(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(``{"image_id", "image"}`` for a row with one image, ``{"image_id", "images"}`` for several (ids of
    each joined by '+'), the field of each image), from its ``images`` (a list or one value) or ``image``
    column."""
    column = "images" if "images" in row else "image"
    images = row.get(column)
    listed = isinstance(images, list | tuple)
    images = list(images) if listed else [images]
    if not images:
        raise ValueError("no image")
    fields = [f"{column}[{k}]" for k in range(len(images))] if listed else [column]
    image_id = str(row.get("image_id") or "+".join(image_fingerprint(i) for i in images))
    shown = {"image_id": image_id, "image": images[0]} if len(images) == 1 else {"image_id": image_id, "images": images}
    return shown, fields


def _messages_examples(row: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
    shown, image_fields = _image_fields(row)
    image_id = shown["image_id"]
    examples, question = [], None
    for k, message in enumerate(row["messages"]):
        role, text = message.get("role"), _text(message.get("content"))
        if role == "user":
            question, asked = text, f"messages[{k}].content"
        elif role == "assistant":
            if question is None:
                raise ValueError(f"messages[{k}] (assistant) comes before any user message")
            fields = {"question": asked, "answer": f"messages[{k}].content", "images": image_fields}
            examples.append({"id": f"{row.get('id') or f'{image_id}/r{index}'}/t{len(examples)}", **shown,
                             "question": question, "answer": text,
                             "kind": question_kind(question, text), "source": source, "row": index,
                             "fields": fields})
            question = None
    if not examples:
        raise ValueError("no user/assistant turn")
    return examples


def _preference_example(row: dict[str, Any], source: str, index: int, fmt: str) -> list[dict[str, Any]]:
    shown, image_fields = _image_fields(row)
    image_id = shown["image_id"]
    question, asked = (_turns_text(row["prompt"], "user", "prompt") if fmt == "preference"
                       else (_text(row["question"]), "question"))
    (chosen, chosen_field), (rejected, rejected_field) = (
        _turns_text(row["chosen"], "assistant", "chosen"), _turns_text(row["rejected"], "assistant", "rejected"))
    fields = {"question": asked, "chosen": chosen_field, "rejected": rejected_field, "answer": chosen_field,
              "images": image_fields}
    return [{"id": str(row.get("id") or f"{image_id}/r{index}"), **shown,
             "question": question, "chosen": chosen, "rejected": rejected, "answer": chosen,
             "kind": question_kind(question, chosen), "source": source, "row": index, "fields": fields}]


def to_examples(table: Table, fmt: str | None = None, *, policy: str = "error",
                report: ValidationReport | None = None) -> list[dict[str, Any]]:
    """Examples from ``table``'s rows (images undecoded); each carries ``source``, ``row`` and
    ``split`` (the row's split tag: set_name/split column, or the hub split; None if unknown).

    A row that cannot be read raises ``DataValidationError`` (policy "error", the recipe's
    ``data.on_error``) or is counted as ``malformed_row`` in ``report`` (policy "skip"); examples of a
    JSON lines file carry their ``line`` (from 1) for error messages.
    """
    check_policy(policy)
    source = table.names[0] if table.names else "<data>"
    fmt = fmt or detect_format(table.columns, source)
    check_columns(table.columns, fmt, source)
    examples = []
    lines = table.lines or [None] * len(table.rows)
    for row, name, index, split, line in zip(table.rows, table.names, table.indices, table.splits, lines):
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
                                f"Make the row match the {fmt} format ({', '.join(FORMATS[fmt])}), "
                                f"{SKIP_HINT}", line) from err
            if report is not None:
                report.total += 1
                report.skipped["malformed_row"] += 1
            continue
        tag = split or row.get("set_name") or row.get("split")
        examples.extend({**e, "split": tag if isinstance(tag, str) else None, "line": line} for e in made)
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
