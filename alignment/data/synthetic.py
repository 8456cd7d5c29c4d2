"""``synthetic_bookcover``: seeded book covers with questions, in OCR-VQA's schema, cached.

One row per cover (the schema of howard-hou/OCR-VQA)::

    image         PNG (datasets Image feature)   image_id    str ("cover-000042")
    questions     list[str]                      answers     list[str]   (aligned)
    ocr_tokens    list[str]                      title, authorName, genre  str
    image_width, image_height  int               set_name    "train" | "val" | "test"

Each cover draws title, author and genre independently and uniformly from the catalog, and
asks one author, one title and one genre question, plus one or two yes/no questions
("Is this a <genre> book?", the true genre half the time). Splits are by cover.
The table is written once per parameter set as parquet under ``cache_dir`` (default
``default_cache_dir()``), keyed by the parameters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from alignment.data import catalog
from alignment.data.covers import render_cover

if TYPE_CHECKING:
    import datasets

_VERSION = 1  # bump when the drawing or the questions change: it is part of the cache key


def default_cache_dir() -> Path:
    """``$VLM_ALIGN_CACHE/data``, else ``~/.cache/vlm-align/data``."""
    return Path(os.environ.get("VLM_ALIGN_CACHE", Path.home() / ".cache" / "vlm-align")) / "data"


def _questions(rng: random.Random, title: str, author: str, genre: str) -> tuple[list[str], list[str]]:
    """Aligned (questions, answers) for one cover: author, title, genre, then 1-2 yes/no."""
    questions = [rng.choice(catalog.AUTHOR_QUESTIONS), rng.choice(catalog.TITLE_QUESTIONS),
                 rng.choice(catalog.GENRE_QUESTIONS)]
    answers = [author, title, genre]
    others = [g for g in catalog.GENRES if g != genre]
    for _ in range(rng.randint(1, 2)):
        for _attempt in range(10):  # two yes/no questions on one cover must differ
            truthful = rng.random() < 0.5
            asked = genre if truthful else rng.choice(others)
            question = rng.choice(catalog.YES_NO_QUESTIONS).format(genre=asked)
            if question not in questions:
                break
        questions.append(question)
        answers.append("Yes" if truthful else "No")
    return questions, answers


def _set_names(num_covers: int, val_fraction: float, test_fraction: float, rng: random.Random) -> list[str]:
    """A set name per cover: exact counts, shuffled."""
    n_val, n_test = round(num_covers * val_fraction), round(num_covers * test_fraction)
    if n_val + n_test > num_covers:
        raise ValueError(f"val_fraction + test_fraction must be <= 1, got {val_fraction} + {test_fraction}")
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (num_covers - n_val - n_test)
    rng.shuffle(names)
    return names


def generate_rows(num_covers: int, seed: int, image_size: int | tuple[int, int] = 112, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, list]:
    """The columns of the table (images as ``{"bytes": PNG, "path": None}``), uncached."""
    rng = random.Random(seed)
    titles, authors, genres = list(catalog.TITLES), list(catalog.AUTHORS), list(catalog.GENRES)
    set_names = _set_names(num_covers, val_fraction, test_fraction, rng)
    columns: dict[str, list] = {k: [] for k in (
        "image", "image_id", "questions", "answers", "ocr_tokens", "title", "authorName", "genre",
        "image_width", "image_height", "set_name")}
    for i in range(num_covers):
        title, author, genre = rng.choice(titles), rng.choice(authors), rng.choice(genres)
        image = render_cover(title, author, genre, rng, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        questions, answers = _questions(rng, title, author, genre)
        row = {
            "image": {"bytes": buffer.getvalue(), "path": None},
            "image_id": f"cover-{seed}-{i:06d}",
            "questions": questions,
            "answers": answers,
            "ocr_tokens": author.split() + title.split(),
            "title": title,
            "authorName": author,
            "genre": genre,
            "image_width": image.width,
            "image_height": image.height,
            "set_name": set_names[i],
        }
        for key, value in row.items():
            columns[key].append(value)
    return columns


def synthetic_bookcover_path(num_covers: int = 700, seed: int = 0, image_size: int | tuple[int, int] = 112,
                             val_fraction: float = 0.1, test_fraction: float = 0.1,
                             cache_dir: str | os.PathLike | None = None) -> Path:
    """The parquet file of these covers, generated on first use (about 4.5 QA pairs a cover)."""
    if num_covers < 1:
        raise ValueError(f"num_covers must be >= 1, got {num_covers}")
    if not isinstance(image_size, int):
        image_size = tuple(int(v) for v in image_size)
        image_size = image_size[0] if image_size[0] == image_size[1] else image_size
    params = {"version": _VERSION, "num_covers": num_covers, "seed": seed,
              "image_size": image_size if isinstance(image_size, int) else list(image_size),
              "val_fraction": val_fraction, "test_fraction": test_fraction}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"synthetic_bookcover-{key}.parquet"
    if path.is_file():
        return path

    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features({
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "questions": datasets.List(datasets.Value("string")),
        "answers": datasets.List(datasets.Value("string")),
        "ocr_tokens": datasets.List(datasets.Value("string")),
        "title": datasets.Value("string"),
        "authorName": datasets.Value("string"),
        "genre": datasets.Value("string"),
        "image_width": datasets.Value("int32"),
        "image_height": datasets.Value("int32"),
        "set_name": datasets.Value("string"),
    })
    table = datasets.Dataset.from_dict(
        generate_rows(num_covers, seed, image_size, val_fraction, test_fraction), features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table.data.table, tmp)  # keeps the features in the schema metadata
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def synthetic_bookcover(num_covers: int = 700, seed: int = 0, image_size: int | tuple[int, int] = 112,
                        val_fraction: float = 0.1, test_fraction: float = 0.1,
                        cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """The covers as a ``datasets.Dataset`` (one row per cover, schema in the module docstring)."""
    import datasets
    import pyarrow.parquet as pq

    path = synthetic_bookcover_path(num_covers, seed, image_size, val_fraction, test_fraction, cache_dir)
    return datasets.Dataset(pq.read_table(path))
