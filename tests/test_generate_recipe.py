"""recipe=generate: prompts tokenized as training tokenizes them, answers streamed or written to
generations.jsonl (with the base model's beside them), and the conversation on stdin."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.chat_format import LLAMA2_CHAT_TEMPLATE, Message
from finetune.config import GenerateParams, build_params
from finetune.data import IGNORE_INDEX, tokenize_alpaca, tokenize_chat
from finetune.generation import generate
from finetune.inference import (
    add_adapter,
    alpaca_prompt_ids,
    answer,
    chat_prompt_ids,
    load_for_inference,
    resolve_template,
)
from finetune.lora import lora_modules
from finetune.recipes import generate as generate_recipe
from finetune.tokenizer import Tokenizer
from tests.conftest import (
    ONE_THREAD,
    compose_config,
    run_cli,
    write_adapter,
    write_checkpoint,
    write_jsonl,
)
from tests.test_launch import torchrun

SYSTEM = Message("system", "You answer briefly.")
CONVERSATION = [
    Message("user", "What does os.path.join do?"),
    Message("assistant", "It joins path parts with the separator."),
    Message("user", "  And shutil.copy?  "),
    Message("assistant", "It copies a file."),
]


def generate_params(checkpoint: Path, out: Path, *overrides: str) -> GenerateParams:
    params = build_params(
        compose_config(
            [
                "recipe=generate",
                "model=auto",
                f"checkpoint={checkpoint}",
                f"output_dir={out}",
                "max_new_tokens=16",  # the default, 256, is the small model's whole context
                *overrides,
            ]
        )
    )
    assert isinstance(params, GenerateParams)
    return params


def greedy_text(model: torch.nn.Module, prompt: list[int], tokenizer: Tokenizer, n: int) -> str:
    ids = [t for t in generate(model, prompt, n, eos_id=tokenizer.eos_id) if t != tokenizer.eos_id]
    return tokenizer.decode(ids)


def generate_args(checkpoint: Path, run_dir: Path, *args: str) -> list[str]:
    return [
        "recipe=generate",
        "model=auto",
        f"checkpoint={checkpoint}",
        f"hydra.run.dir={run_dir}",
        *args,
    ]


def generate_cli(checkpoint: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*generate_args(checkpoint, run_dir, *args), cwd=run_dir.parent, env=ONE_THREAD)


def converse_cli(
    checkpoint: Path, run_dir: Path, lines: list[str], *args: str
) -> subprocess.CompletedProcess:
    """The CLI with `lines` piped to stdin; it must end well, however the conversation went."""
    result = run_cli(
        *generate_args(checkpoint, run_dir, "template=chat", *args),
        cwd=run_dir.parent,
        env=ONE_THREAD,
        stdin="".join(f"{line}\n" for line in lines),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def start_cli(checkpoint: Path, run_dir: Path, stdin: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", *generate_args(checkpoint, run_dir, *args)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD},
    )


# --------------------------------------------------------------------------------------------
# Prompts, token for token as training tokenizes them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input", ["", "a/b and c"])
def test_alpaca_prompt_is_the_prompt_part_of_a_training_example(
    input: str, tokenizer: Tokenizer
) -> None:
    record = {"instruction": "Join two paths. ", "input": input, "output": "os.path.join(a, b)"}
    example = tokenize_alpaca(record, tokenizer, 512, train_on_input=False)
    n_prompt = example.labels.index(next(x for x in example.labels if x != IGNORE_INDEX))
    prompt = alpaca_prompt_ids(record["instruction"], input, tokenizer)
    assert prompt == example.tokens[:n_prompt]
    assert prompt[0] == tokenizer.bos_id and len(prompt) > 20


@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("n_turns", [1, 2])
def test_chat_prompt_is_what_training_puts_before_the_last_answer(
    system: bool, n_turns: int, tokenizer: Tokenizer
) -> None:
    conversation = ([SYSTEM] if system else []) + CONVERSATION[: 2 * n_turns]
    example = tokenize_chat(conversation, tokenizer, 1024, train_on_input=False)
    # The last turn starts after the earlier ones; its first trained token starts the answer.
    earlier = conversation[:-2]
    start = len(tokenize_chat(earlier, tokenizer, 1024, False).tokens) if n_turns > 1 else 0
    first_answer = next(i for i in range(start, len(example.labels)) if example.labels[i] >= 0)

    prompt = chat_prompt_ids(conversation[:-1], tokenizer)

    assert prompt == example.tokens[:first_answer]
    assert prompt.count(tokenizer.bos_id) == n_turns


def test_template_auto_is_chat_only_for_a_model_saved_with_the_chat_template(
    tmp_path: Path,
) -> None:
    plain = write_checkpoint(tmp_path / "plain")
    assert resolve_template("auto", plain) == "alpaca"
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_CHAT_TEMPLATE}))
    assert resolve_template("auto", chat) == "chat"
    assert resolve_template("none", chat) == "none"


# --------------------------------------------------------------------------------------------
# prompt= and prompts=
# --------------------------------------------------------------------------------------------


def test_prompt_streams_the_greedy_answer_and_nothing_else_to_stdout(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    result = generate_cli(
        small_checkpoint, tmp_path / "run", "prompt=Name a prime.", "max_new_tokens=12"
    )
    assert result.returncode == 0, result.stderr

    params = generate_params(small_checkpoint, tmp_path / "out")
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    expected = greedy_text(model, alpaca_prompt_ids("Name a prime.", "", tokenizer), tokenizer, 12)
    assert result.stdout == expected + "\n"
    assert expected.strip()


def test_prompts_file_gives_each_prompt_the_answer_it_gets_alone(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = [
        {"instruction": "Name a prime.", "input": ""},
        {"instruction": "Add these.", "input": "2 and 3"},
        {"instruction": "Say hi."},
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    sampling = ("temperature=0.9", "top_k=50", "top_p=0.95", "seed=7", "max_new_tokens=10")
    out = tmp_path / "run"
    params = generate_params(small_checkpoint, out, f"prompts={prompts}", *sampling)
    mean_length = generate_recipe.run(params)

    written = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(w["instruction"], w["input"]) for w in written] == [
        (r["instruction"], r.get("input", "")) for r in rows
    ]
    assert all(w["prompt"].endswith("### Response:\n") for w in written)
    assert "base_response" not in written[0]
    # Sampling is seeded afresh for each prompt: an answer does not depend on those before it.
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    for row, w in zip(rows, written, strict=True):
        prompt = alpaca_prompt_ids(row["instruction"], row.get("input", ""), tokenizer)
        assert w["response"] == answer(model, prompt, tokenizer, params).text
    assert mean_length == pytest.approx(
        sum(len(tokenizer.encode(w["response"])) for w in written) / 3, abs=2
    )
    # The last prompt alone, as prompt=, gets the same answer on stdout.
    capsys.readouterr()
    generate_recipe.run(
        generate_params(small_checkpoint, tmp_path / "alone", *sampling, "prompt=Say hi.")
    )
    assert capsys.readouterr().out == written[2]["response"] + "\n"


def compared_row(checkpoint: Path, tmp_path: Path, base: str, *extra: str) -> dict:
    """The row of generations.jsonl for one prompt, answered by `checkpoint` and by `base`
    (`adapter=...`: the checkpoint without it; `base=...`: another model), 12 tokens greedy."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Name a prime."}])
    out = tmp_path / "run"
    overrides = (f"prompts={prompts}", "compare_base=true", base, "max_new_tokens=12", *extra)
    generate_recipe.run(generate_params(checkpoint, out, *overrides))
    return json.loads((out / "generations.jsonl").read_text())


def test_compare_base_answers_with_and_without_the_adapter(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "adapter", small_checkpoint)
    row = compared_row(small_checkpoint, tmp_path, f"adapter={adapter}")

    params = generate_params(small_checkpoint, tmp_path / "x")
    prompt = alpaca_prompt_ids("Name a prime.", "", tokenizer)
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    assert row["base_response"] == greedy_text(model, prompt, tokenizer, 12)
    add_adapter(model, adapter)
    assert row["response"] == greedy_text(model, prompt, tokenizer, 12)
    assert row["response"] != row["base_response"]


def test_bf16_answers_in_the_decode_layout_are_those_of_the_plain_model(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recipe lays bf16 weights out for decoding (decode_layout.py) once the base has answered
    # without the adapter; the plain bf16 model gives the same answers.
    packed: list[int] = []
    lay_out = generate_recipe.lay_out_for_decoding
    monkeypatch.setattr(
        generate_recipe, "lay_out_for_decoding", lambda m: packed.append(lay_out(m))
    )
    adapter = write_adapter(tmp_path / "adapter", small_checkpoint)
    row = compared_row(small_checkpoint, tmp_path, f"adapter={adapter}", "dtype=bf16")
    assert len(packed) == 1 and packed[0] > 0

    params = generate_params(small_checkpoint, tmp_path / "x", "dtype=bf16")
    prompt = alpaca_prompt_ids("Name a prime.", "", tokenizer)
    model = load_for_inference(params, torch.device("cpu"), torch.bfloat16)
    assert row["base_response"] == greedy_text(model, prompt, tokenizer, 12)
    add_adapter(model, adapter)
    assert row["response"] == greedy_text(model, prompt, tokenizer, 12)
    assert type(model.layers[0].mlp.down_proj) is torch.nn.Linear  # as loaded: plain layers


def test_compare_base_with_another_base_model(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    other = write_checkpoint(tmp_path / "other", seed=5)
    row = compared_row(small_checkpoint, tmp_path, f"base={other}")
    prompt = alpaca_prompt_ids("Name a prime.", "", tokenizer)
    for key, checkpoint in (("response", small_checkpoint), ("base_response", other)):
        params = generate_params(checkpoint, tmp_path / key)
        model = load_for_inference(params, torch.device("cpu"), torch.float32)
        assert row[key] == greedy_text(model, prompt, tokenizer, 12)


def test_chat_prompts_file_answers_the_last_user_message(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    conversation = [SYSTEM, *CONVERSATION[:3]]
    rows = [{"messages": [{"role": m.role, "content": m.content} for m in conversation]}]
    prompts = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    generate_recipe.run(
        generate_params(
            small_checkpoint, out, f"prompts={prompts}", "template=chat", "max_new_tokens=8"
        )
    )
    row = json.loads((out / "generations.jsonl").read_text())
    assert row["messages"] == rows[0]["messages"]
    params = generate_params(small_checkpoint, tmp_path / "x")
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    prompt = chat_prompt_ids(conversation, tokenizer)
    assert row["response"] == greedy_text(model, prompt, tokenizer, 8)


# --------------------------------------------------------------------------------------------
# The conversation on stdin
# --------------------------------------------------------------------------------------------


def test_piped_messages_are_one_conversation_until_reset(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    lines = ["What does os.path.join do?", "And shutil.copy?", "/reset", "Hi there."]
    result = converse_cli(small_checkpoint, tmp_path / "run", lines, "max_new_tokens=6")

    params = generate_params(small_checkpoint, tmp_path / "x")
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    first = greedy_text(
        model, chat_prompt_ids([Message("user", lines[0])], tokenizer), tokenizer, 6
    )
    history = [Message("user", lines[0]), Message("assistant", first), Message("user", lines[1])]
    second = greedy_text(model, chat_prompt_ids(history, tokenizer), tokenizer, 6)
    after_reset = chat_prompt_ids([Message("user", lines[3])], tokenizer)
    third = greedy_text(model, after_reset, tokenizer, 6)
    assert result.stdout == f"{first}\n{second}\n{third}\n"
    assert "(a new conversation)" in result.stderr


def test_a_conversation_beyond_the_context_drops_its_oldest_turns(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    # 256 tokens of context: each answer of up to 150 tokens crowds out the turn before.
    too_long = " ".join(["word"] * 300)
    lines = ["Tell me about os.", "And sys?", too_long, "/exit", "never read"]
    result = converse_cli(small_checkpoint, tmp_path / "run", lines, "max_new_tokens=150")
    assert "oldest turn(s) left out to fit the context of 256" in result.stderr
    assert "(not answered: " in result.stderr
    assert len([line for line in result.stderr.splitlines() if "answers" in line]) == 1
    assert "- 2 answers" in result.stderr


def test_a_terminal_gets_a_conversation_that_ctrl_d_ends(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    controller, terminal = pty.openpty()
    process = start_cli(
        small_checkpoint, tmp_path / "run", terminal, "template=chat", "max_new_tokens=5"
    )
    os.close(terminal)
    # Typed ahead: the terminal holds the lines until the conversation reads them; Ctrl-D ends.
    os.write(controller, b"What does os.walk do?\n/reset\nHi.\n\x04")
    stdout, stderr = process.communicate(timeout=120)
    os.close(controller)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr

    params = generate_params(small_checkpoint, tmp_path / "x", "max_new_tokens=5")
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    first, second = (
        greedy_text(model, chat_prompt_ids([Message("user", text)], tokenizer), tokenizer, 5)
        for text in ("What does os.walk do?", "Hi.")
    )
    # A prompt before each message (the reset's too, and the one Ctrl-D answered).
    assert stdout == f"> {first}\n> > {second}\n> "


def test_ctrl_c_ends_the_conversation_cleanly(small_checkpoint: Path, tmp_path: Path) -> None:
    process = start_cli(small_checkpoint, tmp_path / "run", subprocess.PIPE, "max_new_tokens=4")
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("Name a prime.\n")
    process.stdin.flush()
    process.stdout.readline()  # the first answer: the conversation now waits for a line
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_streamed_pieces_join_into_the_whole_answer(
    small_checkpoint: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """Streaming writes the difference between successive decodes; joined, the pieces are the
    whole answer's text, SentencePiece's spaces included."""
    params = generate_params(small_checkpoint, tmp_path / "x", "max_new_tokens=20")
    model = load_for_inference(params, torch.device("cpu"), torch.float32)
    pieces: list[str] = []
    reply = answer(model, alpaca_prompt_ids("Hi", "", tokenizer), tokenizer, params, pieces.append)
    assert "".join(pieces) == reply.text
    assert len([p for p in pieces if p]) > 1 and " " in reply.text


def test_template_none_reads_an_instruction_and_input_as_raw_text(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    rows = [{"instruction": "Add these.", "input": "2 and 3"}, {"instruction": "import os"}]
    requests = generate_recipe.read_prompts(
        write_jsonl(tmp_path / "p.jsonl", rows), "none", tokenizer
    )
    assert [r.ids for r in requests] == [
        [tokenizer.bos_id, *tokenizer.encode("Add these.\n\n2 and 3")],
        [tokenizer.bos_id, *tokenizer.encode("import os")],
    ]


def test_bf16_generation_holds_bf16_weights_under_fp32_adapters(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter = write_adapter(tmp_path / "adapter", small_checkpoint)
    params = generate_params(
        small_checkpoint, tmp_path / "run", "dtype=bf16", f"adapter={adapter}", "prompt=Hi"
    )
    n_tokens = generate_recipe.run(params)
    assert n_tokens == 16  # a random model does not stop early
    assert capsys.readouterr().out.strip()
    model = load_for_inference(params, torch.device("cpu"), torch.bfloat16, str(adapter))
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    adapted = lora_modules(model).values()
    assert adapted and all(m.base.weight.dtype == torch.bfloat16 for m in adapted)
    assert all(m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32 for m in adapted)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["generate", "eval"])
def test_torchrun_is_refused_in_one_line(
    recipe: str, small_checkpoint: Path, tmp_path: Path
) -> None:
    fits = ["prompt=Hi", "max_new_tokens=4"] if recipe == "generate" else ["max_seq_len=128"]
    args = [f"recipe={recipe}", "model=auto", f"checkpoint={small_checkpoint}", *fits]
    result = torchrun(*args, cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: recipe={recipe} runs on one process: start it without torchrun"]
