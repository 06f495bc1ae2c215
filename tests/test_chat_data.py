"""Chat data: conversations in Llama-2's chat format, trained on the assistant's answers only.

The reference is Meta's: each user/assistant pair is BOS + "[INST] {user} [/INST] {assistant} " +
EOS, tokenized as one string, and a system prompt goes inside the first user message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from finetune.chat_format import Message, llama2_chat_turns, read_conversations
from finetune.config import ASSETS_DIR, ColumnMap, DatasetConfig, build_params
from finetune.data import IGNORE_INDEX, load_dataset, tokenize_chat
from finetune.errors import ConfigError, UserError
from finetune.recipes import full
from finetune.tokenizer import Tokenizer
from tests.conftest import TINY_TOKENIZER, compose_config, small_params, write_jsonl

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    """The tokenizer itself, independently of finetune's wrapper."""
    return spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER))


def messages(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in pairs]


TWO_TURNS = messages(
    ("user", "What does json.dumps do?"),
    ("assistant", "It serializes an object to a JSON string."),
    ("user", "And json.loads?"),
    ("assistant", "It parses a JSON string."),
)


def reference_turn(sp: spm.SentencePieceProcessor, user: str, assistant: str) -> list[int]:
    """Meta's tokenization of one user/assistant pair."""
    return [BOS, *sp.Encode(f"[INST] {user} [/INST] {assistant} "), EOS]


def answer_labels(sp: spm.SentencePieceProcessor, user: str, assistant: str) -> list[int]:
    """One turn's labels: BOS and "[INST] {user} [/INST]" masked, the answer and EOS trained."""
    turn = reference_turn(sp, user, assistant)
    n_masked = 1 + len(sp.Encode(f"[INST] {user} [/INST]"))
    return [IGNORE_INDEX] * n_masked + turn[n_masked:]


# --------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------


def test_turns_are_inst_prompts_and_space_wrapped_answers() -> None:
    assert llama2_chat_turns(TWO_TURNS) == [
        ("[INST] What does json.dumps do? [/INST]", " It serializes an object to a JSON string. "),
        ("[INST] And json.loads? [/INST]", " It parses a JSON string. "),
    ]


def test_system_prompt_goes_inside_the_first_user_message_only() -> None:
    conversation = [Message("system", "Be brief."), *TWO_TURNS]
    turns = llama2_chat_turns(conversation)
    assert turns[0][0] == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat does json.dumps do? [/INST]"
    )
    assert turns[1:] == llama2_chat_turns(TWO_TURNS)[1:]


def test_every_content_is_stripped() -> None:
    padded = messages(
        ("system", "\n Be brief. \n"), ("user", "  Hi?\n"), ("assistant", "\tHello. \n\n")
    )
    assert llama2_chat_turns(padded) == [
        ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST]", " Hello. ")
    ]


def test_a_last_user_message_without_an_answer_is_left_out() -> None:
    unanswered = [*TWO_TURNS, Message("user", "And json.load?")]
    assert llama2_chat_turns(unanswered) == llama2_chat_turns(TWO_TURNS)


# --------------------------------------------------------------------------------------------
# Token ids and labels
# --------------------------------------------------------------------------------------------


def test_two_turn_conversation_is_metas_reference_tokenization(
    tokenizer: Tokenizer, sp: spm.SentencePieceProcessor
) -> None:
    example = tokenize_chat(TWO_TURNS, tokenizer, max_seq_len=512, train_on_input=False)
    u1, a1, u2, a2 = [m.content for m in TWO_TURNS]

    assert example.tokens == reference_turn(sp, u1, a1) + reference_turn(sp, u2, a2)
    assert example.labels == answer_labels(sp, u1, a1) + answer_labels(sp, u2, a2)


def test_two_turn_conversation_has_these_exact_ids(tokenizer: Tokenizer) -> None:
    """The ids written out, so that a change of template shows even if it is self-consistent."""
    conversation = messages(("user", "Hi"), ("assistant", "Yes"), ("user", "x"), ("assistant", "y"))
    example = tokenize_chat(conversation, tokenizer, max_seq_len=512, train_on_input=False)
    inst, end_inst = [761, 1046, 1235, 4071], [761, 4065, 1046, 1235, 4071]
    hi, yes, x, y, space = [667, 4010], [1593, 292], [599], [523], [4005]
    assert [tokenizer.id_to_piece(i) for i in inst + end_inst] == (
        ["▁[", "IN", "ST", "]", "▁[", "/", "IN", "ST", "]"]
    )
    assert [tokenizer.id_to_piece(i) for i in hi + yes + x + y + space] == (
        ["▁H", "i", "▁Y", "es", "▁x", "▁y", "▁"]
    )
    # BOS "[INST] Hi [/INST] Yes " EOS, BOS "[INST] x [/INST] y " EOS
    assert example.tokens == [
        *[BOS, *inst, *hi, *end_inst, *yes, *space, EOS],
        *[BOS, *inst, *x, *end_inst, *y, *space, EOS],
    ]
    assert example.labels == [
        *[IGNORE_INDEX] * (1 + 4 + 2 + 5),
        *[*yes, *space, EOS],
        *[IGNORE_INDEX] * (1 + 4 + 1 + 5),
        *[*y, *space, EOS],
    ]


def test_only_the_answers_and_their_eos_are_trained_on(tokenizer: Tokenizer) -> None:
    example = tokenize_chat(TWO_TURNS, tokenizer, max_seq_len=512, train_on_input=False)
    pairs = list(zip(example.tokens, example.labels, strict=True))
    assert all(label in (IGNORE_INDEX, token) for token, label in pairs)
    trained = [token for token, label in pairs if label != IGNORE_INDEX]
    assert trained.count(EOS) == 2 and BOS not in trained
    # Each answer is " {answer} " in the template: the space after it is trained on too.
    assert tokenizer.decode(trained) == (
        "It serializes an object to a JSON string.  It parses a JSON string. "
    )


def test_system_prompt_is_masked_with_the_first_prompt(
    tokenizer: Tokenizer, sp: spm.SentencePieceProcessor
) -> None:
    conversation = messages(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."))
    example = tokenize_chat(conversation, tokenizer, max_seq_len=512, train_on_input=False)
    user = "<<SYS>>\nBe brief.\n<</SYS>>\n\nHi?"
    assert example.tokens == reference_turn(sp, user, "Hello.")
    assert example.labels == answer_labels(sp, user, "Hello.")


def test_train_on_input_trains_on_every_token(tokenizer: Tokenizer) -> None:
    example = tokenize_chat(TWO_TURNS, tokenizer, max_seq_len=512, train_on_input=True)
    masked = tokenize_chat(TWO_TURNS, tokenizer, max_seq_len=512, train_on_input=False)
    assert example.tokens == masked.tokens
    assert example.labels == example.tokens


@pytest.mark.parametrize("train_on_input", [False, True])
def test_chat_truncates_at_max_seq_len(tokenizer: Tokenizer, train_on_input: bool) -> None:
    full = tokenize_chat(TWO_TURNS, tokenizer, 512, train_on_input)
    first_turn = full.tokens.index(EOS) + 1
    for max_seq_len in (3, first_turn - 1, first_turn, first_turn + 1, len(full.tokens) - 1):
        example = tokenize_chat(TWO_TURNS, tokenizer, max_seq_len, train_on_input)
        assert example.tokens == full.tokens[:max_seq_len]
        assert example.labels == full.labels[:max_seq_len]
    assert tokenize_chat(TWO_TURNS, tokenizer, len(full.tokens) + 5, train_on_input) == full


# --------------------------------------------------------------------------------------------
# Reading conversations
# --------------------------------------------------------------------------------------------

OPENAI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Hello."},
    ]
}
EXPECTED = messages(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."))


def test_openai_messages_and_sharegpt_conversations_read_the_same(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [OPENAI, SHAREGPT])
    assert read_conversations(path, "messages") == [EXPECTED, EXPECTED]


def test_sharegpt_user_and_assistant_roles_tokenize_like_human_and_gpt(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    names = {"human": "user", "gpt": "assistant"}
    renamed = {
        "conversations": [
            {**m, "from": names.get(m["from"], m["from"])} for m in SHAREGPT["conversations"]
        ]
    }
    assert [m["from"] for m in renamed["conversations"]] == ["system", "user", "assistant"]
    cfg = DatasetConfig(path=str(write_jsonl(tmp_path / "a.jsonl", [SHAREGPT])), format="chat")
    renamed_cfg = DatasetConfig(
        path=str(write_jsonl(tmp_path / "b.jsonl", [renamed])), format="chat"
    )
    expected = load_dataset(cfg, tokenizer, max_seq_len=512)
    assert load_dataset(renamed_cfg, tokenizer, max_seq_len=512) == expected
    assert expected == [tokenize_chat(EXPECTED, tokenizer, 512, train_on_input=False)]


def test_column_map_messages_may_name_a_nested_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"data": {"dialog": OPENAI["messages"]}}])
    assert read_conversations(path, "data.dialog") == [EXPECTED]


def test_a_missing_nested_messages_field_is_named_with_its_dots(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"data": {"text": "Hi"}}])
    with pytest.raises(UserError) as error:
        read_conversations(path, "data.dialog")
    assert str(error.value) == (
        f"{path}:1: missing field 'data.dialog' (or ShareGPT's 'conversations')"
    )


def test_column_map_messages_names_the_field(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": OPENAI["messages"]}])
    cfg = DatasetConfig(path=str(path), format="chat", column_map=ColumnMap(messages="dialog"))
    [example] = load_dataset(cfg, tokenizer, max_seq_len=512)
    assert example == tokenize_chat(EXPECTED, tokenizer, 512, train_on_input=False)


def test_a_json_list_of_conversations_is_read(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([OPENAI, SHAREGPT]))
    assert read_conversations(path, "messages") == [EXPECTED, EXPECTED]


def test_load_dataset_tokenizes_each_conversation(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [OPENAI, SHAREGPT])
    cfg = DatasetConfig(path=str(path), format="chat", train_on_input=True)
    expected = tokenize_chat(EXPECTED, tokenizer, 64, train_on_input=True)
    assert load_dataset(cfg, tokenizer, max_seq_len=64) == [expected, expected]


USER, ASSISTANT = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}

MALFORMED = [
    ({"text": "Hi"}, "missing field 'messages' (or ShareGPT's 'conversations')"),
    ({"messages": "Hi"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": []}, "field 'messages' is an empty conversation"),
    ({"messages": [USER, "Hello."]}, "messages[1]: expected an object with a role and content"),
    ({"messages": [USER, {"content": "x"}]}, "messages[1]: missing field 'role'"),
    ({"messages": [USER, {"role": "bot", "content": "x"}]}, "messages[1]: unknown role 'bot'"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages[1]: missing field 'content'"),
    (
        {"messages": [USER, {"role": "assistant", "content": 3}]},
        "messages[1]: field 'content' must be a string, got int",
    ),
    (
        {"messages": [USER, USER, ASSISTANT]},
        "messages[1]: expected a message from the assistant, got one from the user",
    ),
    (
        {"messages": [ASSISTANT, USER]},
        "messages[0]: expected a message from the user, got one from the assistant",
    ),
    (
        {"messages": [USER, ASSISTANT, {"role": "system", "content": "x"}, USER, ASSISTANT]},
        "messages[2]: expected a message from the user, got one from the system",
    ),
    ({"messages": [{"role": "system", "content": "x"}, USER]}, "no assistant message to train on"),
    (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
        "conversations[1]: unknown from 'bot'; expected one of: system, human, gpt, user, "
        "assistant",
    ),
    (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
        "conversations[1]: missing field 'value'",
    ),
]


@pytest.mark.parametrize(("row", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_a_malformed_conversation_is_a_user_error_naming_line_and_message(
    tmp_path: Path, row: dict, message: str
) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [OPENAI, row])
    with pytest.raises(UserError) as error:
        read_conversations(path, "messages")
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_a_malformed_conversation_in_json_is_named_by_its_index(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([OPENAI, {"messages": [USER, USER]}]))
    with pytest.raises(UserError) as error:
        read_conversations(path, "messages")
    assert str(error.value).startswith(
        f"{path}[1]: messages[1]: expected a message from the assistant"
    )


def test_a_file_without_conversations_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        read_conversations(path, "messages")


def test_chat_from_csv_is_rejected_by_the_config() -> None:
    with pytest.raises(ConfigError) as error:
        DatasetConfig(path="chats.csv", format="chat")
    assert error.value.key == "dataset.path"
    assert "Alpaca records only" in str(error.value)


def test_read_conversations_rejects_a_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "chats.csv"
    path.write_text("messages\nHi\n")
    with pytest.raises(UserError, match="Alpaca records only"):
        read_conversations(path, "messages")


# --------------------------------------------------------------------------------------------
# The `dataset=chat` option and its shipped sample
# --------------------------------------------------------------------------------------------


def test_dataset_chat_option_reads_the_shipped_sample(tmp_path: Path, tokenizer: Tokenizer) -> None:
    params = build_params(compose_config(["dataset=chat", f"output_dir={tmp_path}"]))
    assert params.dataset.format == "chat"
    assert params.dataset.path == str(ASSETS_DIR / "sample_chat.jsonl")
    examples = load_dataset(params.dataset, tokenizer, params.max_seq_len)
    assert len(examples) == 300
    assert all(e.tokens[0] == BOS and e.labels[0] == IGNORE_INDEX for e in examples)
    assert all(any(label != IGNORE_INDEX for label in e.labels) for e in examples)


def test_shipped_chat_sample_mixes_system_prompts_and_several_turns() -> None:
    conversations = read_conversations(ASSETS_DIR / "sample_chat.jsonl", "messages")
    with_system = [c for c in conversations if c[0].role == "system"]
    assert 0 < len(with_system) < len(conversations)
    assert {len(llama2_chat_turns(c)) for c in conversations} == {1, 2, 3}


# --------------------------------------------------------------------------------------------
# The chat template written with a model trained on chat data
# --------------------------------------------------------------------------------------------


def test_a_chat_model_carries_a_chat_template_that_tokenizes_as_it_trained(
    small_checkpoint: Path, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    from transformers import AutoTokenizer

    full.run(small_params(small_checkpoint, tmp_path / "chat", "dataset=chat", "max_steps=1"))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "chat" / "model")

    conversations = read_conversations(ASSETS_DIR / "sample_chat.jsonl", "messages")
    for conversation in conversations:
        # Training leaves out a last question without its answer; the template would prompt it.
        answered = conversation[:-1] if conversation[-1].role == "user" else conversation
        rendered = theirs.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in answered], tokenize=True
        )
        trained = tokenize_chat(answered, tokenizer, max_seq_len=10**6, train_on_input=False)
        assert list(rendered["input_ids"]) == trained.tokens
    # Prompting for an answer: Meta's inference format, BOS + "[INST] ... [/INST]" and no EOS.
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = theirs.apply_chat_template(question, tokenize=True, add_generation_prompt=True)
    assert list(prompt["input_ids"]) == [BOS, *tokenizer.encode("[INST] What is 2 + 2? [/INST]")]
