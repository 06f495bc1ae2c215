"""Training-state checkpoints: exact resume, retention, atomic saves, resume errors, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import training
from finetune.config import FullFinetuneParams, build_params
from finetune.errors import UserError
from finetune.recipes import full, lora
from tests.conftest import SAMPLE_DATA, SMALL_MODEL, compose_config, model_overrides

# 14 examples in micro-batches of 2, two per optimizer step: 4 steps an epoch, the last of one
# micro-batch. Step 3 stops mid-epoch; step 4 ends epoch 0, so 6 steps cross into epoch 1.
N_EXAMPLES = 14
RECIPES: dict[str, tuple[Callable[[FullFinetuneParams], float], list[str], str]] = {
    "full": (full.run, ["lr=1e-3"], "model/model.safetensors"),
    # Dropout > 0 so the RNG state decides the masks after the resume.
    "lora": (
        lora.run,
        ["recipe=lora", "lora.dropout=0.2", "save_merged=false"],
        "adapter/adapter_model.safetensors",
    ),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = SAMPLE_DATA.read_text().splitlines(keepends=True)[:N_EXAMPLES]
    path.write_text("".join(lines))
    return path


def params_for(
    recipe: str, checkpoint: Path, data: Path, out: Path, *overrides: str
) -> FullFinetuneParams:
    recipe_overrides = RECIPES[recipe][1]
    return build_params(
        compose_config(
            [
                *recipe_overrides[:1],  # recipe=... must come first to pick the schema
                *model_overrides(SMALL_MODEL),
                f"checkpoint={checkpoint}",
                f"output_dir={out}",
                f"dataset.path={data}",
                "max_seq_len=128",
                "batch_size=2",
                "gradient_accumulation_steps=2",
                "shuffle=true",
                "epochs=2",
                "max_steps=6",
                "save_every_n_steps=3",
                *recipe_overrides[1:],
                *overrides,
            ]
        )
    )


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def steps_on_disk(run_dir: Path) -> list[str]:
    return sorted(d.name for d in (run_dir / "checkpoints").iterdir())


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the run die as step `step` begins, like a killed process (its checkpoints stay)."""
    real_step = training.train_step
    calls = []

    def dying_step(*args: object, **kwargs: object) -> training.StepResult:
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", dying_step)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_three_steps_then_resume_matches_six_straight_steps_bit_for_bit(
    recipe: str,
    small_checkpoint: Path,
    small_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, _, weights_file = RECIPES[recipe]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(params_for(recipe, small_checkpoint, small_data, straight))

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run(params_for(recipe, small_checkpoint, small_data, resumed))
    assert steps_on_disk(resumed) == ["step_000003"]
    # What a kill -9 during the next save leaves behind: a partial temporary directory.
    partial = resumed / "checkpoints" / "step_000006.tmp"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    run(params_for(recipe, small_checkpoint, small_data, resumed, "resume=true"))

    assert logged_losses(resumed) == logged_losses(straight)
    assert [step for step, _ in logged_losses(resumed)] == [1, 2, 3, 4, 5, 6]
    expected, actual = load_file(straight / weights_file), load_file(resumed / weights_file)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # Epoch 0 ended at step 4; keep_last_n=2 dropped step 3; the partial save is gone.
    assert steps_on_disk(straight) == steps_on_disk(resumed) == ["step_000004", "step_000006"]


def test_resume_from_a_given_checkpoint_directory(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    full.run(params_for("full", small_checkpoint, small_data, first, "keep_last_n=0"))
    assert steps_on_disk(first) == ["step_000003", "step_000004", "step_000006"]
    checkpoint = first / "checkpoints" / "step_000003"
    full.run(params_for("full", small_checkpoint, small_data, second, f"resume={checkpoint}"))
    assert logged_losses(second) == logged_losses(first)[3:]


def test_resume_without_a_checkpoint_names_the_directory(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="no checkpoint found in") as error:
        full.run(params_for("full", small_checkpoint, small_data, tmp_path, "resume=true"))
    assert str(tmp_path / "checkpoints") in str(error.value)
    assert "hydra.run.dir" in str(error.value) and "\n" not in str(error.value)


def test_resume_from_another_recipe_is_refused_by_path(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    full_run = tmp_path / "full"
    full.run(params_for("full", small_checkpoint, small_data, full_run, "max_steps=3"))
    lora_params = params_for("lora", small_checkpoint, small_data, tmp_path, f"resume={full_run}")
    with pytest.raises(UserError, match="recipe=full, not recipe=lora") as error:
        lora.run(lora_params)
    assert str(full_run / "checkpoints" / "step_000003" / "state.pt") in str(error.value)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [
        *model_overrides(SMALL_MODEL),
        f"checkpoint={small_checkpoint}",
        f"dataset.path={small_data}",
        f"hydra.run.dir={run_dir}",
        "max_seq_len=128",
        "batch_size=2",
        "epochs=50",
        "max_steps=200",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + process.communicate(timeout=120)[0]

    assert process.returncode == 128 + signal.SIGTERM, output
    saved = steps_on_disk(run_dir)
    assert len(saved) == 1 and int(saved[0].removeprefix("step_")) < 200, output
    assert f"resume with: python -m finetune <the same overrides> hydra.run.dir={run_dir}" in output
    assert not (run_dir / "model").exists()


def poison_loss_of_step_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in the loss of step 2's first micro-batch (the 3rd loss call: two a step)."""
    real_loss = training.chunked_cross_entropy
    calls = []

    def loss(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        value = real_loss(*args)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(training, "chunked_cross_entropy", loss)


def test_a_nan_loss_stops_the_run_naming_the_step(
    small_checkpoint: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_loss_of_step_2(monkeypatch)
    with pytest.raises(UserError, match=r"^step 2: loss nan, grad_norm nan is not finite; stopped"):
        full.run(params_for("full", small_checkpoint, small_data, tmp_path))


def test_skip_nonfinite_steps_skips_the_update_and_says_so(
    small_checkpoint: Path,
    small_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    poison_loss_of_step_2(monkeypatch)
    full.run(params_for("full", small_checkpoint, small_data, tmp_path, "skip_nonfinite_steps=1"))
    assert "step 2: loss nan, grad_norm nan is not finite; skipped the update (1/1 allowed)" in (
        capsys.readouterr().out
    )
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
