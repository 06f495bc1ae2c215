"""The chat template a model trained on Alpaca data carries: transformers' `apply_chat_template`
renders a user message (and an input) as the Alpaca prompt it was trained on, token for token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.data import ALPACA_CHAT_TEMPLATE, alpaca_prompt, tokenize_alpaca
from finetune.recipes import full, lora
from finetune.tokenizer import Tokenizer
from tests.conftest import SAMPLE_DATA, small_params

BOS = 1


@pytest.fixture(scope="module")
def alpaca_model(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ of one step of full fine-tuning on the shipped Alpaca sample."""
    out = tmp_path_factory.mktemp("alpaca")
    full.run(small_params(small_checkpoint, out, "max_steps=1"))
    return out / "model"


def messages(record: dict, with_answer: bool) -> list[dict]:
    """A record as chat messages: the instruction, the input (if any) as a second user message,
    and the answer."""
    chat = [{"role": "user", "content": record["instruction"]}]
    if record["input"]:
        chat.append({"role": "user", "content": record["input"]})
    if with_answer:
        chat.append({"role": "assistant", "content": record["output"]})
    return chat


def test_an_alpaca_model_renders_chats_as_the_prompts_it_was_trained_on(
    alpaca_model: Path, tokenizer: Tokenizer
) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(alpaca_model)
    records = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:300]]
    assert 0 < sum(1 for r in records if r["input"]) < len(records)  # both prompts are tested
    for record in records:
        trained = tokenize_alpaca(record, tokenizer, max_seq_len=10**6, train_on_input=False)
        rendered = theirs.apply_chat_template(messages(record, with_answer=True), tokenize=True)
        assert list(rendered["input_ids"]) == trained.tokens
        # Prompting for the answer: BOS and the prompt, whose first label training masked.
        prompt = theirs.apply_chat_template(
            messages(record, with_answer=False), tokenize=True, add_generation_prompt=True
        )
        instruction, context = record["instruction"].rstrip(), record["input"].rstrip()
        expected = [BOS, *tokenizer.encode(alpaca_prompt(instruction, context))]
        assert list(prompt["input_ids"]) == expected
        assert trained.tokens[: len(expected)] == expected


def test_the_template_renders_the_alpaca_prompt_text(alpaca_model: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(alpaca_model)
    chat = [{"role": "user", "content": "Sum the numbers. "}, {"role": "user", "content": "1 2"}]
    text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<s> " + alpaca_prompt("Sum the numbers.", "1 2")
    assert text.endswith("### Input:\n1 2\n\n### Response:\n")


@pytest.mark.parametrize(
    "chat, message",
    [
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
            "Alpaca prompts start with a user message",
        ),
        (
            [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again."},
            ],
            "an Alpaca prompt is one instruction",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}] * 2,
            "an Alpaca prompt is one instruction",
        ),
    ],
    ids=["system_prompt", "second_exchange", "third_user_message"],
)
def test_what_alpaca_has_no_place_for_is_refused(
    alpaca_model: Path, chat: list[dict], message: str
) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(alpaca_model)
    with pytest.raises(Exception, match=message):
        theirs.apply_chat_template(chat, tokenize=False)


def test_the_template_replaces_one_the_base_tokenizer_brought(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(small_checkpoint, base)
    config_path = base / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": "{{ 'the base format' }}"}))

    lora.run(small_params(base, tmp_path / "run", "recipe=lora", "max_steps=1"))
    saved = json.loads((tmp_path / "run" / "model" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == ALPACA_CHAT_TEMPLATE
