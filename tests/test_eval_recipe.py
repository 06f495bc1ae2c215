"""recipe=eval: the loss of a checkpoint (or a base with an adapter) on a dataset, computed as
training's validation loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune.config import EvalParams
from finetune.recipes import eval as eval_recipe
from finetune.recipes import full, lora
from tests.conftest import ONE_THREAD, SAMPLE_DATA, metrics_rows, run_cli, small_params

TRAINING = ("max_steps=2", "lr=1e-2", "warmup_steps=0")


def sample_rows(path: Path, start: int, stop: int) -> Path:
    """Rows start..stop of the shipped sample data, written to `path`."""
    path.write_text("".join(SAMPLE_DATA.read_text().splitlines(keepends=True)[start:stop]))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return sample_rows(tmp_path / "data.jsonl", 42, 82)  # prompts that fit in 128 tokens


def final_val_loss(run_dir: Path) -> float:
    return [row["val_loss"] for row in metrics_rows(run_dir) if "val_loss" in row][-1]


@pytest.mark.parametrize("split", ["dataset.val_split=0.25", "dataset.val_path=VAL"])
def test_eval_of_a_trained_model_equals_its_runs_final_val_loss(
    split: str, data: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    split = split.replace("VAL", str(sample_rows(tmp_path / "val.jsonl", 103, 115)))
    run_dir = tmp_path / "run"
    final = full.run(
        small_params(small_checkpoint, run_dir, *TRAINING, f"dataset.path={data}", split)
    )
    assert final == final_val_loss(run_dir)

    out = tmp_path / "eval"
    params = small_params(run_dir / "model", out, "recipe=eval", f"dataset.path={data}", split)
    assert isinstance(params, EvalParams)
    loss = eval_recipe.run(params)

    assert loss == pytest.approx(final, abs=1e-5)
    written = json.loads((out / "eval.json").read_text())
    assert written["loss"] == loss
    assert written["perplexity"] == pytest.approx(math.exp(loss))
    n_val = 12 if "val_path" in split else 10  # a quarter of 40
    assert written["examples"] == n_val
    assert written["tokens"] > n_val


def test_eval_of_base_with_adapter_equals_the_lora_runs_final_val_loss(
    data: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    split = ("dataset.val_split=0.25", f"dataset.path={data}")
    final = lora.run(
        small_params(
            small_checkpoint, run_dir, "recipe=lora", *TRAINING, *split, "save_merged=false"
        )
    )
    out = tmp_path / "eval"
    params = small_params(
        small_checkpoint,
        out,
        "recipe=eval",
        f"adapter={run_dir / 'adapter'}",
        *split,
    )
    assert eval_recipe.run(params) == pytest.approx(final, abs=1e-5)
    # Without the adapter the loss is the untrained base's: the adapter did change it.
    base = small_params(small_checkpoint, tmp_path / "base", "recipe=eval", *split)
    assert abs(eval_recipe.run(base) - final) > 1e-3  # 100 times the tolerance above


def test_eval_without_validation_data_reads_the_whole_file_and_prints_the_loss(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    data = sample_rows(tmp_path / "five.jsonl", 0, 5)
    result = run_cli(
        "recipe=eval",
        "dataset=alpaca",
        "model=auto",
        f"checkpoint={small_checkpoint}",
        f"dataset.path={data}",
        "max_seq_len=128",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert written["examples"] == 5
    assert written["data"] == str(data)
    assert f"loss {written['loss']:.4f} perplexity" in result.stdout
