"""Samples during training: greedy answers to a few fixed prompts at every evaluation and at the
end (`sample_prompts=N`), written to `samples.jsonl` and shown in the log, so that a user watches
what the model says change, not only its loss.

A sample's prompt is an example's tokens before its first label, exactly what training taught the
model to continue; its reference is the labelled answer that follows. The same N examples are
used every time: the first of the validation data, else of the training data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from finetune import ranks
from finetune.data import IGNORE_INDEX, Example
from finetune.generation import generate
from finetune.metrics import drop_rows_after
from finetune.model import Llama
from finetune.tokenizer import Tokenizer

# The most tokens generated for one sample: greedy decoding of a few prompts then costs seconds
# at each evaluation, not minutes, even when max_seq_len leaves room for long answers.
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class SamplePrompt:
    prompt: list[int]  # BOS and the prompt, as in training
    reference: list[int]  # the example's answer: its first run of labelled tokens
    max_new_tokens: int


def sample_prompts(examples: list[Example], n: int, max_seq_len: int) -> list[SamplePrompt]:
    """The prompts of the first `n` of `examples`, each split at its first label."""
    return [split_at_answer(example, max_seq_len) for example in examples[:n]]


def split_at_answer(example: Example, max_seq_len: int) -> SamplePrompt:
    """(prompt, reference) of an example: the tokens before its first label, and the labelled
    tokens that follow up to the next masked one (a chat's first answer and its EOS).

    An answer may take the room that training gave the example (max_seq_len), at most
    MAX_NEW_TOKENS: the model never learned to write past it.
    """
    # labels[0] is no position's target (each position predicts the next token), so it is
    # skipped as `data.has_targets` skips it; every loaded example has a label after it.
    start = next(i for i, label in enumerate(example.labels) if i and label != IGNORE_INDEX)
    end = start
    while end < len(example.labels) and example.labels[end] != IGNORE_INDEX:
        end += 1
    room = min(MAX_NEW_TOKENS, max_seq_len - start)
    return SamplePrompt(example.tokens[:start], example.tokens[start:end], room)


class Sampler:
    """Generates the samples of a run and writes them: `samples.jsonl` (one row per prompt per
    sampled step) and the log, by the process that writes the run's files.

    Every process generates: in a sharded run each forward pass gathers weights from all of them,
    so they run the same passes together and stop at the same token.
    """

    def __init__(
        self,
        model: Llama,
        prompts: list[SamplePrompt],
        tokenizer: Tokenizer,
        output_dir: Path,
        resumed_step: int,
        precision: Callable[[], AbstractContextManager],
        say: Callable[[str], None],
    ) -> None:
        self.model = model
        self.prompts = prompts
        self.precision = precision  # the training's autocast, which a bf16 model's layers expect
        self.tokenizer = tokenizer
        self.say = say
        self.path = output_dir / "samples.jsonl"
        # A resumed run continues the rows of the run it resumes, less those of the steps it
        # redoes (the checkpoint's own step was sampled, if at all, before it was saved); a new
        # run starts the file afresh (an earlier run's samples would pass for its own).
        self.sampled_step = resumed_step
        if ranks.writes_files():
            drop_rows_after(self.path, resumed_step)

    def generate(self, step: int) -> list[dict]:
        """The rows of `step`'s samples; none when there are no prompts or `step` has its rows."""
        if not self.prompts or step == self.sampled_step:
            return []
        self.sampled_step = step
        rows = []
        for sample in self.prompts:
            with gathered_root(self.model):
                answer = self.greedy_answer(sample)
            rows.append(
                {
                    "step": step,
                    "prompt": self.tokenizer.decode(sample.prompt),
                    "reference": self.tokenizer.decode(sample.reference),
                    "answer": self.tokenizer.decode(answer),
                }
            )
        return rows

    def greedy_answer(self, sample: SamplePrompt) -> list[int]:
        """The model's greedy answer to `sample`'s prompt, up to and with its EOS."""
        eos_id = self.tokenizer.eos_id
        answer: list[int] = []
        # Greedy decoding draws nothing from the RNG and `generate` runs the model in eval mode
        # (no dropout) and puts it back, so training continues exactly as without samples. A
        # compiled model runs eagerly here: every new cache length would compile it again.
        with self.precision(), torch.compiler.set_stance("force_eager"):
            tokens = generate(self.model, sample.prompt, sample.max_new_tokens, eos_id=eos_id)
            for token in tokens:
                answer.append(token)
                # Processes stop together: one that stopped alone would leave the others waiting
                # in their next forward pass for its part of the weights.
                if ranks.any_rank(token == eos_id):
                    break
        return answer

    def write(self, rows: list[dict]) -> None:
        """Append `rows` to samples.jsonl and show them, on the process that writes files."""
        if not rows or not ranks.writes_files():
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        for index, row in enumerate(rows, start=1):
            self.say(
                f"sample {index}/{len(rows)} step {row['step']}: prompt {shown(row['prompt'])} "
                f"-> answer {json.dumps(row['answer'], ensure_ascii=False)}"
            )


@contextmanager
def gathered_root(model: Llama) -> Iterator[None]:
    """A sharded model's root weights (embedding, norm, output layer) gathered, in the dtype its
    layers compute in: `generate` makes its KV cache in the embedding's dtype, and a sharded
    embedding shows its fp32 shard's. A cache of another dtype than a bf16 run's layers would be
    cast into a copy by FSDP on its way into each block, leaving the real cache empty."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# The characters of a prompt's end shown in the log: the instruction, not the template before it.
SHOWN_PROMPT_CHARS = 160


def shown(text: str) -> str:
    """A prompt on one line, quoted, a long one cut to its last SHOWN_PROMPT_CHARS characters."""
    if len(text) > SHOWN_PROMPT_CHARS:
        text = "…" + text[-SHOWN_PROMPT_CHARS:]
    return json.dumps(text, ensure_ascii=False)
