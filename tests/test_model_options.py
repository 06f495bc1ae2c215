"""A model option describes a model; the shipped model's training settings come per recipe.

conf/model/*.yaml hold architecture and checkpoint only; conf/config.yaml picks
conf/tuning/<model>_<recipe>.yaml where it exists, so `recipe=lora` on the default model trains
with settings chosen for LoRA, and any other pair with its recipe's dataclass defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from finetune.config import FullFinetuneParams, LoraFinetuneParams, ModelConfig, build_params
from tests.conftest import CONF_DIR, compose_config

ARCHITECTURE_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def model_option_files() -> list[Path]:
    return sorted((CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", model_option_files(), ids=lambda path: path.stem)
def test_a_model_option_sets_architecture_and_checkpoint_only(path: Path) -> None:
    text = path.read_text()
    values = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "defaults"}
    if text.startswith("# @package _global_"):
        assert set(values) <= {"model", "checkpoint"}, path.name
        values = values.get("model", {})
    assert set(values) <= ARCHITECTURE_KEYS, path.name


def params(out: Path, *overrides: str) -> FullFinetuneParams:
    return build_params(compose_config([*overrides, f"output_dir={out}"]))


def training_settings(p: FullFinetuneParams) -> tuple[float, int, int]:
    return p.lr, p.batch_size, p.warmup_steps


def test_each_recipe_on_the_default_model_gets_its_own_tuning(tmp_path: Path) -> None:
    assert training_settings(params(tmp_path)) == (1e-3, 8, 20)
    lora = params(tmp_path, "recipe=lora")
    assert isinstance(lora, LoraFinetuneParams)
    assert training_settings(lora) == (3e-3, 8, 20) and lora.lora.rank == 8


def dataclass_default(schema: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(schema) if f.name == name)


@pytest.mark.parametrize("schema", [FullFinetuneParams, LoraFinetuneParams])
def test_a_model_without_tuning_gets_its_recipes_dataclass_defaults(schema: type) -> None:
    recipe = "full" if schema is FullFinetuneParams else "lora"
    # Composed, not built: llama2's checkpoint is not at hand.
    cfg = compose_config([f"recipe={recipe}", "model=llama2"])
    for name in ("lr", "batch_size", "warmup_steps"):
        assert cfg[name] == dataclass_default(schema, name), name
    assert cfg.lr != compose_config([f"recipe={recipe}"]).lr  # the tiny model's tuning is left out


def test_the_command_line_and_an_experiment_win_over_the_tuning(tmp_path: Path) -> None:
    assert params(tmp_path, "recipe=lora", "lr=1e-2").lr == 1e-2
    cfg = compose_config(["experiment=alpaca_lora_7b", f"output_dir={tmp_path}"])
    assert (cfg.lr, cfg.batch_size, cfg.warmup_steps) == (2e-4, 2, 0)
