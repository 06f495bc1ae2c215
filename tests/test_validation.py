"""Validation during training: held-out data, val_loss rows, the recipe's return value, stopping."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from finetune.checkpoint import load_hf
from finetune.config import FullFinetuneParams
from finetune.data import Example, load_dataset, split_examples
from finetune.errors import ConfigError
from finetune.recipes import full, lora
from finetune.tokenizer import Tokenizer
from finetune.training import evaluate
from tests.conftest import SAMPLE_DATA, SMALL_MODEL, metrics_rows, small_params, write_jsonl

TRAINING_ROW_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
VAL_ROW_KEYS = {"step", "epoch", "val_loss", "val_perplexity", "elapsed_s"}


def sample_rows(start: int, stop: int) -> list[dict]:
    return [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[start:stop]]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training file of 16 records, validation file of 6 others): small, so runs stay fast."""
    directory = tmp_path_factory.mktemp("data")
    return (
        write_jsonl(directory / "train.jsonl", sample_rows(0, 16)),
        write_jsonl(directory / "val.jsonl", sample_rows(16, 22)),
    )


def params_on(
    data: Path, checkpoint: Path, out: Path, *overrides: str, recipe: str = "full"
) -> FullFinetuneParams:
    return small_params(
        checkpoint,
        out,
        f"recipe={recipe}",
        f"dataset.path={data}",
        "max_seq_len=96",
        "lr=1e-3",
        *overrides,
    )


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a run's metrics.jsonl."""
    rows = metrics_rows(out)
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def test_val_rows_are_logged_every_n_steps_and_at_the_end(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    params = params_on(
        data_files[0],
        small_checkpoint,
        tmp_path,
        "dataset.val_split=0.25",
        "eval_every_n_steps=2",
        "max_steps=5",
    )
    returned = full.run(params)
    train_rows, val_rows = metrics(tmp_path)
    assert [r["step"] for r in val_rows] == [2, 4, 5]
    assert all(set(r) == VAL_ROW_KEYS for r in val_rows)
    assert all(set(r) == TRAINING_ROW_KEYS for r in train_rows)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5]
    for row in val_rows:
        assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]))
    assert returned == val_rows[-1]["val_loss"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_shows_eval_lines(
    small_checkpoint: Path,
    data_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    params = params_on(
        data_files[0],
        small_checkpoint,
        tmp_path,
        f"dataset.val_path={data_files[1]}",
        "max_steps=2",
    )
    full.run(params)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")]
    assert len(lines) == 1 and lines[0].startswith("eval step 2/2 val_loss ")
    assert " val_ppl " in lines[0]


def test_lora_recipe_returns_the_final_val_loss_of_a_val_file(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    params = params_on(
        data_files[0],
        small_checkpoint,
        tmp_path,
        f"dataset.val_path={data_files[1]}",
        "max_steps=3",
        recipe="lora",
    )
    returned = lora.run(params)
    train_rows, val_rows = metrics(tmp_path)
    assert [r["step"] for r in val_rows] == [3]  # eval_every_n_steps=0: only at the end
    assert returned == val_rows[-1]["val_loss"]
    assert returned != train_rows[-1]["loss"]
    assert (tmp_path / "loss.png").is_file()


def test_without_validation_data_the_recipe_returns_the_training_loss(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    returned = full.run(params_on(data_files[0], small_checkpoint, tmp_path, "max_steps=2"))
    train_rows, val_rows = metrics(tmp_path)
    assert val_rows == [] and returned == train_rows[-1]["loss"]


def test_evaluating_does_not_change_training(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """LoRA dropout draws from the global RNG: evaluation must leave it and the weights alone."""
    losses = []
    for every in (1, 0):
        out = tmp_path / str(every)
        params = params_on(
            data_files[0],
            small_checkpoint,
            out,
            "dataset.val_split=0.25",
            f"eval_every_n_steps={every}",
            "max_steps=4",
            "lora.dropout=0.2",
            recipe="lora",
        )
        lora.run(params)
        losses.append([r["loss"] for r in metrics(out)[0]])
    assert losses[0] == losses[1]


def test_evaluate_restores_train_mode_and_is_a_token_weighted_mean(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path, tokenizer: Tokenizer
) -> None:
    params = params_on(data_files[1], small_checkpoint, tmp_path)
    examples = load_dataset(params.dataset, tokenizer, params.max_seq_len)
    model = load_hf(SMALL_MODEL, small_checkpoint, torch.device("cpu"), torch.float32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    by_twos = evaluate(model, examples, params, tokenizer.pad_id)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # The mean over all tokens, not over batches: the batch size does not change it.
    by_fives = evaluate(
        model, examples, dataclasses.replace(params, batch_size=5), tokenizer.pad_id
    )
    assert by_twos == pytest.approx(by_fives, rel=1e-5)


def test_val_split_is_seeded_disjoint_and_keeps_file_order() -> None:
    examples = [Example([i, i + 1], [i, i + 1]) for i in range(40)]
    train, val = split_examples(examples, 0.25, seed=3)
    assert (len(train), len(val)) == (30, 10)
    assert split_examples(examples, 0.25, seed=3) == (train, val)
    assert split_examples(examples, 0.25, seed=4)[1] != val
    ids = [e.tokens[0] for e in train], [e.tokens[0] for e in val]
    assert not set(ids[0]) & set(ids[1]) and set(ids[0]) | set(ids[1]) == set(range(40))
    assert ids[0] == sorted(ids[0]) and ids[1] == sorted(ids[1])


def test_val_split_holds_out_at_least_one_and_leaves_at_least_one() -> None:
    examples = [Example([i, i], [i, i]) for i in range(3)]
    assert len(split_examples(examples, 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError) as error:
        split_examples(examples[:1], 0.5, seed=0)
    assert error.value.key == "dataset.val_split"


def test_early_stopping_stops_when_val_loss_stops_improving(
    small_checkpoint: Path,
    data_files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    val_losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])
    monkeypatch.setattr(
        "finetune.training.evaluate_with_metrics", lambda *args: (next(val_losses), {})
    )
    params = params_on(
        data_files[0],
        small_checkpoint,
        tmp_path,
        "dataset.val_split=0.25",
        "eval_every_n_steps=1",
        "early_stopping_patience=2",
        "max_steps=6",
    )
    returned = full.run(params)
    train_rows, val_rows = metrics(tmp_path)
    assert [r["val_loss"] for r in val_rows] == [3.0, 2.0, 2.5, 2.1]
    assert train_rows[-1]["step"] == 4 and returned == 2.1
    assert "early stopping at step 4/5" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["dataset.val_split=0.1", "dataset.val_path={val}"], "dataset.val_split"),
        (["dataset.val_split=1.0"], "dataset.val_split"),
        (["dataset.val_split=-0.1"], "dataset.val_split"),
        (["dataset.val_path={val}.missing"], "dataset.val_path"),
        (["dataset.val_path={val}.csv", "dataset.format=chat"], "dataset.val_path"),
        (["early_stopping_patience=2"], "early_stopping_patience"),
        (["early_stopping_patience=-1", "dataset.val_split=0.1"], "early_stopping_patience"),
        (["eval_every_n_steps=-1"], "eval_every_n_steps"),
        (["eval_every_n_steps=2"], "eval_every_n_steps"),
    ],
)
def test_invalid_validation_settings_are_rejected_by_name(
    small_checkpoint: Path,
    data_files: tuple[Path, Path],
    tmp_path: Path,
    overrides: list[str],
    key: str,
) -> None:
    filled = [o.format(val=data_files[1]) for o in overrides]
    with pytest.raises(ConfigError) as error:
        params_on(data_files[0], small_checkpoint, tmp_path, *filled)
    assert error.value.key == key


def test_val_path_must_be_a_data_file(
    small_checkpoint: Path, data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    wrong = tmp_path / "val.txt"
    wrong.write_text("not data\n")
    with pytest.raises(ConfigError, match=r"dataset\.val_path: expected a \.json"):
        params_on(data_files[0], small_checkpoint, tmp_path, f"dataset.val_path={wrong}")
