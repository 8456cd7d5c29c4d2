"""Errors raised by the data pipeline, with messages that say where and what to do."""

from __future__ import annotations


class DataValidationError(ValueError):
    """A row (or a whole source) that cannot be used as it is."""


class DataSourceError(DataValidationError):
    """A source that cannot be read: missing file, unknown format, wrong columns, hub offline."""


SKIP_HINT = "or set data.on_error=skip to drop such rows"  # the recipe key, in every fix that can skip


def where(source: str, row: int | str | None = None, line: int | None = None) -> str:
    """Where a row is, as its user counts: ``data.jsonl: line 3`` (a JSON lines file: the line, from 1),
    ``t.parquet: row 3`` (other tables: ``row`` is the 0-based index, shown counted from 1),
    ``problems.json: row 1234`` (a row named by its id), or ``source`` alone."""
    if line is not None:
        return f"{source}: line {line}"
    if isinstance(row, int):
        return f"{source}: row {row + 1}"
    return f"{source}: row {row}" if row is not None else source


def row_error(source: str, row: int | str | None, field: str, problem: str, fix: str,
              line: int | None = None) -> DataValidationError:
    """``DataValidationError("<where>, field '<field>': <problem>. <fix>")``, ``<where>`` as ``where`` says."""
    return DataValidationError(f"{where(source, row, line)}, field '{field}': {problem}. {fix}")
