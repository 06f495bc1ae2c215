"""Tokenizers of Llama checkpoints, behind one interface.

* `tokenizer.model`: SentencePiece, as Meta's and Hugging Face's Llama-2 repositories ship it.
* `tokenizer.json`: Hugging Face's `tokenizers` format, for checkpoints that ship nothing else.

Both encode without special tokens: finetune adds BOS and EOS itself, where a format asks for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import sentencepiece as spm
import tokenizers

from finetune.errors import UserError


class Backend(Protocol):
    """What `Tokenizer` needs from a tokenizer file's library."""

    bos_id: int
    eos_id: int
    pad_id: int | None  # None: the tokenizer has no pad token
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...


class SentencePieceModel:
    """A `tokenizer.model`, read by the sentencepiece library."""

    def __init__(self, path: Path) -> None:
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.vocab_size = self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self.sp.Encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)


class TokenizerJson:
    """A Hugging Face `tokenizer.json`, read by the tokenizers library.

    The special tokens are named by a `tokenizer_config.json` next to it when there is one, else
    they are Llama's `<s>` and `</s>`.
    """

    def __init__(self, path: Path) -> None:
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for every failure
            raise UserError(f"{path}: not a tokenizer.json ({e})") from None
        # Text that contains "<s>" is encoded as those characters, as SentencePiece does, so that
        # a dataset cannot slip a BOS or EOS into the middle of a sequence.
        self.tokenizer.encode_special_tokens = True
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        self.bos_id = self._required_id(path, config, "bos_token", default="<s>")
        self.eos_id = self._required_id(path, config, "eos_token", default="</s>")
        pad = _token_name(config.get("pad_token"))
        self.pad_id = self.tokenizer.token_to_id(pad) if pad else None
        # Added tokens count: one appended after the model's vocabulary has an embedding row too.
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _required_id(self, path: Path, config: dict, key: str, default: str) -> int:
        name = _token_name(config.get(key)) or default
        token_id = self.tokenizer.token_to_id(name)
        if token_id is None:
            raise UserError(
                f"{path}: no {key} {name!r} in the vocabulary; name it as {key} in a "
                "tokenizer_config.json next to the tokenizer"
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _token_name(entry: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or (older files) an object."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


# The library that reads each kind of tokenizer file, by the file's suffix.
BACKENDS: dict[str, type[SentencePieceModel] | type[TokenizerJson]] = {
    ".model": SentencePieceModel,
    ".json": TokenizerJson,
}


class Tokenizer:
    """A Llama tokenizer from `tokenizer.model` (SentencePiece) or `tokenizer.json`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.suffix not in BACKENDS:
            raise UserError(f"{self.path}: expected a tokenizer.model or tokenizer.json file")
        self.backend: Backend = BACKENDS[self.path.suffix](self.path)
        self.bos_id: int = self.backend.bos_id
        self.eos_id: int = self.backend.eos_id
        # Llama-2 has no pad token; padded positions are masked out of the loss, so any id will do.
        self.pad_id: int = self.backend.pad_id if self.backend.pad_id is not None else 0
        self.vocab_size: int = self.backend.vocab_size
        # Llama's tokenizers add a dummy-prefix "▁" to the start of every text they encode; text
        # that continues other text is encoded after a newline, whose tokens are then dropped.
        self._newline_ids: list[int] = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the start of a sequence (with the dummy prefix), no BOS/EOS."""
        return self.backend.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` as it continues a text that ends in a newline."""
        ids = self.encode("\n" + text)
        n = len(self._newline_ids)
        if ids[:n] != self._newline_ids:
            # The newline merged with what follows it ("\n\n" is one token in some BPEs): such
            # a tokenizer adds no dummy prefix either, so the text encodes as it is.
            return self.encode(text)
        return ids[n:]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.backend.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of a token id, e.g. "▁Hello" or "<s>"."""
        return self.backend.id_to_piece(token_id)

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size != vocab_size:
            raise UserError(
                f"{self.path}: tokenizer has {self.vocab_size} tokens but the model's embedding "
                f"has {vocab_size} (model.vocab_size); use the checkpoint's own tokenizer"
            )
