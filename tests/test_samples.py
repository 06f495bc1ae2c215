"""Samples during training (`sample_prompts=N`): which prompts, when, what is written and shown,
and that taking them leaves training exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.chat_format import Message
from finetune.checkpoint import load_hf
from finetune.data import IGNORE_INDEX, Example, alpaca_prompt, tokenize_alpaca, tokenize_chat
from finetune.generation import generate
from finetune.recipes import full, lora
from finetune.samples import MAX_NEW_TOKENS, split_at_answer
from finetune.tokenizer import Tokenizer
from tests.conftest import (
    SMALL_MODEL,
    metrics_rows,
    model_overrides,
    run_on_two,
    small_params,
    write_checkpoint,
    write_jsonl,
)
from tests.test_qlora import QLORA_MODEL, needs_torchao
from tests.test_resume import interrupt_at_step
from tests.test_validation import sample_rows

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training file of 12 records, validation file of 4 others)."""
    directory = tmp_path_factory.mktemp("data")
    train = write_jsonl(directory / "train.jsonl", sample_rows(0, 12))
    return train, write_jsonl(directory / "val.jsonl", sample_rows(12, 16))


def run_params(checkpoint: Path, train: Path, out: Path, *overrides: str, recipe: str = "full"):
    return small_params(
        checkpoint,
        out,
        f"recipe={recipe}",
        f"dataset.path={train}",
        "max_seq_len=96",
        "lr=1e-3",
        "warmup_steps=0",
        *overrides,
    )


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# A sample's prompt and reference
# --------------------------------------------------------------------------------------------


def test_the_prompt_is_every_token_before_the_first_label_and_the_reference_follows() -> None:
    M = IGNORE_INDEX
    # A chat of two turns: BOS, prompt, answer, EOS, then a second turn, masked and trained.
    tokens = [BOS, 10, 11, 12, 20, 21, EOS, BOS, 13, 14, 22, EOS]
    labels = [M, M, M, M, 20, 21, EOS, M, M, M, 22, EOS]
    sample = split_at_answer(Example(tokens, labels), max_seq_len=64)
    assert sample.prompt == [BOS, 10, 11, 12]
    assert sample.reference == [20, 21, EOS]  # the first answer only


def test_a_chats_prompt_is_its_first_user_turn_and_the_reference_its_first_answer(
    tokenizer: Tokenizer,
) -> None:
    chat = [
        Message("system", "Be brief."),
        Message("user", "What is 2 + 2?"),
        Message("assistant", "4."),
        Message("user", "And 3 + 3?"),
        Message("assistant", "6."),
    ]
    example = tokenize_chat(chat, tokenizer, max_seq_len=512, train_on_input=False)
    sample = split_at_answer(example, max_seq_len=512)
    first_turn = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 + 2? [/INST]"
    assert sample.prompt == [BOS, *tokenizer.encode(first_turn)]
    assert tokenizer.decode(sample.reference) == "4. "  # the answer as trained: " 4. " + EOS
    assert sample.reference[-1] == EOS


def test_an_answer_gets_the_room_training_gave_it_at_most_max_new_tokens() -> None:
    M = IGNORE_INDEX
    short = split_at_answer(Example([BOS, 10, 20, EOS], [M, M, 20, EOS]), max_seq_len=40)
    assert short.max_new_tokens == 40 - 2
    long = split_at_answer(Example([BOS, 10, 20, EOS], [M, M, 20, EOS]), max_seq_len=4096)
    assert long.max_new_tokens == MAX_NEW_TOKENS


# --------------------------------------------------------------------------------------------
# Samples in a run
# --------------------------------------------------------------------------------------------


def test_samples_are_the_first_validation_prompts_at_every_evaluation_and_the_end(
    small_checkpoint: Path,
    data_files: tuple[Path, Path],
    tmp_path: Path,
    tokenizer: Tokenizer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train, val = data_files
    overrides = (f"dataset.val_path={val}", "eval_every_n_steps=2", "max_steps=5")
    full.run(run_params(small_checkpoint, train, tmp_path, *overrides, "sample_prompts=2"))

    rows = samples(tmp_path)
    assert [row["step"] for row in rows] == [2, 2, 4, 4, 5, 5]
    records = sample_rows(12, 14)  # the first two of the validation file, every time
    for row, record in zip(rows, records * 3, strict=True):
        assert row["prompt"] == alpaca_prompt(record["instruction"], record["input"])
        # The answer as training saw it: cut at max_seq_len.
        trained = tokenize_alpaca(record, tokenizer, max_seq_len=96, train_on_input=False)
        n_prompt = len(tokenizer.encode(row["prompt"])) + 1
        assert row["reference"] == tokenizer.decode(trained.tokens[n_prompt:])
        assert record["output"].startswith(row["reference"]) and row["reference"]
    # The last answers are the trained model's greedy answers, as generated from model/.
    model = load_hf(SMALL_MODEL, tmp_path / "model", torch.device("cpu"), torch.float32)
    for row, record in zip(rows[-2:], records, strict=True):
        prompt = [BOS, *tokenizer.encode(alpaca_prompt(record["instruction"], record["input"]))]
        answer = list(generate(model, prompt, max_new_tokens=96 - len(prompt), eos_id=EOS))
        assert row["answer"] == tokenizer.decode(answer)
    assert rows[0]["answer"] != rows[-2]["answer"]  # the answers change as the model trains
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample")]
    assert len(lines) == 6
    assert lines[-1] == (
        "sample 2/2 step 5: prompt "
        + json.dumps("…" + rows[-1]["prompt"][-160:], ensure_ascii=False)
        + " -> answer "
        + json.dumps(rows[-1]["answer"], ensure_ascii=False)
    )
    assert lines[-1].startswith('sample 2/2 step 5: prompt "…hat appropriately completes')


def test_without_validation_data_the_first_training_prompts_are_sampled_at_the_end(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    full.run(
        run_params(small_checkpoint, data_files[0], tmp_path, "max_steps=2", "sample_prompts=2")
    )
    rows = samples(tmp_path)
    assert [row["step"] for row in rows] == [2, 2]
    expected = [alpaca_prompt(r["instruction"], r["input"]) for r in sample_rows(0, 2)]
    assert [row["prompt"] for row in rows] == expected


def test_sampling_leaves_training_exactly_as_without_it(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """LoRA dropout draws from the global RNG and is on in train mode only: a sample that drew
    from it, or left the model in eval mode, would change every later loss."""
    rows = {}
    for n in (0, 2):
        out = tmp_path / str(n)
        params = run_params(
            small_checkpoint,
            data_files[0],
            out,
            f"dataset.val_path={data_files[1]}",
            "eval_every_n_steps=1",
            "max_steps=4",
            "lora.dropout=0.2",
            f"sample_prompts={n}",
            recipe="lora",
        )
        lora.run(params)
        rows[n] = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in metrics_rows(out)]
    assert [r["step"] for r in samples(tmp_path / "2")] == [1, 1, 2, 2, 3, 3, 4, 4]
    for row in rows[0] + rows[2]:
        row.pop("tokens_per_s", None)
    assert rows[2] == rows[0]  # training and validation losses, grad norms, learning rates


def test_a_resumed_run_continues_the_samples_without_repeating_a_step(
    small_checkpoint: Path,
    data_files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = (
        f"dataset.val_path={data_files[1]}",
        "eval_every_n_steps=2",
        "save_every_n_steps=2",
        "max_steps=4",
        "sample_prompts=1",
    )
    full.run(run_params(small_checkpoint, data_files[0], straight, *overrides))
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)  # dies as step 4 begins: step 2 is the last checkpoint
        with pytest.raises(KeyboardInterrupt):
            full.run(run_params(small_checkpoint, data_files[0], resumed, *overrides))
    assert [row["step"] for row in samples(resumed)] == [2]

    full.run(run_params(small_checkpoint, data_files[0], resumed, *overrides, "resume=true"))
    assert samples(resumed) == samples(straight)
    # Resumed from its last step, a finished run has nothing to redo: no samples twice.
    full.run(run_params(small_checkpoint, data_files[0], resumed, *overrides, "resume=true"))
    assert samples(resumed) == samples(straight)


def test_a_new_run_in_an_old_runs_directory_starts_samples_afresh(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "samples.jsonl").write_text('{"step": 1, "answer": "an earlier run\'s"}\n')
    full.run(run_params(small_checkpoint, data_files[0], tmp_path, "max_steps=1"))
    assert (tmp_path / "samples.jsonl").read_text() == ""


# --------------------------------------------------------------------------------------------
# A sharded run
# --------------------------------------------------------------------------------------------


def greedy_answers(model_dir: Path, rows: list[dict], tokenizer: Tokenizer, bf16: bool) -> list:
    """One process's greedy answers to the prompts of `rows`, from the saved model."""
    model = load_hf(SMALL_MODEL, model_dir, torch.device("cpu"), torch.float32)
    answers = []
    for row in rows:
        prompt = [BOS, *tokenizer.encode(row["prompt"])]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            answer = generate(model, prompt, max_new_tokens=128 - len(prompt), eos_id=EOS)
            answers.append(tokenizer.decode(list(answer)))
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_sharded_run_samples_on_every_process_and_writes_once(
    small_checkpoint: Path, tmp_path: Path, tokenizer: Tokenizer, dtype: str
) -> None:
    """At the end, after a backward pass, the root's weights are resharded: their fp32 shard
    must not set the KV cache's dtype in a bf16 run (see samples.gathered_root)."""
    out = tmp_path / "run"
    overrides = ("max_steps=2", "lr=1e-4", "sample_prompts=2", f"dtype={dtype}")
    result = run_on_two(small_checkpoint, tmp_path, *overrides, f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr

    rows = samples(out)
    assert [row["step"] for row in rows] == [2, 2]  # rank 0's rows only
    assert len([line for line in result.stdout.splitlines() if "sample " in line]) == 2
    expected = greedy_answers(out / "model", rows, tokenizer, bf16=dtype == "bf16")
    if dtype == "fp32":
        assert [row["answer"] for row in rows] == expected
    else:
        # bf16 rounds differently when sharded (the weights are cast, not autocast), which may
        # change a near tie after a while; a cache left empty changes the second token.
        for row, answer in zip(rows, expected, strict=True):
            pairs = zip(row["answer"], answer, strict=False)
            first_difference = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            assert first_difference is None or first_difference >= 40


# --------------------------------------------------------------------------------------------
# QLoRA
# --------------------------------------------------------------------------------------------


@needs_torchao
def test_a_qlora_run_samples_as_its_merged_model_answers(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """The 4-bit base and its adapters generate through the KV cache as the merged model does."""
    checkpoint = write_checkpoint(tmp_path / "base", QLORA_MODEL)
    out = tmp_path / "run"
    overrides = ("recipe=lora", "lora.quantize_base=true", "max_steps=1", "sample_prompts=2")
    lora.run(small_params(checkpoint, out, *model_overrides(QLORA_MODEL), *overrides))

    rows = samples(out)
    assert [row["step"] for row in rows] == [1, 1]
    model = load_hf(QLORA_MODEL, out / "model", torch.device("cpu"), torch.float32)
    for row in rows:
        prompt = [BOS, *tokenizer.encode(row["prompt"])]
        answer = generate(model, prompt, max_new_tokens=128 - len(prompt), eos_id=EOS)
        assert row["answer"] == tokenizer.decode(list(answer))
