"""`recipe=generate` without a prompt: messages read from the terminal or from piped stdin, one per
line, each answered as it comes.

With the chat template the exchange is one conversation, in Llama-2's chat format across turns,
tokenized as training tokenizes a conversation (`inference.chat_prompt_ids`); `/reset` starts a
new one. With the alpaca template (or none) each line is a prompt of its own. `/exit`, an end of
input (Ctrl-D) or Ctrl-C ends it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from finetune.chat_format import Message
from finetune.config import GenerateParams
from finetune.inference import answer, chat_prompt_ids, prompt_ids
from finetune.model import Llama
from finetune.tokenizer import Tokenizer

RESET, EXIT = "/reset", "/exit"
# Shown before each message typed on a terminal.
PROMPT = "> "


def typed_lines() -> Iterator[str]:
    """Lines typed on the terminal, each after the prompt; ends at Ctrl-D."""
    while True:
        try:
            yield input(PROMPT)
        except EOFError:
            print(file=sys.stderr)  # the terminal's cursor is after the prompt
            return


def converse(
    model: Llama,
    tokenizer: Tokenizer,
    template: str,
    params: GenerateParams,
    lines: Iterator[str],
    out: TextIO,
) -> int:
    """Answer every line of `lines` on `out`, streamed; returns the number of answers.

    A conversation that outgrows the context loses its oldest turns, with a note on stderr; a
    message that does not fit on its own is not answered, with a note on stderr.
    """
    messages: list[Message] = []
    n_answers = 0
    try:
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text == EXIT:
                break
            if text == RESET:
                messages = []
                note("(a new conversation)")
                continue
            if template != "chat":
                messages = []  # every prompt stands alone
            messages.append(Message("user", text))
            prompt = fitted_prompt(messages, tokenizer, template, params, model.cfg.context_length)
            if prompt is None:
                continue
            reply = answer(model, prompt, tokenizer, params, write=lambda s: write(out, s))
            write(out, "\n")
            messages.append(Message("assistant", reply.text))
            n_answers += 1
    except KeyboardInterrupt:  # Ctrl-C ends the conversation, not with a traceback
        write(out, "\n")
    return n_answers


def fitted_prompt(
    messages: list[Message],
    tokenizer: Tokenizer,
    template: str,
    params: GenerateParams,
    context_length: int,
) -> list[int] | None:
    """The prompt ids of `messages` (changed in place: the oldest turns dropped until the prompt
    and its answer fit in the context), or None when the last message alone does not fit (it is
    dropped too)."""
    dropped = 0
    while True:
        if template == "chat":
            ids = chat_prompt_ids(messages, tokenizer)
        else:
            ids = prompt_ids(template, messages[-1].content, tokenizer)
        if len(ids) + params.max_new_tokens <= context_length:
            break
        first_turn = 1 if messages[0].role == "system" else 0
        if len(messages) - first_turn <= 1:
            messages.pop()
            note(
                f"(not answered: {len(ids)} prompt tokens + max_new_tokens="
                f"{params.max_new_tokens} exceed the context length of {context_length})"
            )
            return None
        del messages[first_turn : first_turn + 2]  # the oldest user message and its answer
        dropped += 1
    if dropped:
        note(f"(the {dropped} oldest turn(s) left out to fit the context of {context_length})")
    return ids


def write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
