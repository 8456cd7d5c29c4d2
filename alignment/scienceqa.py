"""ScienceQA evaluation: seed 003's table of accuracies by subject, context and grade.

Columns (as in ScienceQA's own scoring, which LLaVA and LaVIN report):

    NAT / SOC / LAN   subject: natural / social / language science
    TXT / IMG / NO    context: a text hint / an image / neither (TXT and IMG overlap)
    G1-6 / G7-12      grade 1-6 / 7-12
    Average           every question

A prediction is right when it names the correct option: its leading letter (``B``, ``(B)``,
``B.``, ``The answer is B``) or, failing that, the text of one choice.
"""

from __future__ import annotations

import re
from typing import Any

from alignment.data.scienceqa import LETTERS

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Average")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_LETTER = re.compile(r"^\W*(?:the answer is\s*)?\(?([A-E])\)?(?:\W|$)", re.I)


def predicted_index(prediction: str, choices: list[str]) -> int | None:
    """The option a prediction names (0-based), or None."""
    text = prediction.strip()
    match = _LETTER.match(text)
    if match and LETTERS.index(match.group(1).upper()) < len(choices):
        return LETTERS.index(match.group(1).upper())
    lowered = text.lower().strip(" .")
    for i, choice in enumerate(choices):
        if lowered == choice.lower().strip(" ."):
            return i
    return None


def columns_of(example: dict[str, Any]) -> list[str]:
    """The table columns an example counts in (Average always)."""
    cols = [_SUBJECTS[example["subject"]]] if example.get("subject") in _SUBJECTS else []
    has_text, has_image = bool(example.get("hint", "").strip()), bool(example.get("has_image", True))
    cols += (["TXT"] if has_text else []) + (["IMG"] if has_image else []) + ([] if has_text or has_image else ["NO"])
    grade = re.search(r"\d+", str(example.get("grade", "")))
    if grade:
        cols.append("G1-6" if int(grade.group()) <= 6 else "G7-12")
    return cols + ["Average"]


def scienceqa_scores(examples: list[dict[str, Any]], predictions: list[str]) -> dict[str, float | None]:
    """Accuracy (0-1) per column; None for a column no example falls in."""
    right: dict[str, list[bool]] = {c: [] for c in COLUMNS}
    for example, prediction in zip(examples, predictions, strict=True):
        ok = predicted_index(prediction, example["choices"]) == example["answer_index"]
        for col in columns_of(example):
            right[col].append(ok)
    return {c: (sum(v) / len(v) if v else None) for c, v in right.items()}


def format_table(scores: dict[str, float | None], name: str = "model") -> str:
    """Seed 003's table: one header row, one row of percentages (``-`` for an empty column)."""
    header = ["Method", *COLUMNS]
    row = [name, *("-" if scores.get(c) is None else f"{100 * scores[c]:.2f}" for c in COLUMNS)]
    widths = [max(len(a), len(b)) for a, b in zip(header, row)]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in (header, row))


def scienceqa_metrics(examples: list[dict[str, Any]], predictions: list[str]) -> dict[str, float]:
    """`scienceqa/<column>` accuracies (0-1) of the columns that have examples, for a stage's eval."""
    return {f"scienceqa/{c}": v for c, v in scienceqa_scores(examples, predictions).items() if v is not None}
