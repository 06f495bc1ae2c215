"""Every option of every config group in conf/ composes, builds its params and trains 2 steps.

Options are discovered from the files at any depth (conf/hydra/launcher/parallel.yaml is the
option `hydra/launcher=parallel`), so a new YAML file is tested without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from finetune.config import (
    ASSETS_DIR,
    RECIPES,
    EvalParams,
    FullFinetuneParams,
    GenerateParams,
    ModelConfig,
    build_params,
    recipe_of,
)
from finetune.errors import ConfigError
from tests.conftest import (
    CONF_DIR,
    SAMPLE_DATA,
    SMALL_MODEL,
    compose_config,
    metrics_rows,
    model_overrides,
    run_cli,
)

# Launchers that hand each job to a cluster: their options compose here, but a run needs the
# cluster, and no setting of theirs runs a job on this machine.
CLUSTER_LAUNCHERS = {
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": (
        "submits each job to SLURM with sbatch, which needs a cluster; submitit's local mode is "
        "another launcher (hydra/launcher=submitit_local, run in tests/test_sweeps.py), not a "
        "setting of this one"
    ),
}


def config_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file under conf/ but the primary config.yaml, at any
    depth: the group is the file's folder relative to conf/."""
    return sorted(
        (path.parent.relative_to(CONF_DIR).as_posix(), path.stem)
        for path in CONF_DIR.rglob("*.yaml")
        if path.parent != CONF_DIR
    )


def hydra_options() -> list[tuple[str, str]]:
    """The options of Hydra's own groups (conf/hydra/...): they act only in the CLI's runs."""
    return [(group, option) for group, option in config_options() if group.startswith("hydra/")]


OPTION_IDS = [f"{group}={option}" for group, option in config_options()]


def runnable_overrides(group: str, option: str, small_checkpoint: Path, out: Path) -> list[str]:
    """Overrides that make `group=option` train on this machine in a few seconds.

    An option whose model differs from the shipped tiny one keeps its name but has its
    architecture shrunk onto a small random checkpoint; its real size is checked separately.
    """
    overrides = [f"{group}={option}", *recipe_made_for(group, option), f"output_dir={out}"]
    cfg = compose_config(overrides)
    tiny = compose_config([])
    if cfg.model != tiny.model:
        overrides += [*model_overrides(SMALL_MODEL), f"checkpoint={small_checkpoint}"]
    if OmegaConf.select(cfg, "dataset.path") == "":
        data = PREFERENCE_DATA if recipe_name(cfg) == "dpo" else SAMPLE_DATA
        overrides.append(f"dataset.path={data}")
    return [*overrides, *SHORT_RUNS.get(recipe_name(cfg), SHORT_TRAINING)]


def recipe_made_for(group: str, option: str) -> list[str]:
    """The recipe an option goes with where the default (full) cannot take it: preference data
    with recipe=dpo, conf/tuning/<model>_<recipe>.yaml with its recipe."""
    text = (CONF_DIR / group / f"{option}.yaml").read_text()
    if group == "dataset" and "/schema/dataset/preference" in text:
        return ["recipe=dpo"]
    if group == "tuning" and option.rsplit("_", 1)[-1] in RECIPES:
        return [f"recipe={option.rsplit('_', 1)[-1]}"]
    return []


PREFERENCE_DATA = ASSETS_DIR / "preference_sample.jsonl"
SHORT_TRAINING = ["max_steps=2", "batch_size=2", "max_seq_len=128"]
# Recipes that do not train: a few tokens; an evaluation of 1 % of the examples (at most 32).
SHORT_RUNS = {
    "generate": ["prompt=Name a module.", "max_new_tokens=4"],
    "eval": ["batch_size=8", "max_seq_len=128", "dataset.val_split=0.01"],
    # Two training rows, no validation row between them.
    "dpo": [*SHORT_TRAINING, "dataset.val_split=0"],
}


def recipe_name(cfg: DictConfig) -> str:
    """The recipe a composed config runs, told by its schema."""
    return next(name for name, r in RECIPES.items() if r.params is OmegaConf.get_type(cfg))


def test_every_group_has_options() -> None:
    groups = {group for group, _ in config_options()}
    assert {"recipe", "model", "dataset", "hydra/launcher"} <= groups
    assert {"full", "lora", "generate", "eval"} <= {o for g, o in config_options() if g == "recipe"}
    assert {"tiny", "llama2", "llama2_13b", "llama2_70b"} <= {
        option for group, option in config_options() if group == "model"
    }


@pytest.mark.parametrize(("group", "option"), config_options(), ids=OPTION_IDS)
def test_every_config_option_builds_its_params(
    group: str, option: str, small_checkpoint: Path, tmp_path: Path
) -> None:
    cfg = compose_config(runnable_overrides(group, option, small_checkpoint, tmp_path))
    params = build_params(cfg)
    assert type(params) in [recipe.params for recipe in RECIPES.values()]
    assert params.output_dir == str(tmp_path)
    assert Path(params.tokenizer).is_file()


@pytest.mark.parametrize(
    ("group", "option"), hydra_options(), ids=[f"{g}={o}" for g, o in hydra_options()]
)
def test_every_hydra_option_composes_into_hydra_with_its_values(group: str, option: str) -> None:
    node = OmegaConf.select(
        compose_config([f"{group}={option}"], with_hydra=True), group.replace("/", ".")
    )
    own = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    own.pop("defaults", None)
    assert own and {key: node[key] for key in own} == OmegaConf.to_container(own)
    # The class Hydra instantiates comes from an installed plugin.
    assert get_class(node._target_)


def launcher_of(group: str, option: str) -> str:
    return compose_config([f"{group}={option}"], with_hydra=True).hydra.launcher._target_


@pytest.mark.slow
@pytest.mark.parametrize(("group", "option"), config_options(), ids=OPTION_IDS)
def test_every_config_option_trains_two_steps(
    group: str, option: str, small_checkpoint: Path, tmp_path: Path
) -> None:
    if group.startswith("hydra/"):
        run_through_the_cli(group, option, small_checkpoint, tmp_path)
        return
    params = build_params(
        compose_config(runnable_overrides(group, option, small_checkpoint, tmp_path))
    )
    result = recipe_of(params).run(params)
    if isinstance(params, GenerateParams):  # the length of the answer, in tokens
        assert 1 <= result <= 4
        return
    if isinstance(params, EvalParams):
        written = json.loads((tmp_path / "eval.json").read_text())
        assert written["loss"] == result and 0 < written["examples"] <= 32
        return
    final_loss = result
    assert math.isfinite(final_loss) and final_loss > 0
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["loss"] == pytest.approx(final_loss)
    assert (tmp_path / "model" / "model.safetensors").is_file()


def run_through_the_cli(group: str, option: str, small_checkpoint: Path, tmp_path: Path) -> None:
    """A Hydra option acts only in the CLI: a sweep of one job with it trains 2 steps."""
    launcher = launcher_of(group, option)
    if launcher in CLUSTER_LAUNCHERS:
        pytest.skip(f"{group}={option} {CLUSTER_LAUNCHERS[launcher]}")
    sweep_dir = tmp_path / "sweep"
    overrides = runnable_overrides(group, option, small_checkpoint, tmp_path)
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    result = run_cli("-m", *overrides, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recorded = OmegaConf.load(sweep_dir / "0" / ".hydra" / "hydra.yaml")
    assert recorded.hydra.launcher._target_ == launcher
    rows = metrics_rows(sweep_dir / "0")
    assert [r["step"] for r in rows] == [1, 2]
    assert (sweep_dir / "0" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("option", "parameters"),
    [("llama2", 6_738_415_616), ("llama2_13b", 13_015_864_320), ("llama2_70b", 68_976_648_192)],
)
def test_llama2_configs_have_published_parameter_counts(option: str, parameters: int) -> None:
    import torch

    from finetune.model import Llama, count_parameters

    model_cfg = OmegaConf.to_object(compose_config([f"model={option}"]).model)
    with torch.device("meta"):
        assert count_parameters(Llama(model_cfg)) == parameters


def test_llama2_70b_uses_grouped_query_attention() -> None:
    model_cfg = OmegaConf.to_object(compose_config(["model=llama2_70b"]).model)
    assert (model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.head_dim) == (64, 8, 128)


def test_cli_overrides_reach_the_params(tmp_path: Path) -> None:
    params = build_params(
        compose_config(
            [
                f"output_dir={tmp_path}",
                "lr=3e-4",
                "batch_size=3",
                "dtype=bf16",
                "model.context_length=2048",
                "extend_context=true",
            ]
        )
    )
    assert isinstance(params, FullFinetuneParams)
    assert (params.lr, params.batch_size, params.dtype.value) == (3e-4, 3, "bf16")
    assert params.model.context_length == 2048
    assert params.tokenizer == str(Path(params.checkpoint) / "tokenizer.model")


def test_every_params_field_has_a_default_and_help() -> None:
    for params in [*(recipe.params for recipe in RECIPES.values()), ModelConfig]:
        for f in dataclasses.fields(params):
            assert f.default is not dataclasses.MISSING or (
                f.default_factory is not dataclasses.MISSING
            ), f.name
            assert f.metadata.get("help"), f"{params.__name__}.{f.name} has no help"


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("model.dim=100", "model.dim", "not divisible by n_heads"),
        ("model.n_kv_heads=3", "model.n_kv_heads", "does not divide n_heads"),
        ("max_seq_len=4096", "max_seq_len", "must be <= model.context_length"),
        ("warmup_steps=-1", "warmup_steps", "must be >= 0"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps", "must be >= 1"),
        ("dataset.format=sharegpt", "dataset.format", "unknown format"),
        ("seed=-1", "seed", "must be in [0, 2**32), got -1"),
        ("seed=4294967296", "seed", "must be in [0, 2**32), got 4294967296"),
        (
            "recipe=lora save_merged=false output_format=meta",
            "output_format",
            "meta needs the merged model: set save_merged=true",
        ),
    ],
)
def test_invalid_values_are_rejected_by_name(
    override: str, key: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as error:
        build_params(compose_config([f"output_dir={tmp_path}", *override.split()]))
    assert error.value.key == key
    assert message in str(error.value)
