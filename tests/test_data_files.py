"""Data files other than JSON: CSV (Python's csv module) and Parquet (pyarrow, optional)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from finetune.chat_format import read_conversations
from finetune.config import DatasetConfig
from finetune.data import load_dataset, read_records
from finetune.data_files import read_rows
from finetune.errors import UserError
from finetune.tokenizer import Tokenizer
from tests.conftest import write_jsonl

COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}

# Cells that a hand-written parser would get wrong: commas, quotes, newlines, non-ASCII text.
RECORDS = [
    {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"instruction": 'Quote "this".', "input": "", "output": 'He said "hi", then left.'},
    {"instruction": "Write two lines.", "input": "", "output": "first\nsecond"},
    {"instruction": "Translate: 漢字", "input": "é ✓", "output": "Chinese characters"},
]


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    with path.open("w", encoding=encoding, newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def records_csv(path: Path, records: list[dict], encoding: str = "utf-8") -> Path:
    header = list(records[0])
    return write_csv(path, [header, *[[r[c] for c in header] for r in records]], encoding)


@pytest.fixture
def parquet() -> ModuleType:
    """pyarrow.parquet, with pyarrow (in the test extra) itself."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet

    return pyarrow.parquet


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def test_csv_records_read_like_jsonl_records(tmp_path: Path) -> None:
    path = records_csv(tmp_path / "d.csv", RECORDS)
    assert read_records(path, COLUMNS) == RECORDS


def test_csv_dataset_tokenizes_like_the_same_jsonl(tmp_path: Path, tokenizer: Tokenizer) -> None:
    from_csv = DatasetConfig(path=str(records_csv(tmp_path / "d.csv", RECORDS)))
    from_jsonl = DatasetConfig(path=str(write_jsonl(tmp_path / "d.jsonl", RECORDS)))
    assert load_dataset(from_csv, tokenizer, 256) == load_dataset(from_jsonl, tokenizer, 256)


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    # Spreadsheet programs write "utf-8-sig": a BOM before the first header name.
    path = records_csv(tmp_path / "d.csv", RECORDS, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_records(path, COLUMNS) == RECORDS


def test_csv_without_an_input_column_has_empty_inputs(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["instruction", "output"], ["Say hi.", "Hi."]])
    assert read_records(path, COLUMNS) == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


def test_csv_columns_are_renamed_by_the_column_map(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["question", "answer"], ["Say hi.", "Hi."]])
    records = read_records(path, {**COLUMNS, "instruction": "question", "output": "answer"})
    assert records == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


def test_csv_dotted_column_name_is_a_plain_column(tmp_path: Path) -> None:
    """CSV has no nesting: `data.question` names the column headed "data.question"."""
    path = write_csv(tmp_path / "d.csv", [["data.question", "output"], ["Say hi.", "Hi."]])
    records = read_records(path, {**COLUMNS, "instruction": "data.question"})
    assert records == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


def test_csv_without_the_dotted_column_names_it_as_missing(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["data", "output"], ["Say hi.", "Hi."]])
    with pytest.raises(UserError) as error:
        read_records(path, {**COLUMNS, "instruction": "data.question"})
    assert str(error.value) == f"{path}:2: missing field 'data.question'"


def test_csv_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n\na,b\n\nc,d\n")
    assert [r["output"] for r in read_records(path, COLUMNS)] == ["b", "d"]


def test_csv_error_names_the_line_the_row_starts_on(tmp_path: Path) -> None:
    # Line 1 is the header, without an output column; the first record spans lines 2-3.
    path = tmp_path / "d.csv"
    path.write_text('instruction,input\n"Write two lines.","first\nsecond"\n')
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:2: missing field 'output'")


def test_csv_row_with_the_wrong_number_of_cells_is_named_by_line(tmp_path: Path) -> None:
    # Line 1 is the header; the first record spans lines 2-3; line 4 is blank.
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"Write two lines.","first\nsecond"\n\na,b,c\n')
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value) == f"{path}:5: 3 cells, but the header has 2"


def test_csv_duplicate_column_is_named_at_the_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["instruction", "output", "output"], ["a", "b", "c"]])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:1: column 'output' appears more than once")


def test_csv_with_a_stray_quote_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\na,"b"c\n')
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:2: invalid CSV")


def test_csv_that_is_not_utf8_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("instruction,output\ncafé,b\n".encode("latin-1"))
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}: not UTF-8 text")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_that_is_not_utf8_is_a_user_error(tmp_path: Path, suffix: str) -> None:
    text = json.dumps([RECORDS[0]]) if suffix == ".json" else json.dumps(RECORDS[0]) + "\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(text.replace("Sort", "Caf\xe9 sort").encode("latin-1"))
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}: not UTF-8 text ('utf-8' codec can't decode")


@pytest.mark.parametrize("content", ["", "instruction,output\n", "instruction,output\n\n"])
def test_csv_without_records_is_a_user_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value) == f"{path}: no records"


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def test_parquet_records_read_like_jsonl_records(parquet: ModuleType, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", RECORDS)
    assert read_records(path, COLUMNS) == RECORDS


def test_parquet_dataset_tokenizes_like_the_same_jsonl(
    parquet: ModuleType, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    from_parquet = DatasetConfig(path=str(write_parquet(tmp_path / "d.parquet", RECORDS)))
    from_jsonl = DatasetConfig(path=str(write_jsonl(tmp_path / "d.jsonl", RECORDS)))
    assert load_dataset(from_parquet, tokenizer, 256) == load_dataset(from_jsonl, tokenizer, 256)


def test_parquet_rows_are_read_across_row_groups_in_order(
    parquet: ModuleType, tmp_path: Path
) -> None:
    import pyarrow

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(25)]
    path = tmp_path / "d.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(rows), path, row_group_size=10)
    assert parquet.ParquetFile(path).num_row_groups == 3
    assert [where for where, _ in read_rows(path)] == [f"{path}[{i}]" for i in range(25)]
    assert [r["output"] for r in read_records(path, COLUMNS)] == [f"a{i}" for i in range(25)]


NESTED = [
    {"data": {"question": "Say hi.", "context": "politely"}, "answer": "Hi."},
    {"data": {"question": "Count.", "context": None}, "answer": "1, 2"},
]
NESTED_COLUMNS = {"instruction": "data.question", "input": "data.context", "output": "answer"}


def test_parquet_struct_columns_are_read_by_dotted_names(
    parquet: ModuleType, tmp_path: Path
) -> None:
    path = write_parquet(tmp_path / "d.parquet", NESTED)
    assert parquet.read_schema(path).field("data").type.num_fields == 2  # a struct column
    from_jsonl = read_records(write_jsonl(tmp_path / "d.jsonl", NESTED), NESTED_COLUMNS)
    assert read_records(path, NESTED_COLUMNS) == from_jsonl
    assert from_jsonl[0] == {"instruction": "Say hi.", "input": "politely", "output": "Hi."}


@pytest.mark.parametrize(
    "data", [None, {"question": None, "context": "x"}], ids=["struct", "field"]
)
def test_parquet_null_nested_field_is_named_by_row(
    parquet: ModuleType, tmp_path: Path, data: dict | None
) -> None:
    path = write_parquet(tmp_path / "d.parquet", [NESTED[0], {"data": data, "answer": "x"}])
    with pytest.raises(UserError) as error:
        read_records(path, NESTED_COLUMNS)
    assert str(error.value) == f"{path}[1]: missing field 'data.question'"


def test_parquet_null_input_is_empty(parquet: ModuleType, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{**RECORDS[0], "input": None}])
    assert read_records(path, COLUMNS)[0]["input"] == ""


def test_parquet_null_output_is_named_by_row(parquet: ModuleType, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [RECORDS[0], {**RECORDS[1], "output": None}])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value) == f"{path}[1]: missing field 'output'"


def test_parquet_column_that_is_not_text_is_named_by_row(
    parquet: ModuleType, tmp_path: Path
) -> None:
    rows = [{"instruction": "a", "output": 1}, {"instruction": "b", "output": 2}]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value) == f"{path}[0]: field 'output' must be a string, got int"


def test_parquet_chat_conversations_read_like_jsonl(parquet: ModuleType, tmp_path: Path) -> None:
    """A list-of-struct column of {role, content} messages."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]
    from_parquet = read_conversations(write_parquet(tmp_path / "c.parquet", rows), "messages")
    assert from_parquet == read_conversations(write_jsonl(tmp_path / "c.jsonl", rows), "messages")


def test_parquet_malformed_conversation_is_named_by_row(
    parquet: ModuleType, tmp_path: Path
) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo"}]},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Hi?"}]},
    ]
    path = write_parquet(tmp_path / "c.parquet", rows)
    with pytest.raises(UserError) as error:
        read_conversations(path, "messages")
    assert str(error.value).startswith(f"{path}[1]: messages[1]: expected a message from the")


def test_a_file_that_is_not_parquet_is_a_user_error(parquet: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("instruction,output\na,b\n")
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}: cannot read it as Parquet")


def test_parquet_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import pyarrow` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}: ")
    assert "pip install 'finetune[parquet]'" in str(error.value)


# --------------------------------------------------------------------------------------------
# Any other file
# --------------------------------------------------------------------------------------------


def test_a_data_file_of_another_kind_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("instruction: a\n")
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value) == f"{path}: expected a .json, .jsonl, .csv, .parquet file"
