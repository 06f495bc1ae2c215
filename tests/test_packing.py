"""Packing (`dataset.packed=true`): each sequence of a packed row trains as it would alone (the
same loss and gradients, no attention or target across sequences), the rows are packed greedily
and deterministically, and a packed run trains, validates and resumes as an unpacked one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finetune import training
from finetune.config import FullFinetuneParams, LoraConfig
from finetune.data import IGNORE_INDEX, Example, collate
from finetune.lora import apply_lora, lora_modules
from finetune.model import Llama
from finetune.packing import PackedRow, pack, packed_rows, packing_order
from finetune.recipes import full
from tests.conftest import (
    SMALL_MODEL,
    logged_losses,
    max_abs_diff,
    small_model,
    small_params,
    write_jsonl,
)
from tests.test_distributed import (
    MODEL,
    assert_same_losses,
    assert_same_tensors,
    one_process,
    two_processes,
)
from tests.test_qlora import lora_config, needs_torchao, qlora_model
from tests.test_resume import RECIPES as RESUME_RECIPES
from tests.test_resume import interrupt_at_step, steps_on_disk

PAD_ID = 0


def example(length: int, seed: int, n_prompt: int = 3) -> Example:
    """Random tokens starting with BOS, the first `n_prompt` unlabelled, as a prompt is."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [1, *torch.randint(3, SMALL_MODEL.vocab_size, (length - 1,), generator=generator)]
    tokens = [int(t) for t in tokens]
    return Example(tokens, [IGNORE_INDEX] * n_prompt + tokens[n_prompt:])


def three_sequences() -> list[Example]:
    return [example(9, seed=1), example(14, seed=2, n_prompt=5), example(6, seed=3)]


def losses_alone(model: Llama, examples: list[Example]) -> list[torch.Tensor]:
    """Each example's mean loss per labelled token, run unpacked, one at a time."""
    losses = []
    for e in examples:
        batch = collate([e], PAD_ID)
        assert batch.positions is None
        losses.append(model(batch.inputs, batch.targets) / batch.n_targets)
    return losses


def losses_in_row(model: Llama, row: PackedRow) -> list[torch.Tensor]:
    """Each sequence's mean loss per labelled token, from the logits of its part of the row."""
    batch = collate([row], PAD_ID)
    logits = model(batch.inputs, positions=batch.positions)[0]
    losses, start = [], 0
    for length in row.lengths:
        end = start + length - 1  # a sequence of n tokens has n - 1 inputs
        losses.append(F.cross_entropy(logits[start:end], batch.targets[0, start:end]))
        start = end
    return losses


def lora_model() -> Llama:
    """The small model with adapters on every projection, their B non-zero so that they count."""
    model = small_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "o_proj"]))
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    return model


def nf4_qlora_model() -> Llama:
    return qlora_model(lora_config())


@pytest.mark.parametrize(
    "build",
    [small_model, lora_model, pytest.param(nf4_qlora_model, marks=needs_torchao)],
    ids=["full", "lora", "qlora"],
)
def test_each_packed_sequence_has_its_unpacked_loss_and_gradients(build: object) -> None:
    model = build()  # type: ignore[operator]
    examples = three_sequences()
    row = pack(examples, max_seq_len=64, order=[0, 1, 2])
    assert len(row) == 1

    alone = losses_alone(model, examples)
    in_row = losses_in_row(model, row[0])
    for a, b in zip(alone, in_row, strict=True):
        assert abs(float(a.detach()) - float(b.detach())) <= 1e-5

    # The training path: the row's loss over all its labelled tokens, and its gradients, are
    # those of the sequences' losses weighted by their labelled tokens.
    n_targets = [collate([e], PAD_ID).n_targets for e in examples]
    unpacked = sum(loss * n for loss, n in zip(alone, n_targets, strict=True)) / sum(n_targets)
    unpacked.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    batch = collate(row, PAD_ID)
    assert batch.n_targets == sum(n_targets)
    packed = model(batch.inputs, batch.targets, positions=batch.positions) / batch.n_targets
    assert abs(float(packed.detach()) - float(unpacked.detach())) <= 1e-5
    packed.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert max_abs_diff(p.grad, expected[name]) <= 1e-5, name


def test_positions_restart_and_no_target_crosses_sequences() -> None:
    a, b = Example([1, 10, 11, 2], [IGNORE_INDEX, 10, 11, 2]), Example([1, 20, 2], [1, 20, 2])
    row = pack([a, b], max_seq_len=8, order=[0, 1])[0]
    assert row.lengths == [4, 3]

    batch = collate([row, a], PAD_ID, pad_to_multiple_of=4)
    # Row 0: a's 3 inputs, b's 2, then padding to 8 positioned as a sequence of its own.
    assert batch.inputs.tolist() == [[1, 10, 11, 1, 20, 0, 0, 0], [1, 10, 11, 0, 0, 0, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    # a's EOS (2) is not an input: nothing predicts b's BOS from it; b's BOS label is no target.
    assert batch.targets[0].tolist() == [10, 11, 2, 20, 2, *[IGNORE_INDEX] * 3]
    assert batch.n_tokens == 5 + 3
    # Rows of one sequence each need no positions, however they were made.
    assert collate([a, b], PAD_ID).positions is None


def test_a_sequence_sees_nothing_of_the_others_in_its_row() -> None:
    model = small_model()
    examples = three_sequences()
    changed = [examples[0], example(14, seed=99, n_prompt=5), examples[2]]
    logits = []
    for sequences in (examples, changed):
        batch = collate(pack(sequences, max_seq_len=64, order=[0, 1, 2]), PAD_ID)
        with torch.no_grad():
            logits.append(model(batch.inputs, positions=batch.positions)[0])
    first, middle, last = slice(0, 8), slice(8, 21), slice(21, 26)
    # Before and after the changed middle sequence, the logits are those of the same inputs.
    assert max_abs_diff(logits[0][first], logits[1][first]) <= 1e-6
    assert max_abs_diff(logits[0][last], logits[1][last]) <= 1e-6
    assert max_abs_diff(logits[0][middle], logits[1][middle]) > 1e-2


def test_packing_is_greedy_in_a_seeded_order_and_keeps_every_example() -> None:
    examples = [Example([1] * n, [1] * n) for n in (6, 5, 3, 4, 2, 8)]
    rows = pack(examples, max_seq_len=9, order=[0, 1, 2, 3, 4, 5])
    # 3 goes after 6 (room 3), not after 5 (room 4), which then takes 4; 2 fits nowhere left.
    assert [r.lengths for r in rows] == [[6, 3], [5, 4], [2], [8]]
    assert all(len(r.tokens) == len(r.labels) <= 9 for r in rows)
    assert [r.lengths for r in pack(examples, 9, order=[5, 4, 3, 2, 1, 0])] == [
        [8],
        [2, 4, 3],
        [5],
        [6],
    ]

    assert packing_order(6, shuffle=False, seed=3) == [0, 1, 2, 3, 4, 5]
    shuffled = packing_order(6, shuffle=True, seed=3)
    assert sorted(shuffled) == list(range(6)) and shuffled != list(range(6))
    assert packing_order(6, shuffle=True, seed=3) == shuffled
    assert packing_order(6, shuffle=True, seed=4) != shuffled
    rows = packed_rows(examples, 9, shuffle=True, seed=3)
    assert sorted(n for r in rows for n in r.lengths) == [2, 3, 4, 5, 6, 8]
    assert rows[0].tokens == [1] * sum(rows[0].lengths)


def test_the_token_weighted_loss_is_the_same_packed_or_not(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    # Validation never packs; were it packed, it would report the same number.
    model = small_model()
    examples = [example(n, seed=n) for n in (9, 14, 6, 20, 11, 7, 30)]
    params = small_params(small_checkpoint, tmp_path, "batch_size=2")
    unpacked = training.evaluate(model, examples, params, PAD_ID)
    packed = training.evaluate(model, packed_rows(examples, 40, True, 0), params, PAD_ID)
    assert abs(packed - unpacked) <= 1e-5


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 Alpaca records of 58-107 tokens: two to four to a row of 256."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "cats",
        "watch",
    ]
    rows = []
    for i in range(40):
        n_words = 3 + (i * 7) % 25
        output = " ".join(words[(i + j) % len(words)] for j in range(n_words))
        rows.append({"instruction": f"Say {i}.", "input": "", "output": output})
    return write_jsonl(tmp_path_factory.mktemp("data") / "short.jsonl", rows)


PACKED_RUN = (
    "dataset.packed=true",
    "shuffle=true",
    "epochs=2",
    "max_steps=6",
    "save_every_n_steps=3",
    "gradient_accumulation_steps=2",
    "lr=1e-3",
    "model=auto",
    "max_seq_len=256",
)


# The recipes of test_resume (LoRA with dropout, so that the RNG's state after a resume counts).
@pytest.mark.parametrize("recipe", list(RESUME_RECIPES))
def test_a_packed_run_trains_on_rows_and_resumes_bit_for_bit(
    recipe: str,
    small_checkpoint: Path,
    short_records: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, overrides, weights_file = RESUME_RECIPES[recipe]

    def params(out: Path, *more: str) -> FullFinetuneParams:
        data = f"dataset.path={short_records}"
        return small_params(small_checkpoint, out, data, *PACKED_RUN, *overrides, *more)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(params(straight))
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run(params(resumed))
    run(params(resumed, "resume=true"))

    assert logged_losses(resumed) == logged_losses(straight)
    assert [step for step, _ in logged_losses(straight)] == [1, 2, 3, 4, 5, 6]
    expected, actual = load_file(straight / weights_file), load_file(resumed / weights_file)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # The position is counted in rows: 40 examples make 13 to 20 rows of 256 tokens, 4 or 5
    # steps' worth, so the 6 steps cross into the second epoch.
    last = resumed / "checkpoints" / steps_on_disk(resumed)[-1]
    state = json.loads((last / "training.json").read_text())["training"]
    assert 13 <= state["n_examples"] <= 20
    assert state["epoch"] == 1
    losses = [loss for _, loss in logged_losses(straight)]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_a_packed_run_compiled_and_checkpointed_gives_the_eager_losses(
    small_checkpoint: Path, short_records: Path, tmp_path: Path
) -> None:
    # ~30 s, most of it compiling: the mask and per-row rotary angles inside compiled,
    # checkpointed blocks.
    def losses(out: Path, *overrides: str) -> list[float]:
        params = small_params(
            small_checkpoint,
            out,
            f"dataset.path={short_records}",
            *PACKED_RUN,
            "max_steps=3",
            "save_every_n_steps=0",
            *overrides,
        )
        full.run(params)
        return [loss for _, loss in logged_losses(out)]

    eager = losses(tmp_path / "eager")
    compiled = losses(tmp_path / "compiled", "compile=true", "activation_checkpointing=true")
    assert len(eager) == 3
    assert compiled == pytest.approx(eager, abs=1e-4)


@pytest.mark.slow
def test_a_packed_run_on_two_processes_trains_as_one(
    small_checkpoint: Path, short_records: Path, tmp_path: Path
) -> None:
    # Each process takes its own rows of every step (ranks.this_rank), as it takes examples.
    run = (f"dataset.path={short_records}", *PACKED_RUN, "save_every_n_steps=0", "max_steps=4")
    one = one_process(small_checkpoint, tmp_path / "one", *run, "lr=1e-4")
    two = two_processes(small_checkpoint, tmp_path / "two", *run, "lr=1e-4")
    assert_same_losses(two, one)
    assert_same_tensors(two / MODEL, one / MODEL)
