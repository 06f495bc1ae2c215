"""Rows of a data file: .json (a list of records), .jsonl, .csv (a header line names the
columns) or .parquet (read by pyarrow, an optional dependency: `pip install 'finetune[parquet]'`),
each with its location for error messages, and the nested fields of a row (`field_value`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finetune.errors import UserError

# (location for error messages, {field: value})
Rows = Iterator[tuple[str, dict]]


def read_rows(path: Path) -> Rows:
    """Every row of a .json, .jsonl, .csv or .parquet file, with where it is for error messages.

    The location is `path:LINE` for line-based files (a CSV's header is line 1) and `path[INDEX]`
    (from 0) for a JSON list or a Parquet table.
    """
    readers: dict[str, Callable[[Path], Rows]] = {
        ".json": _json_list_rows,
        ".jsonl": _jsonl_rows,
        ".csv": _csv_rows,
        ".parquet": _parquet_rows,
    }
    if path.suffix not in readers:
        raise UserError(f"{path}: expected a {', '.join(readers)} file")
    return readers[path.suffix](path)


def _jsonl_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}:{number}"
                    yield where, _checked_row(where, _parse_json(where, line))
        except UnicodeDecodeError as e:  # its position is a byte offset into the file
            raise UserError(f"{path}: not UTF-8 text ({e})") from None


def _json_list_rows(path: Path) -> Rows:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    rows = _parse_json(str(path), text)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", _checked_row(f"{path}[{index}]", row)


def _checked_row(where: str, row: object) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _parse_json(where: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e})") from None


def _csv_rows(path: Path) -> Rows:
    """The rows of a CSV file under its header line; each located by the line it starts on."""
    # utf-8-sig: spreadsheet programs often start a CSV file with a byte-order mark.
    # newline="": the csv module handles line ends itself, also those inside quoted cells.
    with path.open(encoding="utf-8-sig", newline="") as f:
        # strict: a stray quote is an error rather than a silently merged cell.
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, [])
            _check_csv_header(path, header)
            lines_read = reader.line_num
            for cells in reader:
                where = f"{path}:{lines_read + 1}"
                lines_read = reader.line_num
                if not cells:  # a blank line
                    continue
                if len(cells) != len(header):
                    raise UserError(
                        f"{where}: {len(cells)} cells, but the header has {len(header)}"
                    )
                yield where, dict(zip(header, cells, strict=True))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})") from None


def _check_csv_header(path: Path, header: list[str]) -> None:
    for name in header:
        if header.count(name) > 1:
            raise UserError(f"{path}:1: column {name!r} appears more than once in the header")


def _parquet_rows(path: Path) -> Rows:
    parquet, arrow_error = _import_parquet(path)
    index = 0
    try:
        # Batch by batch, so that a large file is never all in memory as Python objects.
        for batch in parquet.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield f"{path}[{index}]", row
                index += 1
    except (arrow_error, OSError) as e:
        raise UserError(f"{path}: cannot read it as Parquet ({e})") from None


def _import_parquet(path: Path) -> tuple[Any, type[Exception]]:
    """pyarrow.parquet and pyarrow's error class; imported here, as only Parquet needs them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(
            f"{path}: reading Parquet files needs pyarrow: pip install 'finetune[parquet]'"
        ) from None
    return pyarrow.parquet, pyarrow.ArrowException


# What `field_value` returns for a field that is not there, to tell it from a null value.
ABSENT = object()


def field_value(row: dict, name: str, absent: object = None) -> object:
    """`row[name]`; or, when there is no such key, the nested field that a dotted `name` names:
    "data.question" is `row["data"]["question"]`. `absent` when the field is not there.

    The whole name is tried first, so a CSV column (CSV has no nesting) or a JSON key with a dot
    in it is still found by its name.
    """
    if name in row:
        return row[name]
    value: object = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return absent
        value = value[part]
    return value
