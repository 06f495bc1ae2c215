"""A trained model put to use: loaded with its LoRA adapter unmerged, prompts tokenized exactly as
training tokenizes a record's prompt part, and answers decoded as their tokens come.

Shared by `recipe=generate` (recipes/generate.py and the conversation loop in chat.py) and
`recipe=eval` (recipes/eval.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.chat_format import LLAMA2_CHAT_TEMPLATE, Message, llama2_chat_turns
from finetune.config import GenerateParams, InferenceParams, LoraConfig
from finetune.data import IGNORE_INDEX, Example, tokenize_alpaca, tokenize_chat
from finetune.errors import UserError
from finetune.generation import generate
from finetune.lora import apply_lora
from finetune.model import Llama
from finetune.peft_format import ADAPTER_CONFIG, load_adapter, read_adapter_config
from finetune.runs import load_model
from finetune.tokenizer import Tokenizer

# No truncation: a prompt is checked against the context as a whole (see `check_fits`).
UNLIMITED = sys.maxsize


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_for_inference(
    params: InferenceParams, device: torch.device, dtype: torch.dtype, adapter: str = ""
) -> Llama:
    """`params.checkpoint` in `dtype`, with the LoRA `adapter` directory applied (unmerged) when
    one is given, in eval mode (no dropout)."""
    model = load_model(params, device, dtype)
    if adapter:
        add_adapter(model, Path(adapter))
    return model.eval()


def add_adapter(model: Llama, adapter_dir: Path) -> None:
    """Wrap `model`'s layers in the adapter's LoRA modules, as its adapter_config.json describes
    them, and load its tensors. A base of another shape is refused by `load_adapter` in one line
    naming the tensor and both shapes."""
    lora_config, base = adapter_settings(adapter_dir)
    apply_lora(model, lora_config)
    try:
        load_adapter(model, adapter_dir)
    except UserError as error:
        raise UserError(f"{error} (the adapter's base model: {base})") from None
    model.requires_grad_(False)


def adapter_settings(adapter_dir: Path) -> tuple[LoraConfig, str]:
    """The LoRA settings an adapter directory (ours or PEFT's) was trained with, and the base
    model it names."""
    path = adapter_dir / ADAPTER_CONFIG
    config = read_adapter_config(path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: not a LoRA adapter (expected peft_type LORA)")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise UserError(f"{path}: missing {', '.join(map(repr, missing))}")
    targets = config["target_modules"]
    base = str(config.get("base_model_name_or_path") or "not named")
    try:
        lora_config = LoraConfig(
            rank=config["r"],
            alpha=float(config["lora_alpha"]),
            dropout=0.0,  # inference: dropout is off anyway
            targets=[targets] if isinstance(targets, str) else list(targets),
            use_dora=bool(config.get("use_dora", False)),
        )
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return lora_config, base


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def resolve_template(template: str, checkpoint: Path) -> str:
    """`auto` made concrete: chat for a model saved from chat data, whose tokenizer_config.json
    carries finetune's Llama-2 chat template, else alpaca."""
    if template != "auto":
        return template
    config_file = checkpoint / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            config = {}
        if isinstance(config, dict) and config.get("chat_template") == LLAMA2_CHAT_TEMPLATE:
            return "chat"
    return "alpaca"


def alpaca_prompt_ids(instruction: str, input: str, tokenizer: Tokenizer) -> list[int]:
    """BOS + Alpaca's prompt, as `tokenize_alpaca` tokenizes it before a record's output."""
    record = {"instruction": instruction, "input": input, "output": ""}
    example = tokenize_alpaca(record, tokenizer, UNLIMITED, train_on_input=False)
    return prompt_part(example, start=0)


def chat_prompt_ids(messages: list[Message], tokenizer: Tokenizer) -> list[int]:
    """The tokens before the answer to `messages`' last (user) message, as `tokenize_chat` puts
    them before an answer: every earlier turn with its BOS and EOS, then BOS + "[INST] ...
    [/INST]" (the system prompt inside the first one)."""
    earlier = messages[:-1]
    history: list[int] = []
    if any(m.role == "assistant" for m in earlier):
        history = tokenize_chat(earlier, tokenizer, UNLIMITED, train_on_input=False).tokens
    last_prompt, _ = llama2_chat_turns([*messages, Message("assistant", "")])[-1]
    return [*history, tokenizer.bos_id, *tokenizer.encode(last_prompt)]


def raw_prompt_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """template=none: BOS + the text, continued as it is."""
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def prompt_part(example: Example, start: int) -> list[int]:
    """The tokens of `example` up to its first trained label at or after `start`."""
    first = next(i for i in range(start, len(example.labels)) if example.labels[i] != IGNORE_INDEX)
    return example.tokens[:first]


def prompt_ids(template: str, text: str, tokenizer: Tokenizer) -> list[int]:
    """One prompt typed or given as `prompt=`: the instruction (alpaca), the user's message
    (chat), or the raw text (none)."""
    if template == "chat":
        return chat_prompt_ids([Message("user", text)], tokenizer)
    if template == "alpaca":
        return alpaca_prompt_ids(text, "", tokenizer)
    return raw_prompt_ids(text, tokenizer)


def check_fits(n_prompt: int, max_new_tokens: int, context_length: int, what: str) -> None:
    if n_prompt + max_new_tokens > context_length:
        raise UserError(
            f"{what}: {n_prompt} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
            f"model's context length of {context_length}; lower max_new_tokens or shorten it"
        )


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    n_tokens: int  # generated, EOS not counted


def answer(
    model: Llama,
    prompt: list[int],
    tokenizer: Tokenizer,
    params: GenerateParams,
    write: Callable[[str], object] | None = None,
) -> Answer:
    """Generate an answer to the token ids `prompt`, stopping at EOS or max_new_tokens; with
    `write`, its text is passed on piece by piece as the tokens come.

    The pieces come from decoding every token so far and passing on what is new: a token
    decoded alone loses its leading space (SentencePiece's "▁"), and a character split over
    byte tokens shows only once whole. Sampling is seeded afresh for every answer, so an answer
    is the same whatever was answered before it.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    ids: list[int] = []
    shown = ""
    tokens = generate(
        model,
        prompt,
        params.max_new_tokens,
        params.temperature,
        params.top_k,
        params.top_p,
        tokenizer.eos_id,
        generator,
    )
    for token in tokens:
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if write is None or text.endswith("\ufffd"):  # an incomplete UTF-8 character
            continue
        write(text[len(shown) :])
        shown = text
    text = tokenizer.decode(ids)
    if write is not None:
        write(text[len(shown) :])
    return Answer(text, len(ids))
