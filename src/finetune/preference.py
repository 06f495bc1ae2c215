"""Preference data: two answers to one prompt, the chosen and the rejected, as token ids and loss
labels, and their batches.

A record holds either strings, `prompt`, `chosen` and `rejected`, the prompt wrapped in the format
`dataset.template` names (Alpaca's prompt, or Llama-2 chat), or message lists: `chosen` and
`rejected` as conversations that share every message but the last, the assistant's answer (an
optional `prompt` list holds the shared messages once, before both). Either way the two answers
follow the same prompt tokens, which carry no label: only the answers are scored.

Files: .json (a list of records), .jsonl, .parquet, and .csv for string records (data_files.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.chat_format import Message, _check_turn_order, _message
from finetune.config import PreferenceColumnMap, PreferenceDatasetConfig
from finetune.data import (
    IGNORE_INDEX,
    Example,
    collate,
    has_targets,
    tokenize_alpaca,
    tokenize_chat,
)
from finetune.data_files import field_value, read_rows
from finetune.errors import UserError
from finetune.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    # The reference model's summed log-probabilities of (chosen, rejected), where they are
    # computed before training (full fine-tuning); None where the loss computes them.
    reference_logps: tuple[float, float] | None = None


@dataclass
class PreferenceBatch:
    inputs: torch.Tensor  # (2 * pairs, seq): the chosen answers' rows, then the rejected ones'
    targets: torch.Tensor  # (2 * pairs, seq)
    n_tokens: int  # input tokens that are not padding
    reference_logps: torch.Tensor | None  # (2 * pairs,) fp32, in the rows' order, or None

    @property
    def n_targets(self) -> int:
        """The pairs with labels: the DPO loss is a mean over pairs, not over tokens."""
        return int(self.labelled_pairs().sum())

    def labelled_pairs(self) -> torch.Tensor:
        """(pairs,) bool: False for the stand-in rows of a process with no pair left to train."""
        n_pairs = len(self.inputs) // 2
        return (self.targets[:n_pairs] != IGNORE_INDEX).any(dim=1)


def collate_pairs(
    pairs: list[PreferencePair], pad_id: int, pad_to_multiple_of: int = 1
) -> PreferenceBatch:
    """The chosen answers, then the rejected ones, padded as one batch (see `data.collate`)."""
    both = collate(
        [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pad_to_multiple_of
    )
    reference = None
    if all(p.reference_logps is not None for p in pairs):
        logps = [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs]
        reference = torch.tensor(logps, dtype=torch.float32)
    return PreferenceBatch(both.inputs, both.targets, both.n_tokens, reference)


def load_pairs(
    cfg: PreferenceDatasetConfig, tokenizer: Tokenizer, max_seq_len: int, path: str = ""
) -> list[PreferencePair]:
    """Every pair of `path` (default `cfg.path`), tokenized; pairs that max_seq_len leaves
    without an answer token, or with the same tokens on both sides, are left out."""
    file = Path(path or cfg.path)
    n_records = 0
    pairs = []
    for where, row in read_rows(file):
        n_records += 1
        chosen, rejected = record_examples(where, row, cfg, tokenizer, max_seq_len)
        if has_targets(chosen) and has_targets(rejected) and chosen.tokens != rejected.tokens:
            pairs.append(PreferencePair(chosen, rejected))
    if not n_records:
        raise UserError(f"{file}: no records")
    if not pairs:
        raise UserError(
            f"{file}: no pair keeps two different answers within max_seq_len={max_seq_len}; "
            "raise max_seq_len"
        )
    if len(pairs) < n_records:
        log.warning(
            "%s: %d of %d pairs left out: within max_seq_len=%d they have no answer token, or "
            "the same tokens on both sides",
            file,
            n_records - len(pairs),
            n_records,
            max_seq_len,
        )
    return pairs


def record_examples(
    where: str, row: dict, cfg: PreferenceDatasetConfig, tokenizer: Tokenizer, max_seq_len: int
) -> tuple[Example, Example]:
    """(chosen, rejected) of one record, labelled on the answers only."""
    columns = cfg.column_map
    prompt = field_value(row, columns.prompt)
    chosen, rejected = field_value(row, columns.chosen), field_value(row, columns.rejected)
    for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if value is None:
            raise UserError(f"{where}: missing field {name!r}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return string_examples(where, prompt, (chosen, rejected), cfg, tokenizer, max_seq_len)
    if isinstance(chosen, list) and isinstance(rejected, list):
        conversations = shared_prefix_conversations(where, prompt, chosen, rejected, columns)
        return tuple(  # type: ignore[return-value]
            last_answer_only(tokenize_chat(c, tokenizer, max_seq_len, train_on_input=False))
            for c in conversations
        )
    raise UserError(
        f"{where}: fields {columns.chosen!r} and {columns.rejected!r} must both be strings or "
        f"both lists of messages, got {type(chosen).__name__} and {type(rejected).__name__}"
    )


def string_examples(
    where: str,
    prompt: object,
    answers: tuple[str, str],
    cfg: PreferenceDatasetConfig,
    tokenizer: Tokenizer,
    max_seq_len: int,
) -> tuple[Example, Example]:
    """Each answer after the prompt in `cfg.template`'s format, as SFT formats a record."""
    field = cfg.column_map.prompt
    if prompt is None:
        raise UserError(f"{where}: missing field {field!r}")
    if not isinstance(prompt, str):
        raise UserError(
            f"{where}: field {field!r} must be a string, as the answers are, got "
            f"{type(prompt).__name__}"
        )
    if cfg.template == "alpaca":
        return tuple(  # type: ignore[return-value]
            tokenize_alpaca(
                {"instruction": prompt, "input": "", "output": answer},
                tokenizer,
                max_seq_len,
                train_on_input=False,
            )
            for answer in answers
        )
    return tuple(  # type: ignore[return-value]
        tokenize_chat(
            [Message("user", prompt), Message("assistant", answer)],
            tokenizer,
            max_seq_len,
            train_on_input=False,
        )
        for answer in answers
    )


def shared_prefix_conversations(
    where: str, prompt: object, chosen: list, rejected: list, columns: PreferenceColumnMap
) -> tuple[list[Message], list[Message]]:
    """The two conversations, each checked for its turn order and ending with the assistant's
    answer, and the same up to that answer."""
    prefix: list[Message] = []
    if prompt is not None:
        if not isinstance(prompt, list):
            raise UserError(
                f"{where}: field {columns.prompt!r} must be a list of messages, as the answers "
                f"are, got {type(prompt).__name__}"
            )
        prefix = [_message(f"{where}: {columns.prompt}[{i}]", m) for i, m in enumerate(prompt)]
    conversations = []
    for field, raw in ((columns.chosen, chosen), (columns.rejected, rejected)):
        messages = prefix + [_message(f"{where}: {field}[{i}]", m) for i, m in enumerate(raw)]
        if not messages or messages[-1].role != "assistant":
            raise UserError(f"{where}: {field}: the last message must be the assistant's answer")
        _check_turn_order(f"{where}: {field}", messages, to_answer=False)
        conversations.append(messages)
    if conversations[0][:-1] != conversations[1][:-1]:
        raise UserError(
            f"{where}: {columns.chosen!r} and {columns.rejected!r} must share every message "
            "but the last (the answers)"
        )
    return conversations[0], conversations[1]


def last_answer_only(example: Example) -> Example:
    """`example` labelled on its last answer only: the earlier turns are the shared prompt.

    The last answer's labels are the last run of labelled positions (see `data.tokenize_chat`).
    """
    labels = example.labels
    start = len(labels)
    while start > 0 and labels[start - 1] == IGNORE_INDEX:
        start -= 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return Example(example.tokens, [IGNORE_INDEX] * start + labels[start:])
