"""Instruction data: reading files, the Alpaca prompt, tokenization, batching and epoch order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
from omegaconf import OmegaConf

from finetune.config import DATASET_FORMATS, ColumnMap, DatasetConfig
from finetune.data import (
    IGNORE_INDEX,
    LOADERS,
    Example,
    alpaca_prompt,
    batches,
    collate,
    epoch_order,
    load_dataset,
    read_records,
    tokenize_alpaca,
)
from finetune.errors import UserError
from finetune.tokenizer import Tokenizer
from tests.conftest import TINY_TOKENIZER, compose_config, write_jsonl

# Each part of an Alpaca record -> the field of the file that holds it (no renaming).
COLUMNS = {"instruction": "instruction", "input": "input", "output": "output"}

# --------------------------------------------------------------------------------------------
# The Alpaca prompt
# --------------------------------------------------------------------------------------------


def test_alpaca_prompt_with_input_is_stanford_alpacas_text() -> None:
    assert alpaca_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_alpaca_prompt_without_input_is_stanford_alpacas_text() -> None:
    assert alpaca_prompt("Name a colour.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_alpaca_prompt_keeps_braces_in_the_text() -> None:
    prompt = alpaca_prompt("Format {name}.", "{}")
    assert "### Instruction:\nFormat {name}.\n\n### Input:\n{}\n\n" in prompt


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_has_llama2_special_ids_and_pad_zero(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 4096
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    sentencepiece = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))
    assert sentencepiece.pad_id() == -1  # no pad piece, as in Llama-2
    assert tokenizer.pad_id == 0
    assert tokenizer.id_to_piece(1) == "<s>" and tokenizer.id_to_piece(2) == "</s>"


def test_check_vocab_accepts_the_same_size(tokenizer: Tokenizer) -> None:
    tokenizer.check_vocab(4096)


def test_check_vocab_names_the_file_and_both_sizes(tokenizer: Tokenizer) -> None:
    with pytest.raises(UserError) as error:
        tokenizer.check_vocab(32000)
    message = str(error.value)
    assert str(TINY_TOKENIZER) in message
    assert "4096" in message and "32000" in message


def test_a_file_that_is_not_a_sentencepiece_model_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_text("not a model")
    with pytest.raises(UserError, match=re.escape(str(path))):
        Tokenizer(path)


def test_a_tokenizer_file_of_another_kind_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n")
    with pytest.raises(UserError) as error:
        Tokenizer(path)
    assert str(error.value).startswith(f"{path}:")
    assert "tokenizer.model or tokenizer.json" in str(error.value)


CONTINUATIONS = ["Hello world", "x", "  indented", "42 apples, 7 pears", "é ✓ 漢字", "\nagain"]


@pytest.mark.parametrize("text", CONTINUATIONS)
def test_continuation_ids_are_the_ids_after_a_newline(tokenizer: Tokenizer, text: str) -> None:
    newline = tokenizer.encode("\n")
    after_newline = tokenizer.encode("\n" + text)
    assert after_newline[: len(newline)] == newline
    assert tokenizer.encode_continuation(text) == after_newline[len(newline) :]


@pytest.mark.parametrize("text", ["Hello world", "Return the list.", "x"])
def test_output_tokens_have_no_dummy_prefix(tokenizer: Tokenizer, text: str) -> None:
    start = tokenizer.encode(text)
    continued = tokenizer.encode_continuation(text)
    assert tokenizer.id_to_piece(start[0]).startswith("▁")
    assert not tokenizer.id_to_piece(continued[0]).startswith("▁")
    assert tokenizer.decode(continued) == text


def test_continuation_of_empty_text_is_empty(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_continuation("") == []


def test_prompt_and_continuation_decode_to_the_concatenated_text(tokenizer: Tokenizer) -> None:
    prompt = alpaca_prompt("Explain json.dumps.", "")
    output = "Serialize obj to a JSON formatted str."
    ids = tokenizer.encode(prompt) + tokenizer.encode_continuation(output)
    assert tokenizer.decode(ids) == prompt + output


# --------------------------------------------------------------------------------------------
# tokenize_alpaca
# --------------------------------------------------------------------------------------------

RECORD = {
    "instruction": "Sort the numbers.  \n",
    "input": "3, 1, 2 \t",
    "output": "1, 2, 3\n\n",
}


def expected_parts(tokenizer: Tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(BOS + prompt ids, output ids + EOS), built from the stripped fields."""
    prompt = alpaca_prompt(record["instruction"].rstrip(), record["input"].rstrip())
    output = record["output"].rstrip()
    return (
        [tokenizer.bos_id, *tokenizer.encode(prompt)],
        [*tokenizer.encode_continuation(output), tokenizer.eos_id],
    )


def test_tokenize_alpaca_is_bos_prompt_output_eos_with_the_prompt_masked(
    tokenizer: Tokenizer,
) -> None:
    example = tokenize_alpaca(RECORD, tokenizer, max_seq_len=512, train_on_input=False)
    prompt_ids, output_ids = expected_parts(tokenizer, RECORD)

    assert example.tokens == prompt_ids + output_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + output_ids
    assert example.tokens[0] == tokenizer.bos_id and example.tokens[-1] == tokenizer.eos_id
    assert tokenizer.decode(example.tokens[1:-1]) == alpaca_prompt(
        "Sort the numbers.", "3, 1, 2"
    ) + ("1, 2, 3")


def test_tokenize_alpaca_trains_on_the_prompt_when_train_on_input(tokenizer: Tokenizer) -> None:
    example = tokenize_alpaca(RECORD, tokenizer, max_seq_len=512, train_on_input=True)
    prompt_ids, output_ids = expected_parts(tokenizer, RECORD)
    assert example.tokens == prompt_ids + output_ids
    assert example.labels == example.tokens


def test_tokenize_alpaca_strips_trailing_whitespace_of_every_field(tokenizer: Tokenizer) -> None:
    stripped = {name: value.rstrip() for name, value in RECORD.items()}
    assert stripped != RECORD
    assert tokenize_alpaca(RECORD, tokenizer, 512, False) == tokenize_alpaca(
        stripped, tokenizer, 512, False
    )


def test_tokenize_alpaca_uses_the_no_input_prompt_for_a_blank_input(tokenizer: Tokenizer) -> None:
    record = {"instruction": "Name a colour.", "input": "  \n", "output": "Blue."}
    example = tokenize_alpaca(record, tokenizer, max_seq_len=512, train_on_input=False)
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(alpaca_prompt("Name a colour.", ""))]
    assert example.tokens[: len(prompt_ids)] == prompt_ids
    assert "### Input:" not in tokenizer.decode(example.tokens)


@pytest.mark.parametrize("train_on_input", [False, True])
def test_tokenize_alpaca_truncates_at_max_seq_len(
    tokenizer: Tokenizer, train_on_input: bool
) -> None:
    full = tokenize_alpaca(RECORD, tokenizer, max_seq_len=512, train_on_input=train_on_input)
    n_prompt = len(expected_parts(tokenizer, RECORD)[0])
    for max_seq_len in (5, n_prompt + 2, len(full.tokens) - 1, len(full.tokens)):
        example = tokenize_alpaca(RECORD, tokenizer, max_seq_len, train_on_input)
        assert len(example.tokens) == len(example.labels) == max_seq_len
        assert example.tokens == full.tokens[:max_seq_len]
        assert example.labels == full.labels[:max_seq_len]
    longer = tokenize_alpaca(RECORD, tokenizer, len(full.tokens) + 10, train_on_input)
    assert longer == full


def test_examples_whose_prompt_fills_max_seq_len_are_left_out(
    tmp_path: Path, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    long = {"instruction": "Repeat this. " * 40, "input": "", "output": "No."}
    path = write_jsonl(tmp_path / "d.jsonl", [RECORD, long, RECORD])
    cfg = DatasetConfig(path=str(path))
    examples = load_dataset(cfg, tokenizer, max_seq_len=96)
    assert examples == [tokenize_alpaca(RECORD, tokenizer, 96, train_on_input=False)] * 2
    assert f"{path}: 1 of 3 examples left out: their prompts fill max_seq_len=96" in caplog.text

    with pytest.raises(UserError) as error:
        load_dataset(cfg, tokenizer, max_seq_len=8)
    assert str(error.value) == (
        f"{path}: no example keeps a response token within max_seq_len=8 (the prompts fill it); "
        "raise max_seq_len"
    )


def test_every_dataset_format_has_a_loader() -> None:
    assert set(LOADERS) == set(DATASET_FORMATS)


def test_load_dataset_reads_renames_and_tokenizes(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"prompt": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}],
    )
    cfg = DatasetConfig(
        path=str(path), column_map=ColumnMap(instruction="prompt"), train_on_input=True
    )
    [example] = load_dataset(cfg, tokenizer, max_seq_len=512)
    record = {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}
    assert example == tokenize_alpaca(record, tokenizer, 512, train_on_input=True)


# --------------------------------------------------------------------------------------------
# collate and batches
# --------------------------------------------------------------------------------------------

EXAMPLES = [
    Example(tokens=[1, 5, 6, 7, 2], labels=[IGNORE_INDEX, IGNORE_INDEX, 6, 7, 2]),
    Example(tokens=[1, 8, 2], labels=[IGNORE_INDEX, 8, 2]),
]


def test_collate_right_pads_and_shifts_targets_by_one() -> None:
    batch = collate(EXAMPLES, pad_id=0)
    assert batch.inputs.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch.targets.tolist() == [
        [IGNORE_INDEX, 6, 7, 2],
        [8, 2, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch.n_tokens == 6  # the inputs that are not padding
    assert batch.n_targets == 5


def test_collate_target_of_each_position_is_the_next_label() -> None:
    batch = collate(EXAMPLES, pad_id=0)
    for row, example in enumerate(EXAMPLES):
        n = len(example.tokens) - 1
        assert batch.inputs[row, :n].tolist() == example.tokens[:-1]
        assert batch.targets[row, :n].tolist() == example.labels[1:]


def test_collate_pads_inputs_with_the_pad_id() -> None:
    batch = collate(EXAMPLES, pad_id=3)
    assert batch.inputs[1].tolist() == [1, 8, 3, 3]
    assert batch.targets[1, 2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_collate_of_equal_lengths_has_no_padding() -> None:
    batch = collate([EXAMPLES[0], EXAMPLES[0]], pad_id=0)
    assert batch.inputs.shape == batch.targets.shape == (2, 4)
    assert batch.n_tokens == 8


def test_batches_follow_the_order_in_batch_size_groups() -> None:
    examples = [Example(tokens=[1, 100 + i, 2], labels=[1, 100 + i, 2]) for i in range(5)]
    result = list(batches(examples, batch_size=2, pad_id=0, order=[4, 0, 3, 1, 2]))
    assert [b.inputs[:, 1].tolist() for b in result] == [[104, 100], [103, 101], [102]]


# --------------------------------------------------------------------------------------------
# read_records
# --------------------------------------------------------------------------------------------

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    {"instruction": "Add.", "input": "1 and 2", "output": "3"},
]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_read_records_reads_a_json_list_and_jsonl_alike(tmp_path: Path) -> None:
    from_jsonl = read_records(write_jsonl(tmp_path / "d.jsonl", ROWS), COLUMNS)
    from_json = read_records(write_json(tmp_path / "d.json", ROWS), COLUMNS)
    assert from_jsonl == from_json == ROWS


def test_read_records_skips_blank_lines_and_ignores_extra_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps({**ROWS[0], "id": 7}) + "\n  \n" + json.dumps(ROWS[1]))
    assert read_records(path, COLUMNS) == ROWS


def test_read_records_renames_columns_with_column_map(tmp_path: Path) -> None:
    rows = [{"question": "Say hi.", "answer": "Hi.", "instruction": "ignored"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = read_records(path, {**COLUMNS, "instruction": "question", "output": "answer"})
    assert records == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


NESTED_ROWS = [
    {"data": {"question": "Say hi.", "context": {"text": "politely"}}, "answer": "Hi."},
    {"data": {"question": "Count.", "context": {"text": ""}}, "answer": "1, 2"},
]
NESTED_COLUMNS = {"instruction": "data.question", "input": "data.context.text", "output": "answer"}


def test_dotted_column_map_reads_nested_fields_of_json_and_jsonl(tmp_path: Path) -> None:
    expected = [
        {"instruction": "Say hi.", "input": "politely", "output": "Hi."},
        {"instruction": "Count.", "input": "", "output": "1, 2"},
    ]
    from_jsonl = read_records(write_jsonl(tmp_path / "d.jsonl", NESTED_ROWS), NESTED_COLUMNS)
    from_json = read_records(write_json(tmp_path / "d.json", NESTED_ROWS), NESTED_COLUMNS)
    assert from_jsonl == from_json == expected


def test_a_key_with_a_dot_in_it_is_read_by_its_whole_name(tmp_path: Path) -> None:
    rows = [{"data.question": "Say hi.", "data": {"question": "not this"}, "output": "Hi."}]
    records = read_records(
        write_jsonl(tmp_path / "d.jsonl", rows), {**COLUMNS, "instruction": "data.question"}
    )
    assert records == [{"instruction": "Say hi.", "input": "", "output": "Hi."}]


@pytest.mark.parametrize(
    "data",
    [{"context": {"text": ""}}, "Say hi.", {"question": None}],
    ids=["absent", "parent-not-an-object", "null"],
)
def test_a_missing_nested_field_names_line_and_dotted_field(tmp_path: Path, data: object) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [NESTED_ROWS[0], {"data": data, "answer": "x"}])
    with pytest.raises(UserError) as error:
        read_records(path, NESTED_COLUMNS)
    assert str(error.value) == f"{path}:2: missing field 'data.question'"


def test_a_missing_nested_field_in_json_is_named_by_its_index(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [NESTED_ROWS[0], {"data": {}, "answer": "x"}])
    with pytest.raises(UserError) as error:
        read_records(path, NESTED_COLUMNS)
    assert str(error.value) == f"{path}[1]: missing field 'data.question'"


@pytest.mark.parametrize(
    ("rows", "columns", "field"),
    [(ROWS, COLUMNS, "context"), (NESTED_ROWS, NESTED_COLUMNS, "data.context.txt")],
    ids=["flat", "nested"],
)
def test_a_renamed_input_column_that_no_record_has_is_a_user_error(
    tmp_path: Path, rows: list[dict], columns: dict[str, str], field: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as error:
        read_records(path, {**columns, "input": field})
    assert str(error.value) == (
        f"{path}: no record has the field {field!r} that dataset.column_map.input names"
    )


def test_a_dotted_column_map_override_reaches_the_loaded_examples(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", NESTED_ROWS)
    flat = write_jsonl(
        tmp_path / "flat.jsonl",
        [
            {
                "instruction": r["data"]["question"],
                "input": r["data"]["context"]["text"],
                "output": r["answer"],
            }
            for r in NESTED_ROWS
        ],
    )
    cfg = compose_config(
        [
            f"dataset.path={path}",
            "dataset.column_map.instruction=data.question",
            "dataset.column_map.input=data.context.text",
            "dataset.column_map.output=answer",
        ]
    )
    nested = OmegaConf.to_object(cfg.dataset)
    assert load_dataset(nested, tokenizer, 256) == load_dataset(
        DatasetConfig(path=str(flat)), tokenizer, 256
    )


def test_read_records_reads_a_missing_or_null_input_as_empty(tmp_path: Path) -> None:
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"}]
    records = read_records(write_jsonl(tmp_path / "d.jsonl", rows), COLUMNS)
    assert [r["input"] for r in records] == ["", ""]


def test_read_records_names_line_and_field_of_a_missing_output(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:3:")
    assert "'output'" in str(error.value)


def test_read_records_names_the_renamed_column_that_is_missing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError) as error:
        read_records(path, {**COLUMNS, "output": "answer"})
    assert str(error.value).startswith(f"{path}:1:")
    assert "'answer'" in str(error.value)


def test_read_records_names_index_and_field_of_a_missing_output_in_json(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [ROWS[0], {"instruction": "x", "input": ""}])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}[1]:")
    assert "'output'" in str(error.value)


@pytest.mark.parametrize(("value", "type_name"), [(42, "int"), (["a"], "list"), (True, "bool")])
def test_read_records_rejects_a_field_that_is_not_a_string(
    tmp_path: Path, value: object, type_name: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {**ROWS[1], "instruction": value}])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    message = str(error.value)
    assert message.startswith(f"{path}:2:")
    assert "'instruction'" in message and type_name in message


def test_read_records_rejects_a_non_string_field_in_json(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [{**ROWS[0], "input": 3.5}])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}[0]:")
    assert "'input'" in str(error.value) and "float" in str(error.value)


def test_read_records_names_the_line_of_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"instruction": "a", "output": \n')
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:2:")
    assert "invalid JSON" in str(error.value)


def test_read_records_names_the_file_of_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:")
    assert "invalid JSON" in str(error.value)


@pytest.mark.parametrize("row", [[1, 2], "text", 5, None])
def test_read_records_rejects_a_line_that_is_not_an_object(tmp_path: Path, row: object) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])  # type: ignore[list-item]
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:2:")
    assert "expected a JSON object" in str(error.value)


@pytest.mark.parametrize(("row", "type_name"), [([1, 2], "list"), (5, "int"), (None, "NoneType")])
def test_read_records_rejects_a_json_row_that_is_not_an_object(
    tmp_path: Path, row: object, type_name: str
) -> None:
    path = write_json(tmp_path / "d.json", [ROWS[0], row])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}[1]:")
    assert "expected a JSON object" in str(error.value) and type_name in str(error.value)


@pytest.mark.parametrize("row", ["text", json.dumps(ROWS[1])], ids=["plain", "object-text"])
def test_read_records_rejects_a_json_row_that_is_a_string(tmp_path: Path, row: str) -> None:
    path = write_json(tmp_path / "d.json", [ROWS[0], row])
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}[1]:")
    assert "expected a JSON object" in str(error.value) and "str" in str(error.value)


@pytest.mark.parametrize("content", [{"instruction": "a", "output": "b"}, "rows", 3])
def test_read_records_rejects_a_json_file_that_is_not_a_list(
    tmp_path: Path, content: object
) -> None:
    path = write_json(tmp_path / "d.json", content)
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:")
    assert "expected a JSON list" in str(error.value)


@pytest.mark.parametrize(
    ("name", "content"), [("d.jsonl", ""), ("d.jsonl", "\n \n"), ("d.json", "[]")]
)
def test_read_records_rejects_a_file_without_records(
    tmp_path: Path, name: str, content: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as error:
        read_records(path, COLUMNS)
    assert str(error.value).startswith(f"{path}:")
    assert "no records" in str(error.value)


def test_read_records_rejects_an_empty_json_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("")
    with pytest.raises(UserError, match=re.escape(str(path))):
        read_records(path, COLUMNS)


# --------------------------------------------------------------------------------------------
# epoch_order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (3, 5)])
def test_epoch_order_without_shuffle_is_file_order(seed: int, epoch: int) -> None:
    assert epoch_order(10, shuffle=False, seed=seed, epoch=epoch) == list(range(10))


def test_shuffled_epoch_order_is_a_permutation() -> None:
    order = epoch_order(50, shuffle=True, seed=0, epoch=0)
    assert sorted(order) == list(range(50))
    assert order != list(range(50))


def test_shuffled_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert epoch_order(50, True, seed=4, epoch=2) == epoch_order(50, True, seed=4, epoch=2)


def test_shuffled_epoch_order_differs_across_epochs_and_seeds() -> None:
    orders = [epoch_order(50, True, seed, epoch) for seed in (0, 1, 2) for epoch in (0, 1, 2)]
    assert len({tuple(order) for order in orders}) == len(orders)


def test_collate_rounds_the_batch_length_up_to_a_multiple() -> None:
    examples = [Example(tokens=[1, 5, 6, 7, 2], labels=[-100, 5, 6, 7, 2])]
    batch = collate(examples, pad_id=0, pad_to_multiple_of=8)
    assert batch.inputs.shape == (1, 8)
    assert batch.inputs[0].tolist() == [1, 5, 6, 7, 0, 0, 0, 0]
    assert batch.targets[0].tolist() == [5, 6, 7, 2, -100, -100, -100, -100]
    assert batch.n_tokens == 4
