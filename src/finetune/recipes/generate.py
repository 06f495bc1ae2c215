"""Generation from a trained model (its model/, a Hugging Face or Meta checkpoint, or a base with a
LoRA adapter applied unmerged):

    python -m finetune recipe=generate checkpoint=outputs/.../model prompt="Name a prime."
    python -m finetune recipe=generate checkpoint=BASE adapter=outputs/.../adapter prompts=FILE
    python -m finetune recipe=generate checkpoint=outputs/.../model template=chat

`prompt=` streams the answer to stdout; `prompts=` writes generations.jsonl to the run directory,
one row per prompt (with `compare_base=true`, the base model's answer beside it); with neither, a
conversation on the terminal, or one message per line of piped stdin (chat.py). Every prompt is
tokenized as training tokenizes a record's prompt part (inference.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.chat import converse, typed_lines
from finetune.chat_format import read_conversations
from finetune.config import DType, GenerateParams, ModelConfig
from finetune.data import read_records
from finetune.decode_layout import lay_out_for_decoding
from finetune.errors import UserError
from finetune.inference import (
    Answer,
    add_adapter,
    alpaca_prompt_ids,
    answer,
    chat_prompt_ids,
    check_fits,
    load_for_inference,
    prompt_ids,
    raw_prompt_ids,
    resolve_template,
)
from finetune.model import Llama
from finetune.outputs import check_writable
from finetune.runs import load_tokenizer, resolve_device, seed_everything
from finetune.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"


@dataclass
class Request:
    """One prompt of a prompts= file: its record as read, and its token ids."""

    record: dict
    ids: list[int]


@dataclass
class Generation:
    """What every source of prompts needs: the params, the tokenizer and prompt template, and
    the device and dtype the model loads in."""

    params: GenerateParams
    tokenizer: Tokenizer
    template: str
    device: torch.device
    dtype: torch.dtype

    def load(self, params: GenerateParams, adapter: str = "") -> Llama:
        """The model, ready to generate: with `adapter` applied and its weights laid out for
        decoding (decode_layout.py); nothing is added to it after this."""
        model = load_for_inference(params, self.device, self.dtype, adapter)
        lay_out_for_decoding(model)
        return model

    def answer_each(self, model: Llama, requests: list[Request], which: str) -> list[Answer]:
        answers = []
        for number, request in enumerate(requests, start=1):
            answers.append(answer(model, request.ids, self.tokenizer, self.params))
            n_tokens = answers[-1].n_tokens
            log.info("%s: %d/%d answered (%d tokens)", which, number, len(requests), n_tokens)
        return answers


def run(params: GenerateParams) -> float:
    """Answer `params.prompts`, `params.prompt` or the messages on stdin; returns the mean
    length of the answers in tokens (what a sweep over temperature or top_p compares)."""
    logs_to_stderr()  # stdout holds the answers
    check_writable(Path(params.output_dir))
    seed_everything(params.seed)
    tokenizer = load_tokenizer(params)
    template = resolve_template(params.template, Path(params.checkpoint))
    # Without an optimizer there is no master copy to keep: bf16 holds the weights in bf16.
    dtype = torch.bfloat16 if params.dtype is DType.bf16 else torch.float32
    generation = Generation(params, tokenizer, template, resolve_device(params.device), dtype)
    if params.prompts:
        return answer_file(generation)
    if params.prompt:
        return answer_prompt(generation)
    return answer_stdin(generation)


def answer_file(generation: Generation) -> float:
    """generations.jsonl for the prompts file, every prompt checked before the model loads."""
    params = generation.params
    requests = read_prompts(Path(params.prompts), generation.template, generation.tokenizer)
    for number, request in enumerate(requests, start=1):
        where = f"{params.prompts}: #{number}"
        check_fits(len(request.ids), params.max_new_tokens, params.model.context_length, where)
    base = base_params(params)
    answers, base_answers = answer_all(generation, base, requests)
    write_generations(params, requests, answers, base_answers, generation.tokenizer)
    return sum(a.n_tokens for a in answers) / len(answers)


def answer_prompt(generation: Generation) -> float:
    """The answer to `prompt=`, streamed to stdout."""
    params, tokenizer = generation.params, generation.tokenizer
    ids = prompt_ids(generation.template, params.prompt, tokenizer)
    check_fits(len(ids), params.max_new_tokens, params.model.context_length, "prompt")
    model = generation.load(params, params.adapter)
    reply = answer(model, ids, tokenizer, params, write=print_now)
    print_now("\n")
    return float(reply.n_tokens)


def answer_stdin(generation: Generation) -> float:
    """A conversation on the terminal, or an answer to each line piped in."""
    params, template = generation.params, generation.template
    lines = stdin_lines()
    model = generation.load(params, params.adapter)
    log.info("%s template; %s", template, "/reset starts anew, /exit or Ctrl-D ends")
    answered = converse(model, generation.tokenizer, template, params, lines, sys.stdout)
    log.info("%d answers", answered)
    return float("nan")  # a conversation has no number to compare runs by


def read_prompts(path: Path, template: str, tokenizer: Tokenizer) -> list[Request]:
    """The prompts of a file in a training format: chat conversations ending with the user's
    message (template=chat), else Alpaca records' instruction and optional input."""
    if template == "chat":
        conversations = read_conversations(path, "messages", to_answer=True)
        return [
            Request({"messages": [dataclasses.asdict(m) for m in c]}, chat_prompt_ids(c, tokenizer))
            for c in conversations
        ]
    records = read_records(path, {"instruction": "instruction", "input": "input"})
    if template == "alpaca":
        ids = [alpaca_prompt_ids(r["instruction"], r["input"], tokenizer) for r in records]
    else:  # none: the raw text, an input after a blank line
        texts = ["\n\n".join(filter(None, (r["instruction"], r["input"]))) for r in records]
        ids = [raw_prompt_ids(text, tokenizer) for text in texts]
    return [Request(record, request_ids) for record, request_ids in zip(records, ids, strict=True)]


def base_params(params: GenerateParams) -> GenerateParams | None:
    """The params of `base=DIR`, the model compare_base answers with, architecture and all
    (checked now, before any answer is generated); None when there is none (the base is then
    the checkpoint without the adapter)."""
    if not params.base:
        return None
    return dataclasses.replace(
        params, checkpoint=params.base, model=ModelConfig(), adapter="", compare_base=False, base=""
    )


def answer_all(
    generation: Generation, base: GenerateParams | None, requests: list[Request]
) -> tuple[list[Answer], list[Answer] | None]:
    """(the answers, the base's answers or None). One model is in memory at a time: the
    checkpoint answers first without its adapter (when compared with itself), then with it;
    a `base=` model answers last."""
    params = generation.params
    base_answers = None
    if params.compare_base and base is None:
        # Loaded once: without the adapter to answer as the base, then with it. Laid out for
        # decoding only once the adapter is on, since it wraps the plain layers.
        model = load_for_inference(params, generation.device, generation.dtype)
        base_answers = generation.answer_each(model, requests, "base")
        add_adapter(model, Path(params.adapter))
        lay_out_for_decoding(model)
    else:
        model = generation.load(params, params.adapter)
    answers = generation.answer_each(model, requests, "model")
    if base is not None:
        del model
        base_answers = generation.answer_each(generation.load(base), requests, "base")
    return answers, base_answers


def write_generations(
    params: GenerateParams,
    requests: list[Request],
    answers: list[Answer],
    base_answers: list[Answer] | None,
    tokenizer: Tokenizer,
) -> None:
    """generations.jsonl: per prompt, its record, the prompt as the model saw it, the answer
    (and the base's). Written whole or not at all."""
    path = Path(params.output_dir) / GENERATIONS_FILE
    rows = []
    for index, (request, reply) in enumerate(zip(requests, answers, strict=True)):
        row = {**request.record, "prompt": tokenizer.decode(request.ids), "response": reply.text}
        if base_answers is not None:
            row["base_response"] = base_answers[index].text
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(rows), encoding="utf-8")
    os.replace(tmp, path)
    log.info("%d answers written to %s", len(rows), path)


def stdin_lines() -> Iterator[str]:
    """The messages to answer: typed on the terminal, or piped (one a line). Piped input is
    read up to its first line now, before the model loads: nothing at all is bad input."""
    if sys.stdin is not None and sys.stdin.isatty():
        return typed_lines()
    first = sys.stdin.readline() if sys.stdin is not None else ""
    if not first:
        raise UserError(
            "prompt: nothing to answer: set prompt=TEXT or prompts=FILE, pipe messages to stdin "
            "(one a line), or run on a terminal to chat"
        )
    return itertools.chain([first], sys.stdin)


def print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def logs_to_stderr() -> None:
    """Point the handlers that log to stdout (Hydra's console) at stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
