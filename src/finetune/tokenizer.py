"""SentencePiece tokenizer (`tokenizer.model`, as Llama-2 ships it)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from finetune.errors import UserError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # Llama-2 has no pad piece; padded positions are masked out of the loss, so any id will do.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size: int = self.sp.GetPieceSize()
        # SentencePiece adds a dummy-prefix "▁" to the start of every text it encodes; text that
        # continues other text is encoded after a newline, whose tokens are then dropped.
        self._newline_ids: list[int] = self.sp.Encode("\n")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the start of a sequence (with SentencePiece's dummy prefix)."""
        return self.sp.Encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` as it continues a text that ends in a newline."""
        ids = self.sp.Encode("\n" + text)
        n = len(self._newline_ids)
        if ids[:n] != self._newline_ids:  # the newline merged with what follows it
            raise ValueError(f"{self.path}: cannot split the newline off {text[:20]!r}")
        return ids[n:]

    def decode(self, ids: list[int]) -> str:
        return self.sp.Decode(ids)

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size != vocab_size:
            raise UserError(
                f"{self.path}: tokenizer has {self.vocab_size} tokens but the model's embedding "
                f"has {vocab_size} (model.vocab_size); use the checkpoint's own tokenizer"
            )
