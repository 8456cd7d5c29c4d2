"""Reading a data source into plain rows: local files (parquet, jsonl, arrow, a folder of images
with a jsonl, a ``save_to_disk`` folder) or a hub dataset name.

Rows are dicts of plain Python values; images stay undecoded (PIL, bytes, a path or a
``{"bytes", "path"}`` struct) until validation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.data.errors import DataSourceError

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")


@dataclass
class Table:
    """Rows read from one source. ``splits[i]`` is row i's split when the source has several
    (hub or ``save_to_disk`` splits), else None; ``base_dir`` is the folder image paths are
    relative to; ``names[i]`` is the file (or ``name[split]``) row i came from, ``indices[i]``
    its index there and ``lines[i]`` its line in a JSON lines file (counted from 1; None elsewhere)."""

    rows: list[dict[str, Any]]
    base_dir: Path
    names: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    lines: list[int | None] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows[:100]:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def extend(self, rows: list[dict[str, Any]], name: str, split: str | None = None,
               lines: list[int] | None = None) -> None:
        self.rows.extend(rows)
        self.names.extend([name] * len(rows))
        self.indices.extend(range(len(rows)))
        self.splits.extend([split] * len(rows))
        self.lines.extend(lines[: len(rows)] if lines is not None else [None] * len(rows))


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """(rows, their lines counted from 1), or (rows, None) for a JSON array file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows, numbers = json.loads(text), None
    else:
        rows, numbers = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{path}: line {number} is not valid JSON ({err}); fix or remove the line") from err
            numbers.append(number)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            place = f"line {numbers[i]}" if numbers is not None else f"row {i + 1}"
            raise DataSourceError(f"{path}: {place} is a {type(row).__name__}, expected a JSON object")
    return rows, numbers


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """(rows, their lines in a JSON lines file, else None)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), None
        if path.suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if path.suffix == ".arrow":
            return _read_arrow(path), None
    except DataSourceError:
        raise
    except Exception as err:  # pyarrow raises many types for a damaged file
        raise DataSourceError(f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: {err})") from err
    raise DataSourceError(f"{path}: unknown file type {path.suffix!r}; expected one of {TABLE_SUFFIXES}")


def _from_datasets(dataset: Any, name: str, base_dir: Path, max_rows: int | None) -> Table:
    """Rows of a ``datasets.Dataset`` or ``DatasetDict``, images left undecoded."""
    import datasets

    parts = dataset.items() if isinstance(dataset, datasets.DatasetDict) else [(None, dataset)]
    table = Table([], base_dir)
    for split, part in parts:
        if max_rows is not None:
            part = part.select(range(min(max_rows, len(part))))
        for column, feature in part.features.items():
            if isinstance(feature, datasets.Image):
                part = part.cast_column(column, datasets.Image(decode=False))
            elif isinstance(feature, datasets.List | datasets.Sequence) and isinstance(feature.feature, datasets.Image):
                part = part.cast_column(column, datasets.List(datasets.Image(decode=False)))
        table.extend(part.to_list(), f"{name}[{split}]" if split else name, split)
    return table


def _read_folder(folder: Path, max_rows: int | None) -> Table:
    """A ``save_to_disk`` folder, or a folder of images with one jsonl, or of table files."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        import datasets

        return _from_datasets(datasets.load_from_disk(str(folder)), str(folder), folder, max_rows)
    jsonl = sorted(folder.glob("*.jsonl"))
    files = jsonl if len(jsonl) == 1 else sorted(p for p in folder.iterdir() if p.suffix in TABLE_SUFFIXES)
    if not files:
        raise DataSourceError(
            f"{folder}: no data file found; expected a folder of images with one .jsonl (image paths "
            f"relative to the folder), table files ({', '.join(TABLE_SUFFIXES)}), or a save_to_disk folder")
    table = Table([], folder)
    for path in files:
        rows, lines = _read_file(path)
        for row in rows:
            if "file_name" in row and "image" not in row:  # the imagefolder convention
                row["image"] = row.pop("file_name")
        table.extend(rows[:max_rows] if max_rows is not None else rows, str(path), lines=lines)
    return table


def _looks_like_hub_name(source: str) -> bool:
    return source.count("/") <= 1 and not source.startswith((".", "/", "~")) and Path(source).suffix == ""


def read_table(source: str | os.PathLike, *, max_rows: int | None = None) -> Table:
    """All rows of ``source``: a local file or folder, else a hub dataset name.

    Raises ``DataSourceError`` for a missing file, an unreadable one, or a hub name that cannot
    be reached (offline: download the dataset and point to the local files instead).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, max_rows)
    if path.is_file():
        rows, lines = _read_file(path)
        table = Table([], path.parent.resolve())
        table.extend(rows[:max_rows] if max_rows is not None else rows, str(path), lines=lines)
        return table
    if not _looks_like_hub_name(str(source)):
        raise DataSourceError(f"{source}: no such file or folder")
    import datasets

    try:
        dataset = datasets.load_dataset(str(source))
    except Exception as err:
        raise DataSourceError(
            f"{source}: not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err}). Offline? Download it (datasets.load_dataset(...).save_to_disk"
            f" or the parquet files) and pass the local path instead") from err
    return _from_datasets(dataset, str(source), Path.cwd(), max_rows)
