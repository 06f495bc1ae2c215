"""Instruction data: local files -> token ids and loss labels -> padded batches.

Two layouts (`dataset.format`):

* alpaca: records of instruction, input and output, in Stanford Alpaca's prompt;
* chat: conversations, OpenAI's `messages` of {role, content} or ShareGPT's `conversations` of
  {from, value}, in Llama-2's chat format.

`dataset.column_map` names the field of each part; a dotted name reads a nested field.

Files: .json (a list of records), .jsonl, .csv (alpaca only) and .parquet, read by data_files.py.
Conversations are read and put in Llama-2's chat format by chat_format.py.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import data_cache
from finetune.chat_format import Message, llama2_chat_turns, read_conversations
from finetune.config import DatasetConfig
from finetune.data_files import ABSENT, field_value, read_rows
from finetune.errors import ConfigError, UserError
from finetune.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Label of a position that contributes no loss (the prompt, padding); cross-entropy's convention.
IGNORE_INDEX = -100


@dataclass
class Example:
    tokens: list[int]
    labels: list[int]  # the token where it is trained on, IGNORE_INDEX elsewhere

    def sequences(self) -> list[Example]:
        """The sequences this example holds, each trained on as if alone: itself (a packed row,
        `packing.PackedRow`, holds several)."""
        return [self]


@dataclass
class Batch:
    inputs: torch.Tensor  # (batch, seq) token ids
    targets: torch.Tensor  # (batch, seq) the next token of each position, or IGNORE_INDEX
    n_tokens: int  # input tokens that are not padding
    # (batch, seq) each token's position in its own sequence, restarting at 0 with each sequence
    # of a packed row, which attends only to itself; None: one sequence per row (0, 1, 2, ...).
    positions: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------------------------
# Alpaca
# --------------------------------------------------------------------------------------------

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
# The parts of an Alpaca record, each read from the field that `dataset.column_map` names.
ALPACA_PARTS = ("instruction", "input", "output")


def read_records(path: Path, column_map: dict[str, str]) -> list[dict]:
    """Alpaca records of a data file as {part: text}; `column_map` maps part -> field, which
    may be a dotted path into nested objects (see `field_value`)."""
    records = []
    input_seen = False
    for where, row in read_rows(path):
        input_seen = input_seen or field_value(row, column_map["input"], ABSENT) is not ABSENT
        record = {}
        for name, source in column_map.items():
            value = field_value(row, source)
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
    # Records may lack an input, but a renamed input column found nowhere is a typo that would
    # silently train every record without its input.
    if not input_seen and column_map["input"] != "input":
        raise UserError(
            f"{path}: no record has the field {column_map['input']!r} that "
            "dataset.column_map.input names"
        )
    return records


def alpaca_prompt(instruction: str, input: str) -> str:
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def jinja_text(prompt: str) -> str:
    """A prompt with `{name}` fields as a Jinja expression joining its text and those variables:
    the chat template below says what `alpaca_prompt` says from the same strings."""
    parts = re.split(r"\{(\w+)\}", prompt)  # text, name, text, name, ..., text
    return " + ".join(
        json.dumps(part) if i % 2 == 0 else part for i, part in enumerate(parts) if part
    )


# The Alpaca prompt as a Hugging Face chat template, written into the tokenizer_config.json of a
# model trained on Alpaca data, so that `apply_chat_template` and vLLM's chat endpoint prompt it as
# it was trained. The first user message is the instruction; a second user message right after it
# is the input (Alpaca's context, e.g. the text to summarise); then optionally the assistant's
# answer, rendered as trained (+ EOS). The prompt ends in "### Response:\n" whether or not a
# generation prompt is asked for: it is one. Alpaca has no system prompt, and no second exchange:
# both are refused rather than dropped. The space after BOS is SentencePiece's dummy prefix, which
# transformers does not add after a special token; parts are right-stripped as in training.
ALPACA_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'user' -%}"
    "{{ raise_exception('Alpaca prompts start with a user message (the instruction); "
    "they have no system prompt') }}"
    "{%- endif -%}"
    "{%- set instruction = messages[0]['content'].rstrip() -%}"
    "{%- if messages | length > 1 and messages[1]['role'] == 'user' -%}"
    "{%- set input = messages[1]['content'].rstrip() -%}"
    "{%- set rest = messages[2:] -%}"
    "{%- else -%}"
    "{%- set input = '' -%}"
    "{%- set rest = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if rest | length > 1 or (rest and rest[0]['role'] != 'assistant') -%}"
    "{{ raise_exception('an Alpaca prompt is one instruction (a user message), an optional "
    "input (a second user message) and an optional answer (an assistant message)') }}"
    "{%- endif -%}"
    "{{ bos_token + ' ' }}"
    "{%- if input -%}"
    f"{{{{ {jinja_text(PROMPT_WITH_INPUT)} }}}}"
    "{%- else -%}"
    f"{{{{ {jinja_text(PROMPT_NO_INPUT)} }}}}"
    "{%- endif -%}"
    "{%- if rest -%}"
    "{{ rest[0]['content'].rstrip() + eos_token }}"
    "{%- endif -%}"
)


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


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def tokenize_chat(
    messages: list[Message], tokenizer: Tokenizer, max_seq_len: int, train_on_input: bool
) -> Example:
    """BOS + turn + EOS for each Llama-2 chat turn, trained on the answers and their EOS only.

    With `train_on_input`, every token is trained on, the prompts' too.
    """
    tokens: list[int] = []
    labels: list[int] = []
    for prompt, answer in llama2_chat_turns(messages):
        # The whole turn is encoded at once, as Meta's code does. The prompt's tokens are the
        # first ones of the turn: Llama's tokenizers start a token at each space, so none spans
        # "[/INST]" and the answer's leading space (were one to, it would count as the answer's).
        turn_ids = tokenizer.encode(prompt + answer)
        n_prompt = _common_prefix_length(tokenizer.encode(prompt), turn_ids)
        turn = [tokenizer.bos_id, *turn_ids, tokenizer.eos_id]
        n_masked = 0 if train_on_input else 1 + n_prompt  # the BOS and the prompt
        tokens += turn
        labels += [IGNORE_INDEX] * n_masked + turn[n_masked:]
        if len(tokens) >= max_seq_len:  # later turns would be cut off anyway
            break
    return Example(tokens[:max_seq_len], labels[:max_seq_len])


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# Loading a dataset
# --------------------------------------------------------------------------------------------


def load_dataset(
    cfg: DatasetConfig, tokenizer: Tokenizer, max_seq_len: int, path: str = ""
) -> list[Example]:
    """Read `path` (default `cfg.path`) and tokenize every record in the layout `cfg.format` names.

    The validation file (`cfg.val_path`) is read with the same format, columns and masking.
    Examples with nothing to train on (a prompt that fills max_seq_len) are left out.
    """
    file = Path(path or cfg.path)
    examples = tokenized(file, cfg, tokenizer, max_seq_len)
    trainable = [e for e in examples if has_targets(e)]
    if not trainable:
        raise UserError(
            f"{file}: no example keeps a response token within max_seq_len={max_seq_len} "
            "(the prompts fill it); raise max_seq_len"
        )
    if len(trainable) < len(examples):
        log.warning(
            "%s: %d of %d examples left out: their prompts fill max_seq_len=%d, leaving no "
            "response token to train on",
            file,
            len(examples) - len(trainable),
            len(examples),
            max_seq_len,
        )
    return trainable


# The code that decides the token ids of a record: part of the cache key, so that a new version
# of finetune that tokenizes differently (a new prompt template, a fix) never reads old entries.
TOKENIZING_CODE = [
    Path(__file__).with_name(name)
    for name in ("data.py", "chat_format.py", "data_files.py", "tokenizer.py")
]


def tokenized(
    file: Path, cfg: DatasetConfig, tokenizer: Tokenizer, max_seq_len: int
) -> list[Example]:
    """Every example of `file`, from the tokenized-data cache (data_cache.py) when a run before
    stored them with the same data, tokenizer, settings and code; `dataset.cache=false` always
    tokenizes."""

    def tokenize() -> list[Example]:
        return LOADERS[cfg.format](file, cfg, tokenizer, max_seq_len)

    if not cfg.cache:
        return tokenize()
    columns = ALPACA_PARTS if cfg.format == "alpaca" else ("messages",)
    settings = {
        "format": cfg.format,
        "column_map": {part: getattr(cfg.column_map, part) for part in columns},
        "train_on_input": cfg.train_on_input,
        "max_seq_len": max_seq_len,
        # A tokenizer.json's special tokens may be named by the tokenizer_config.json beside it.
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    try:
        key = data_cache.cache_key([file, tokenizer.path, *TOKENIZING_CODE], settings)
    except OSError:  # an unreadable data file: the loader says so, in its one line
        return tokenize()
    sequences = data_cache.cached_sequences(
        key, lambda: [(e.tokens, e.labels) for e in tokenize()], source=file
    )
    return [Example(tokens, labels) for tokens, labels in sequences]


def has_targets(example: Example) -> bool:
    # labels[0] is no position's target: each position predicts the next token.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def _load_alpaca(
    path: Path, cfg: DatasetConfig, tokenizer: Tokenizer, max_seq_len: int
) -> list[Example]:
    columns = {part: getattr(cfg.column_map, part) for part in ALPACA_PARTS}
    records = read_records(path, columns)
    return [tokenize_alpaca(r, tokenizer, max_seq_len, cfg.train_on_input) for r in records]


def _load_chat(
    path: Path, cfg: DatasetConfig, tokenizer: Tokenizer, max_seq_len: int
) -> list[Example]:
    conversations = read_conversations(path, cfg.column_map.messages)
    return [tokenize_chat(c, tokenizer, max_seq_len, cfg.train_on_input) for c in conversations]


# How each `dataset.format` is read and tokenized.
LOADERS: dict[str, Callable[[Path, DatasetConfig, Tokenizer, int], list[Example]]] = {
    "alpaca": _load_alpaca,
    "chat": _load_chat,
}


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(training, held out): `fraction` of the examples, at least one, chosen by `seed`.

    The choice comes from its own generator, so it is the same whatever the training shuffle
    does, and both parts keep file order, so `shuffle=false` still means file order.
    """
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise ConfigError(
            "dataset.val_split",
            f"holding out {n_val} of {len(examples)} examples leaves none to train on",
        )
    # A string seed is hashed (SHA-512) into the generator's state: stable across runs and
    # platforms, and unrelated to the torch generators that shuffle the epochs.
    held_out = set(random.Random(f"val_split:{seed}").sample(range(len(examples)), n_val))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    return train, val


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad to the longest row, its length rounded up to `pad_to_multiple_of`; each
    position's target is the next token's label.

    The sequences of a packed row are shifted one by one, so that no target crosses from one
    sequence to the next (nothing predicts a sequence's BOS), and their positions restart at 0:
    the model reads the sequences' boundaries from them. The padding after a packed row's last
    sequence is positioned as a sequence of its own, which no real token attends to.
    """
    rows = [[(s.tokens[:-1], s.labels[1:]) for s in e.sequences()] for e in examples]
    row_lengths = [sum(len(inputs) for inputs, _ in row) for row in rows]
    length = -(-max(row_lengths) // pad_to_multiple_of) * pad_to_multiple_of
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(length).repeat(len(examples), 1)
    for r, row in enumerate(rows):
        start = 0
        for sequence_inputs, sequence_targets in row:
            end = start + len(sequence_inputs)
            inputs[r, start:end] = torch.tensor(sequence_inputs)
            targets[r, start:end] = torch.tensor(sequence_targets)
            positions[r, start:end] = torch.arange(end - start)
            start = end
        positions[r, start:] = torch.arange(length - start)
    # Rows of one sequence each need no positions: the plain causal mask is theirs.
    packed = any(len(row) > 1 for row in rows)
    return Batch(inputs, targets, sum(row_lengths), positions if packed else None)


def epoch_order(n_examples: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The order of one epoch: file order, or a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return list(range(n_examples))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def batches(
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    order: list[int],
    pad_to_multiple_of: int = 1,
) -> Iterator[Batch]:
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        yield collate(chunk, pad_id, pad_to_multiple_of)
