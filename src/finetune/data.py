"""Instruction data: local Alpaca-format files -> token ids and loss labels -> padded batches."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import DatasetConfig
from finetune.errors import UserError
from finetune.tokenizer import Tokenizer

# Label of a position that contributes no loss (the prompt, padding); cross-entropy's convention.
IGNORE_INDEX = -100

# Stanford Alpaca's prompt, with and without an input.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    tokens: list[int]
    labels: list[int]  # the token where it is trained on, IGNORE_INDEX elsewhere


@dataclass
class Batch:
    inputs: torch.Tensor  # (batch, seq) token ids
    targets: torch.Tensor  # (batch, seq) the next token of each position, or IGNORE_INDEX
    n_tokens: int  # input tokens that are not padding

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def read_records(path: Path, column_map: dict[str, str]) -> list[dict]:
    """Rows of a .json list or a .jsonl file as {part: text}; `column_map` maps part -> field."""
    records = []
    for where, row in _json_rows(path):
        record = {}
        for name, source in column_map.items():
            value = row.get(source)
            if value is None and name == "input":
                value = ""  # an absent or null input means "no input"
            if value is None:
                raise UserError(f"{where}: missing field {source!r}")
            if not isinstance(value, str):
                raise UserError(
                    f"{where}: field {source!r} must be a string, got {type(value).__name__}"
                )
            record[name] = value
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location for error messages, row) for every row of a .json or .jsonl file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}:{number}"
                    yield where, _checked_row(where, _parse_json(where, line))
        return
    rows = _parse_json(str(path), path.read_text(encoding="utf-8"))
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


def alpaca_prompt(instruction: str, input: str) -> str:
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def tokenize_alpaca(
    record: dict, tokenizer: Tokenizer, max_seq_len: int, train_on_input: bool
) -> Example:
    """BOS + prompt + output + EOS, the prompt's labels masked unless `train_on_input`."""
    prompt = alpaca_prompt(record["instruction"].rstrip(), record["input"].rstrip())
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    # The output follows the prompt's final newline: no dummy-prefix "▁" at its start.
    output_ids = [*tokenizer.encode_continuation(record["output"].rstrip()), tokenizer.eos_id]
    prompt_labels = prompt_ids if train_on_input else [IGNORE_INDEX] * len(prompt_ids)
    tokens = (prompt_ids + output_ids)[:max_seq_len]
    labels = (prompt_labels + output_ids)[:max_seq_len]
    return Example(tokens, labels)


def load_dataset(cfg: DatasetConfig, tokenizer: Tokenizer, max_seq_len: int) -> list[Example]:
    records = read_records(Path(cfg.path), dataclasses.asdict(cfg.column_map))
    return [tokenize_alpaca(r, tokenizer, max_seq_len, cfg.train_on_input) for r in records]


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest sequence; each position's target is the next token's label."""
    length = max(len(e.tokens) for e in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[row, :n] = torch.tensor(e.tokens[:-1])
        targets[row, :n] = torch.tensor(e.labels[1:])
    return Batch(inputs, targets, n_tokens=sum(len(e.tokens) - 1 for e in examples))


def epoch_order(n_examples: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The order of one epoch: file order, or a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return list(range(n_examples))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def batches(
    examples: list[Example], batch_size: int, pad_id: int, order: list[int]
) -> Iterator[Batch]:
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
