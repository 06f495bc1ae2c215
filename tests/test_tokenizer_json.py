"""A Hugging Face tokenizer.json behaves as the SentencePiece model it was converted from.

The tokenizer.json is made from the shipped tokenizer.model by transformers' converter, as the
Hugging Face repositories of Llama models were. One known difference is the converter's, not
finetune's: for text that starts with a space, the converted tokenizer does not add its
dummy-prefix "▁" (" leading" is "▁leading", SentencePiece's "▁▁leading"). finetune never encodes
such text at the start of a sequence: prompts start with words, and a continuation is encoded after
a newline, where both agree. So those texts are compared as continuations only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from finetune.config import ASSETS_DIR, DatasetConfig, build_params
from finetune.data import load_dataset
from finetune.errors import UserError
from finetune.recipes import full
from finetune.tokenizer import Tokenizer
from tests.conftest import (
    SAMPLE_DATA,
    SMALL_MODEL,
    TINY_CHECKPOINT,
    TINY_TOKENIZER,
    compose_config,
    model_overrides,
)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json and tokenizer_config.json, converted by transformers from tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("converted")
    transformers.AutoTokenizer.from_pretrained(TINY_CHECKPOINT).save_pretrained(directory)
    assert not (directory / "tokenizer.model").exists()
    return directory


@pytest.fixture(scope="module")
def json_tokenizer(converted_dir: Path) -> Tokenizer:
    return Tokenizer(converted_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def sentencepiece() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))


def alone(converted_dir: Path, directory: Path, config: dict | None = None) -> Path:
    """A copy of the tokenizer.json in `directory`, with `config` as its tokenizer_config.json."""
    directory.mkdir(exist_ok=True)
    shutil.copyfile(converted_dir / "tokenizer.json", directory / "tokenizer.json")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


TEXTS = [
    "Hello world",
    "Sort the numbers: 3, 1, 2.",
    "def dumps(obj, *, indent=None):\n    pass",
    "x  ",
    "a\n\nb",
    "é ✓ 漢字",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_json_tokenizer_encodes_like_the_sentencepiece_model(
    json_tokenizer: Tokenizer, sentencepiece: spm.SentencePieceProcessor, text: str
) -> None:
    assert json_tokenizer.encode(text) == sentencepiece.Encode(text)


@pytest.mark.parametrize("text", [*TEXTS, " leading space", "  indented", "\nagain"])
def test_json_continuation_ids_are_the_sentencepiece_ids_after_a_newline(
    json_tokenizer: Tokenizer, sentencepiece: spm.SentencePieceProcessor, text: str
) -> None:
    newline = sentencepiece.Encode("\n")
    after_newline = sentencepiece.Encode("\n" + text)
    assert after_newline[: len(newline)] == newline
    assert json_tokenizer.encode_continuation(text) == after_newline[len(newline) :]


@pytest.mark.parametrize("text", ["Hello world", "Return the list.", "x"])
def test_json_continuation_has_no_dummy_prefix_and_decodes_to_the_text(
    json_tokenizer: Tokenizer, text: str
) -> None:
    continued = json_tokenizer.encode_continuation(text)
    assert json_tokenizer.id_to_piece(json_tokenizer.encode(text)[0]).startswith("▁")
    assert not json_tokenizer.id_to_piece(continued[0]).startswith("▁")
    assert json_tokenizer.decode(continued) == text


@pytest.mark.parametrize("text", TEXTS)
def test_json_tokenizer_decodes_like_the_sentencepiece_model(
    json_tokenizer: Tokenizer, sentencepiece: spm.SentencePieceProcessor, text: str
) -> None:
    ids = [1, *sentencepiece.Encode(text), 2]
    assert json_tokenizer.decode(ids) == sentencepiece.Decode(ids) == text


def test_json_tokenizer_has_the_vocab_size_and_special_ids_of_the_model(
    json_tokenizer: Tokenizer,
) -> None:
    assert json_tokenizer.vocab_size == 4096
    assert (json_tokenizer.bos_id, json_tokenizer.eos_id, json_tokenizer.pad_id) == (1, 2, 0)
    json_tokenizer.check_vocab(4096)
    with pytest.raises(UserError) as error:
        json_tokenizer.check_vocab(32000)
    assert "4096" in str(error.value) and "32000" in str(error.value)


def test_json_tokenizer_adds_no_special_tokens(json_tokenizer: Tokenizer) -> None:
    ids = json_tokenizer.encode("Hello world")
    assert json_tokenizer.bos_id not in ids and json_tokenizer.eos_id not in ids


def test_special_token_text_is_encoded_as_text_like_sentencepiece(
    json_tokenizer: Tokenizer, sentencepiece: spm.SentencePieceProcessor
) -> None:
    text = "<s>[INST] hi [/INST]</s>"
    ids = json_tokenizer.encode(text)
    assert ids == sentencepiece.Encode(text)
    assert 1 not in ids and 2 not in ids


def test_without_tokenizer_config_bos_and_eos_are_llamas(
    converted_dir: Path, tmp_path: Path
) -> None:
    tokenizer = Tokenizer(alone(converted_dir, tmp_path))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)


def test_tokenizer_config_names_the_special_tokens(converted_dir: Path, tmp_path: Path) -> None:
    # Swapped on purpose, and in both of the file's spellings, to show where the ids come from.
    config = {"bos_token": "</s>", "eos_token": {"content": "<s>"}, "pad_token": "<unk>"}
    tokenizer = Tokenizer(alone(converted_dir, tmp_path, config))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)


def test_a_null_special_token_in_the_config_falls_back_to_llamas(
    converted_dir: Path, tmp_path: Path
) -> None:
    config = {"bos_token": None, "eos_token": None, "pad_token": None}
    tokenizer = Tokenizer(alone(converted_dir, tmp_path, config))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)


def test_a_bos_token_missing_from_the_vocabulary_is_a_user_error(
    converted_dir: Path, tmp_path: Path
) -> None:
    path = alone(converted_dir, tmp_path, {"bos_token": "<|begin_of_text|>"})
    with pytest.raises(UserError) as error:
        Tokenizer(path)
    message = str(error.value)
    assert message.startswith(f"{path}:")
    assert "bos_token" in message and "<|begin_of_text|>" in message


def test_an_invalid_tokenizer_config_is_a_user_error(converted_dir: Path, tmp_path: Path) -> None:
    path = alone(converted_dir, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError) as error:
        Tokenizer(path)
    assert str(error.value).startswith(f"{tmp_path / 'tokenizer_config.json'}: invalid JSON")


def test_a_file_that_is_not_a_tokenizer_json_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"vocab": []}')
    with pytest.raises(UserError) as error:
        Tokenizer(path)
    assert str(error.value).startswith(f"{path}: not a tokenizer.json")


@pytest.mark.parametrize(
    ("path", "format"), [(SAMPLE_DATA, "alpaca"), (ASSETS_DIR / "sample_chat.jsonl", "chat")]
)
def test_the_sample_data_tokenizes_identically_with_either_file(
    json_tokenizer: Tokenizer, tokenizer: Tokenizer, path: Path, format: str
) -> None:
    cfg = DatasetConfig(path=str(path), format=format)
    assert load_dataset(cfg, json_tokenizer, 512) == load_dataset(cfg, tokenizer, 512)


@pytest.mark.slow
def test_a_checkpoint_with_only_a_tokenizer_json_fine_tunes(
    converted_dir: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = shutil.copytree(
        small_checkpoint, tmp_path / "checkpoint", ignore=shutil.ignore_patterns("tokenizer*")
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(converted_dir / name, checkpoint / name)
    params = build_params(
        compose_config(
            [
                *model_overrides(SMALL_MODEL),
                f"checkpoint={checkpoint}",
                f"output_dir={tmp_path / 'out'}",
                "max_steps=1",
                "batch_size=2",
                "max_seq_len=64",
            ]
        )
    )
    assert params.tokenizer == str(checkpoint / "tokenizer.json")
    full.run(params)
    saved = Tokenizer(tmp_path / "out" / "model" / "tokenizer.json")
    assert (saved.vocab_size, saved.bos_id, saved.eos_id) == (4096, 1, 2)


def test_a_continuation_whose_newline_merges_with_the_text_is_encoded_as_it_is(
    tmp_path: Path,
) -> None:
    # A BPE in which "\n\n" is one token and no pre-tokenizer splits it off.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {"<s>": 0, "</s>": 1, "\n": 2, "a": 3, "\n\n": 4}
    bpe = HFTokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n")]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.encode("\n\na") == [4, 3]  # the newline would not split off
    assert tokenizer.encode_continuation("\na") == [2, 3]
    assert tokenizer.encode_continuation("a") == [3]
