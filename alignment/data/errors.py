"""Errors raised by the data pipeline, with messages that say where and what to do."""

from __future__ import annotations


class DataValidationError(ValueError):
    """A row (or a whole source) that cannot be used as it is."""


class DataSourceError(DataValidationError):
    """A source that cannot be read: missing file, unknown format, wrong columns, hub offline."""


def row_error(source: str, row: int | None, field: str, problem: str, fix: str) -> DataValidationError:
    """``DataValidationError("<source>: row <row>, field '<field>': <problem>. <fix>")``."""
    where = f"{source}: row {row}" if row is not None else source
    return DataValidationError(f"{where}, field '{field}': {problem}. {fix}")
