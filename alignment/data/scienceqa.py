"""ScienceQA (Lu et al. 2022) as SFT examples: multiple-choice science questions, with an image or not.

Two layouts are read, as published:

- the ScienceQA repo's ``problems.json`` (``{pid: {question, choices, answer, hint, image, task,
  grade, subject, topic, category, skill, lecture, solution, split}}``), given as the file or its
  folder; an image ``image.png`` of problem ``pid`` lies at ``images/<split>/<pid>/image.png``
  (or ``<split>/<pid>/image.png``) next to it;
- Hugging Face ``derek-thomas/ScienceQA`` parquet files (same fields as columns; ``image`` a
  ``{bytes, path}`` struct or null; the split from the file name: ``train-*``, ``validation-*``,
  ``test-*``), given as a file or a folder of them.

Each problem becomes one example: ``question`` is the rendered multiple-choice prompt
(`render_question`), ``answer`` the correct option's letter, ``image`` the problem's image or, for
text-only problems, a blank gray one (``has_image: False``; the collators need one image per row),
plus ``choices``, ``answer_index``, ``hint``, ``subject``, ``grade``, ``category`` and
``kind = "scienceqa"`` for `alignment.scienceqa`'s table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignment.data.errors import DataSourceError

LETTERS = "ABCDE"
ANSWER_HINT = "Answer with the option's letter from the given choices directly."
_SPLITS = {"train": "train", "val": "val", "validation": "val", "minival": "val", "test": "test", "minitrain": "train"}


def render_question(question: str, choices: list[str], hint: str = "") -> str:
    """LLaVA's ScienceQA prompt: ``Context: {hint}`` (when any), the question, ``Options: (A) ...``
    and the instruction to answer with the letter."""
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    context = f"Context: {hint.strip()}\n" if hint and hint.strip() else ""
    return f"{context}Question: {question.strip()}\nOptions: {options}\n{ANSWER_HINT}"


def is_scienceqa(source: str | Path) -> bool:
    """True for a problems.json (or its folder) or ScienceQA-like parquet (a `choices` column)."""
    path = Path(source)
    if path.is_dir():
        return (path / "problems.json").exists() or any(_is_sqa_parquet(p) for p in sorted(path.glob("*.parquet"))[:1])
    if path.name == "problems.json":
        return True
    return path.is_file() and path.suffix == ".parquet" and _is_sqa_parquet(path)


def _is_sqa_parquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    return {"question", "choices", "answer", "subject", "grade"} <= set(pq.read_schema(path).names)


def _image_path(folder: Path, split: str, pid: str, image: str) -> Path | None:
    for candidate in (folder / "images" / split / pid / image, folder / split / pid / image, folder / image):
        if candidate.exists():
            return candidate
    return None


def _raw_problems(source: Path) -> list[tuple[str, dict, Any]]:
    """(pid, problem, raw image or None) for every problem of the source."""
    if source.is_dir() and (source / "problems.json").exists():
        source = source / "problems.json"
    if source.name.endswith(".json"):
        problems = json.loads(source.read_text())
        if not isinstance(problems, dict):
            raise DataSourceError(f"{source}: expected ScienceQA's {{pid: problem}} mapping")
        out = []
        for pid, p in problems.items():
            image = None
            if p.get("image"):
                image = _image_path(source.parent, p.get("split", "train"), str(pid), p["image"])
                if image is None:
                    raise DataSourceError(f"{source}: problem {pid}'s image {p['image']!r} is not under "
                                          f"images/{p.get('split', 'train')}/{pid}/")
            out.append((str(pid), p, image))
        return out
    import pyarrow.parquet as pq

    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    out = []
    for file in files:
        split = next((s for k, s in _SPLITS.items() if file.name.startswith(k)), "train")
        for i, row in enumerate(pq.read_table(file).to_pylist()):
            row.setdefault("split", split)
            out.append((f"{file.stem}-{i}", row, row.pop("image", None)))
    return out


def load_scienceqa(source: str | Path) -> list[dict[str, Any]]:
    """ScienceQA problems as SFT examples (see the module docstring); images still undecoded."""
    from alignment.data.covers import blank_cover

    source = Path(source)
    if not source.exists():
        raise DataSourceError(f"{source}: no such ScienceQA file or folder")
    examples = []
    for pid, p, image in _raw_problems(source):
        choices = [str(c) for c in p["choices"]]
        answer = int(p["answer"])
        if not 0 <= answer < len(choices) <= len(LETTERS):
            raise DataSourceError(f"{source}: problem {pid}: answer {answer} is not an index of {len(choices)} choices")
        hint = str(p.get("hint") or "")
        examples.append({
            "id": f"sqa-{pid}", "image_id": f"sqa-{pid}", "image": image if image is not None else blank_cover(112),
            "has_image": image is not None, "question": render_question(str(p["question"]), choices, hint),
            "answer": LETTERS[answer], "choices": choices, "answer_index": answer, "hint": hint,
            "subject": str(p.get("subject", "")), "grade": str(p.get("grade", "")),
            "category": str(p.get("category", "")), "kind": "scienceqa",
            "split": _SPLITS.get(str(p.get("split", "train")), str(p.get("split"))), "source": str(source), "row": pid,
        })
    return examples
