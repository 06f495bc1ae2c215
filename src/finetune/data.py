"""Instruction data: local files -> token ids and loss labels -> padded batches.

Two layouts (`dataset.format`):

* alpaca: records of instruction, input and output, in Stanford Alpaca's prompt;
* chat: conversations, OpenAI's `messages` of {role, content} or ShareGPT's `conversations` of
  {from, value}, in Llama-2's chat format.

`dataset.column_map` names the field of each part; a dotted name reads a nested field.

Files: .json (a list of records), .jsonl, .csv (alpaca only; a header line names the columns) and
.parquet (read by pyarrow, an optional dependency: `pip install 'finetune[parquet]'`).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.config import DatasetConfig
from finetune.errors import ConfigError, UserError
from finetune.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Label of a position that contributes no loss (the prompt, padding); cross-entropy's convention.
IGNORE_INDEX = -100


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


# --------------------------------------------------------------------------------------------
# Rows of a file: (location for error messages, {field: value})
# --------------------------------------------------------------------------------------------

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

# The roles of a conversation, and ShareGPT's names for them.
ROLES = ("system", "user", "assistant")
# Exports of ShareGPT-style data use either human/gpt or user/assistant in `from`.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
}
# ShareGPT's field for the list of messages, read when a record lacks column_map.messages.
SHAREGPT_FIELD = "conversations"

# Llama-2's chat markers, as in Meta's reference code (llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


def read_conversations(path: Path, messages_field: str) -> list[list[Message]]:
    """The conversations of a .json, .jsonl or .parquet file, each checked for its turn order."""
    if path.suffix == ".csv":
        raise UserError(f"{path}: a CSV file holds Alpaca records only, not chat conversations")
    conversations = [_conversation(where, row, messages_field) for where, row in read_rows(path)]
    if not conversations:
        raise UserError(f"{path}: no records")
    return conversations


def _conversation(where: str, row: dict, messages_field: str) -> list[Message]:
    field = messages_field
    raw = field_value(row, field, ABSENT)
    if raw is ABSENT and SHAREGPT_FIELD in row:
        field = SHAREGPT_FIELD
        raw = row[field]
    if raw is None or raw is ABSENT:
        raise UserError(
            f"{where}: missing field {messages_field!r} (or ShareGPT's 'conversations')"
        )
    if not isinstance(raw, list):
        raise UserError(
            f"{where}: field {field!r} must be a list of messages, got {type(raw).__name__}"
        )
    if not raw:
        raise UserError(f"{where}: field {field!r} is an empty conversation")
    messages = [_message(f"{where}: {field}[{i}]", message) for i, message in enumerate(raw)]
    _check_turn_order(f"{where}: {field}", messages)
    return messages


def _message(where: str, raw: object) -> Message:
    """An OpenAI {role, content} or ShareGPT {from, value} message, with the role's name ours."""
    if not isinstance(raw, dict):
        raise UserError(
            f"{where}: expected an object with a role and content, got {type(raw).__name__}"
        )
    if "role" in raw:
        role_key, content_key, roles = "role", "content", {role: role for role in ROLES}
    elif "from" in raw:
        role_key, content_key, roles = "from", "value", SHAREGPT_ROLES
    else:
        raise UserError(f"{where}: missing field 'role' (or ShareGPT's 'from')")
    role = raw[role_key]
    if not isinstance(role, str) or role not in roles:
        raise UserError(
            f"{where}: unknown {role_key} {role!r}; expected one of: {', '.join(roles)}"
        )
    content = raw.get(content_key)
    if content is None:
        raise UserError(f"{where}: missing field {content_key!r}")
    if not isinstance(content, str):
        raise UserError(
            f"{where}: field {content_key!r} must be a string, got {type(content).__name__}"
        )
    return Message(roles[role], content)


def _check_turn_order(where: str, messages: list[Message]) -> None:
    """An optional system message, then user and assistant in turn, at least one of each."""
    first_turn = 1 if messages[0].role == "system" else 0
    for index in range(first_turn, len(messages)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if messages[index].role != expected:
            raise UserError(
                f"{where}[{index}]: expected a message from the {expected}, got one from the "
                f"{messages[index].role}; after an optional system message, the user and the "
                "assistant must take turns"
            )
    if len(messages) - first_turn < 2:
        raise UserError(f"{where}: no assistant message to train on")


# The same format as a Hugging Face chat template, written into the tokenizer_config.json of a
# model trained on chat data, so that `apply_chat_template` and vLLM's chat endpoint prompt it as it
# was trained. The space after BOS is SentencePiece's dummy prefix ("▁[INST]"), which transformers
# does not add after a special token.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception('Llama-2 chat alternates user and assistant messages, user first') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + ' [INST] ' + (system if loop.first else '') + message['content'] | trim"
    " + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def llama2_chat_turns(messages: list[Message]) -> list[tuple[str, str]]:
    """(prompt, answer) of each user/assistant pair, in Llama-2's chat format.

    Each turn's text is prompt + answer = "[INST] {user} [/INST] {assistant} "; the system prompt
    goes inside the first user message. Every content is stripped, the system prompt's too. A last
    user message without an answer is left out: it has nothing to train on.
    """
    contents = [m.content.strip() for m in messages]
    if messages[0].role == "system":
        contents = [f"{B_SYS}{contents[0]}{E_SYS}{contents[1]}", *contents[2:]]
    # Not strict: a last user message has no assistant to pair with, and zip drops it.
    pairs = zip(contents[0::2], contents[1::2], strict=False)
    return [(f"{B_INST} {user} {E_INST}", f" {assistant} ") for user, assistant in pairs]


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
    examples = LOADERS[cfg.format](file, cfg, tokenizer, max_seq_len)
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
    """Right-pad to the longest sequence, its length rounded up to `pad_to_multiple_of`; each
    position's target is the next token's label."""
    longest = max(len(e.tokens) for e in examples) - 1
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
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
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    order: list[int],
    pad_to_multiple_of: int = 1,
) -> Iterator[Batch]:
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        yield collate(chunk, pad_id, pad_to_multiple_of)
