"""The tokenized-data cache: a second load reads what the first tokenized, identical examples,
a miss on any change to what decides the token ids, and damaged entries never used."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from finetune import data, data_cache
from finetune.config import ColumnMap, DatasetConfig
from finetune.data import Example, load_dataset
from finetune.tokenizer import Tokenizer
from tests.conftest import TINY_TOKENIZER, logged_losses, run_cli, small_run, write_jsonl

RECORDS = [
    {"instruction": "Name a prime number.", "input": "", "output": "Seven."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five, as 2 + 3 = 5."},
    {"instruction": "Say hello in French.", "question": "x", "output": "Bonjour !"},
]
CONVERSATIONS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What does os.path.join do?"},
            {"role": "assistant", "content": "It joins path parts."},
            {"role": "user", "content": "And os.sep?"},
            {"role": "assistant", "content": "The separator."},
        ]
    }
]
MAX_SEQ_LEN = 96  # holds every record whole


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)


@pytest.fixture
def tokenizations(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files each load tokenized (rather than read from the cache), in order."""
    tokenized: list[Path] = []
    for name, loader in list(data.LOADERS.items()):
        monkeypatch.setitem(data.LOADERS, name, counted(loader, tokenized))
    return tokenized


def counted(loader: Callable, tokenized: list[Path]) -> Callable:
    def load(path: Path, *args: object) -> list[Example]:
        tokenized.append(path)
        return loader(path, *args)

    return load


def alpaca(path: Path, **changes: object) -> DatasetConfig:
    return DatasetConfig(path=str(path), **changes)  # type: ignore[arg-type]


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*")) if cache.exists() else []


@pytest.mark.parametrize("train_on_input", [False, True])
def test_second_load_reads_the_examples_the_first_tokenized(
    alpaca_file: Path, tokenizer: Tokenizer, tokenizations: list[Path], train_on_input: bool
) -> None:
    cfg = alpaca(alpaca_file, train_on_input=train_on_input)
    first = load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    second = load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    fresh = load_dataset(dataclasses.replace(cfg, cache=False), tokenizer, MAX_SEQ_LEN)
    assert tokenizations == [alpaca_file, alpaca_file]  # the first load and the uncached one
    assert second == first == fresh
    assert all(type(t) is int for e in second for t in e.tokens + e.labels)


def test_cached_chat_examples_are_identical_to_fresh_ones(
    tmp_path: Path, tokenizer: Tokenizer, tokenizations: list[Path]
) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    cfg = DatasetConfig(path=str(path), format="chat")
    max_seq_len = 64  # cuts the second turn
    first = load_dataset(cfg, tokenizer, max_seq_len)
    second = load_dataset(cfg, tokenizer, max_seq_len)
    fresh = load_dataset(dataclasses.replace(cfg, cache=False), tokenizer, max_seq_len)
    assert tokenizations == [path, path]
    assert second == first == fresh
    assert data.IGNORE_INDEX in second[0].labels and len(second[0].tokens) == max_seq_len


def test_examples_left_out_are_left_out_from_the_cache_too(
    alpaca_file: Path, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    # 60 tokens hold every prompt but the one with an input, which fills them.
    fresh = load_dataset(alpaca(alpaca_file, cache=False), tokenizer, 60)
    load_dataset(alpaca(alpaca_file), tokenizer, 60)
    caplog.clear()
    caplog.set_level("INFO", logger="finetune")
    assert load_dataset(alpaca(alpaca_file), tokenizer, 60) == fresh
    assert len(fresh) == 2
    assert "1 of 3 examples left out" in caplog.text
    assert "3 tokenized examples read from" in caplog.text


def other_tokenizer(path: Path) -> Tokenizer:
    """The tiny tokenizer with one unused piece appended: a different file, the same ids."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(TINY_TOKENIZER.read_bytes())
    proto.pieces.add(piece="<unused>", score=0.0, type=model_pb2.ModelProto.SentencePiece.UNUSED)
    path.write_bytes(proto.SerializeToString())
    return Tokenizer(path)


def rewrite_data(path: Path) -> None:
    # The same size, so that only the content says it changed.
    path.write_text(path.read_text().replace("Seven.", "Three."))


# Each change to what decides the token ids, applied to (data file, config, max_seq_len,
# tokenizer); each must miss.
CHANGES: dict[str, Callable] = {
    "data file": lambda path, cfg, n, tok: (rewrite_data(path), cfg, n, tok)[1:],
    "train_on_input": lambda path, cfg, n, tok: (
        dataclasses.replace(cfg, train_on_input=True),
        n,
        tok,
    ),
    "max_seq_len": lambda path, cfg, n, tok: (cfg, n + 1, tok),
    "column_map": lambda path, cfg, n, tok: (
        dataclasses.replace(cfg, column_map=ColumnMap(input="question")),
        n,
        tok,
    ),
    "tokenizer": lambda path, cfg, n, tok: (cfg, n, other_tokenizer(path.with_suffix(".model"))),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_to_what_decides_the_tokens_misses(
    change: str, alpaca_file: Path, tokenizer: Tokenizer, tokenizations: list[Path]
) -> None:
    cfg = alpaca(alpaca_file)
    load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    changed_cfg, max_seq_len, changed_tokenizer = CHANGES[change](
        alpaca_file, cfg, MAX_SEQ_LEN, tokenizer
    )
    examples = load_dataset(changed_cfg, changed_tokenizer, max_seq_len)
    assert tokenizations == [alpaca_file, alpaca_file]
    uncached = dataclasses.replace(changed_cfg, cache=False)
    assert examples == load_dataset(uncached, changed_tokenizer, max_seq_len)


def test_the_chat_format_misses_an_alpaca_entry(
    tmp_path: Path, tokenizer: Tokenizer, tokenizations: list[Path]
) -> None:
    # One file that is both: a record with Alpaca's fields and a conversation.
    both = {**RECORDS[0], **CONVERSATIONS[0]}
    path = write_jsonl(tmp_path / "both.jsonl", [both])
    alpaca_examples = load_dataset(DatasetConfig(path=str(path)), tokenizer, MAX_SEQ_LEN)
    chat_cfg = DatasetConfig(path=str(path), format="chat")
    chat_examples = load_dataset(chat_cfg, tokenizer, MAX_SEQ_LEN)
    assert tokenizations == [path, path]
    assert chat_examples != alpaca_examples


def test_a_change_to_the_tokenizing_code_misses(
    alpaca_file: Path,
    tokenizer: Tokenizer,
    tokenizations: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = tmp_path / "data.py"
    code.write_text("PROMPT = 'v1'\n")
    monkeypatch.setattr(data, "TOKENIZING_CODE", [code])
    cfg = alpaca(alpaca_file)
    load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    code.write_text("PROMPT = 'v2'\n")
    load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    assert tokenizations == [alpaca_file, alpaca_file]


def test_the_validation_file_has_its_own_entry(
    tmp_path: Path, alpaca_file: Path, tokenizer: Tokenizer, tokenizations: list[Path]
) -> None:
    val_file = write_jsonl(tmp_path / "val.jsonl", RECORDS[:1])
    cfg = DatasetConfig(path=str(alpaca_file), val_path=str(val_file))
    train = load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    val = load_dataset(cfg, tokenizer, MAX_SEQ_LEN, path=cfg.val_path)
    assert load_dataset(cfg, tokenizer, MAX_SEQ_LEN, path=cfg.val_path) == val
    assert load_dataset(cfg, tokenizer, MAX_SEQ_LEN) == train
    assert tokenizations == [alpaca_file, val_file]
    assert (len(train), len(val)) == (3, 1)


def test_cache_false_neither_reads_nor_writes(
    alpaca_file: Path, tokenizer: Tokenizer, tokenizations: list[Path], cache: Path
) -> None:
    cfg = alpaca(alpaca_file, cache=False)
    load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    assert entries(cache) == []
    load_dataset(alpaca(alpaca_file), tokenizer, MAX_SEQ_LEN)
    load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    assert tokenizations == [alpaca_file] * 3
    assert len(entries(cache)) == 1


def test_the_cache_is_under_xdg_cache_home_without_finetune_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache.cache_dir() == tmp_path / "xdg" / "finetune" / "tokenized"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache.cache_dir() == tmp_path / "home" / ".cache" / "finetune" / "tokenized"


def truncate(raw: bytes) -> bytes:
    return raw[:-4]


def flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])


def longer_lengths(raw: bytes) -> bytes:
    magic, header, payload = raw.split(b"\n", 2)
    lengths = json.loads(header)
    lengths["lengths"][0] += 1
    return b"\n".join([magic, json.dumps(lengths).encode(), payload])


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda raw: b"",
    "cut short": truncate,
    "a payload byte changed": flip_last_byte,
    "lengths that do not add up": longer_lengths,
    "header not JSON": lambda raw: raw.replace(b'{"', b"{", 1),
    "another layout": lambda raw: raw.replace(b"finetune-tokens-1", b"finetune-tokens-0", 1),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_never_used_and_is_rewritten(
    damage: str,
    alpaca_file: Path,
    tokenizer: Tokenizer,
    tokenizations: list[Path],
    cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = alpaca(alpaca_file)
    fresh = load_dataset(cfg, tokenizer, MAX_SEQ_LEN)
    [entry] = entries(cache)
    entry.write_bytes(DAMAGE[damage](entry.read_bytes()))
    assert load_dataset(cfg, tokenizer, MAX_SEQ_LEN) == fresh
    assert f"{entry}: damaged tokenized-data cache entry: tokenizing again" in caplog.text
    assert load_dataset(cfg, tokenizer, MAX_SEQ_LEN) == fresh  # from the rewritten entry
    assert tokenizations == [alpaca_file, alpaca_file]
    assert entries(cache) == [entry]


def test_a_write_cut_off_leaves_no_entry(
    alpaca_file: Path, tokenizer: Tokenizer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed while writing (here: before the rename) leaves neither an entry nor its
    temporary file."""

    def killed(src: str, dst: str) -> None:
        assert Path(src).read_bytes().startswith(data_cache.MAGIC)  # written whole, not renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cache.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(alpaca(alpaca_file), tokenizer, MAX_SEQ_LEN)
    assert entries(cache) == []
    assert list(cache.iterdir()) == []


def test_a_cache_that_cannot_be_written_warns_and_the_run_goes_on(
    alpaca_file: Path,
    tokenizer: Tokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocker / "cache"))
    examples = load_dataset(alpaca(alpaca_file), tokenizer, MAX_SEQ_LEN)
    assert examples == load_dataset(alpaca(alpaca_file, cache=False), tokenizer, MAX_SEQ_LEN)
    assert f"tokenized data not cached: {blocker / 'cache'}" in caplog.text


def test_a_rerun_reads_the_cache_and_trains_the_same_losses(
    small_checkpoint: Path, tmp_path: Path, cache: Path
) -> None:
    env = {"FINETUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    runs = []
    for name in ("first", "second"):
        args = small_run(small_checkpoint, f"hydra.run.dir={tmp_path / name}")
        result = run_cli(*args, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        runs.append(result)
    read = "tokenized examples read from"
    assert read not in runs[0].stderr + runs[0].stdout
    assert read in runs[1].stderr + runs[1].stdout
    assert logged_losses(tmp_path / "second") == logged_losses(tmp_path / "first")
    assert len(entries(cache)) == 1


def test_a_missing_data_file_is_reported_as_without_the_cache(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    missing = DatasetConfig(path=str(tmp_path / "gone.jsonl"))
    with pytest.raises(OSError) as cached:
        load_dataset(missing, tokenizer, MAX_SEQ_LEN)
    with pytest.raises(OSError) as uncached:
        load_dataset(dataclasses.replace(missing, cache=False), tokenizer, MAX_SEQ_LEN)
    assert (cached.value.filename, cached.value.strerror) == (
        uncached.value.filename,
        uncached.value.strerror,
    )
    assert cached.value.filename == str(tmp_path / "gone.jsonl")
