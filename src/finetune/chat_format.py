"""Chat conversations: OpenAI's `messages` of {role, content} or ShareGPT's `conversations` of
{from, value} read from a data file and checked for turn order, and Llama-2's chat format, as
prompt/answer turns for training and as a Hugging Face chat template for the saved tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.data_files import ABSENT, field_value, read_rows
from finetune.errors import UserError

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


def read_conversations(
    path: Path, messages_field: str, to_answer: bool = False
) -> list[list[Message]]:
    """The conversations of a .json, .jsonl or .parquet file, each checked for its turn order:
    to train on (with an assistant message), or `to_answer` (ending with the user's message)."""
    if path.suffix == ".csv":
        raise UserError(f"{path}: a CSV file holds Alpaca records only, not chat conversations")
    conversations = [
        _conversation(where, row, messages_field, to_answer) for where, row in read_rows(path)
    ]
    if not conversations:
        raise UserError(f"{path}: no records")
    return conversations


def _conversation(where: str, row: dict, messages_field: str, to_answer: bool) -> list[Message]:
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
    _check_turn_order(f"{where}: {field}", messages, to_answer)
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


def _check_turn_order(where: str, messages: list[Message], to_answer: bool) -> None:
    """An optional system message, then user and assistant in turn: at least one of each, or
    (`to_answer`) ending with the user."""
    first_turn = 1 if messages[0].role == "system" else 0
    for index in range(first_turn, len(messages)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if messages[index].role != expected:
            raise UserError(
                f"{where}[{index}]: expected a message from the {expected}, got one from the "
                f"{messages[index].role}; after an optional system message, the user and the "
                "assistant must take turns"
            )
    if to_answer:
        if messages[-1].role != "user":
            raise UserError(
                f"{where}: the last message must be the user's, for the model to answer"
            )
    elif len(messages) - first_turn < 2:
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
