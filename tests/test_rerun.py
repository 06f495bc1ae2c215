"""Running a past run again from the config it saved, and showing the resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config import FullFinetuneParams, LoraFinetuneParams, build_params
from tests.conftest import (
    SAMPLE_DATA,
    SMALL_MODEL,
    compose_config,
    logged_losses,
    model_overrides,
    run_cli,
)


def rerun(run_dir: Path, new_dir: Path) -> list[str]:
    """The arguments that run `run_dir`'s saved config again in `new_dir`."""
    return [
        "--config-path",
        f"{run_dir}/.hydra",
        "--config-name",
        "config",
        f"hydra.run.dir={new_dir}",
    ]


@pytest.mark.parametrize("recipe", ["full", "lora"])
def test_a_rerun_from_the_saved_config_repeats_the_losses_bit_for_bit(
    recipe: str, small_checkpoint: Path, tmp_path: Path
) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    args = [
        f"recipe={recipe}",
        *model_overrides(SMALL_MODEL),
        f"checkpoint={small_checkpoint}",
        f"dataset.path={SAMPLE_DATA}",
        "max_seq_len=128",
        "batch_size=2",
        "max_steps=3",
        "lora.dropout=0.2" if recipe == "lora" else "lr=1e-3",
        f"hydra.run.dir={first}",
    ]
    assert run_cli(*args, cwd=tmp_path).returncode == 0

    result = run_cli(*rerun(first, again), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert logged_losses(again) == logged_losses(first)
    assert [step for step, _ in logged_losses(again)] == [1, 2, 3]
    # The same recipe and values; only the run directory differs.
    saved, rerun_params = (OmegaConf.load(d / "params.yaml") for d in (first, again))
    assert saved.pop("output_dir") == str(first) and rerun_params.pop("output_dir") == str(again)
    assert saved == rerun_params
    assert ("lora" in rerun_params) == (recipe == "lora")


def test_a_rerun_takes_overrides(small_checkpoint: Path, tmp_path: Path) -> None:
    first, longer = tmp_path / "first", tmp_path / "longer"
    args = [*model_overrides(SMALL_MODEL), f"checkpoint={small_checkpoint}", "max_seq_len=128"]
    assert run_cli(*args, "max_steps=1", f"hydra.run.dir={first}", cwd=tmp_path).returncode == 0
    result = run_cli(*rerun(first, longer), "max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [step for step, _ in logged_losses(longer)] == [1, 2]


@pytest.mark.parametrize(
    ("recipe", "params"), [("full", FullFinetuneParams), ("lora", LoraFinetuneParams)]
)
def test_a_saved_config_builds_its_recipes_dataclass(
    recipe: str, params: type, small_checkpoint: Path, tmp_path: Path
) -> None:
    # What Hydra writes to .hydra/config.yaml: the composed values, without their schema.
    composed = compose_config([f"recipe={recipe}", f"output_dir={tmp_path}"])
    saved = OmegaConf.create(OmegaConf.to_yaml(composed))
    assert OmegaConf.get_type(saved) is dict
    built = build_params(saved)
    assert type(built) is params
    assert built == build_params(composed)


def test_cfg_job_resolve_shows_the_run_directory(tmp_path: Path) -> None:
    result = run_cli("--cfg", "job", "--resolve", "hydra.run.dir=runs/here", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert OmegaConf.create(result.stdout).output_dir == "runs/here"


def test_rerun_option_repeats_a_run_given_by_a_relative_directory(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    args = [*model_overrides(SMALL_MODEL), f"checkpoint={small_checkpoint}", "max_seq_len=128"]
    first = run_cli(*args, "max_steps=2", "hydra.run.dir=runs/first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    result = run_cli("rerun=runs/first", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # finetune's own Hydra settings apply: a new timestamped directory with finetune.log.
    (again,) = (tmp_path / "outputs").glob("*/*")
    assert (again / "finetune.log").is_file()
    assert logged_losses(again) == logged_losses(tmp_path / "runs" / "first")


def test_rerun_of_a_directory_without_a_saved_config_is_one_line(tmp_path: Path) -> None:
    result = run_cli("rerun=nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "error: rerun: nowhere holds no .hydra/config.yaml; expected the directory of a run\n"
    )
