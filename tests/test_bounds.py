"""Bounds declared with a field (`option(..., ge=1)`) are enforced, with one message each.

The bounded fields are read from the dataclasses' metadata, so a bound added to a field is
tested without touching this file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from finetune.config import LoraFinetuneParams, build_params
from finetune.errors import ConfigError
from tests.conftest import compose_config


def bounded_fields(schema: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) for every field of `schema` with a declared bound or choices."""
    found = []
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            nested := f.default_factory()
        ):
            found += bounded_fields(type(nested), f"{prefix}{f.name}.")
        elif {"ge", "gt", "lt", "choices"} & set(f.metadata):
            found.append((prefix + f.name, f))
    return found


def out_of_bounds(f: dataclasses.Field) -> list[Any]:
    """Values just outside the field's bounds, of the field's type."""
    step = 1 if f.type in (int, "int") else 0.5
    bounds = f.metadata
    values = []
    if "ge" in bounds:
        values.append(bounds["ge"] - step)
    if "gt" in bounds:
        values.append(bounds["gt"] if step == 1 else float(bounds["gt"]))
    if "lt" in bounds:
        values.append(bounds["lt"] if step == 1 else float(bounds["lt"]))
    if "choices" in bounds:
        values.append("nosuch")
    return values


def on_the_bound(f: dataclasses.Field) -> list[Any]:
    """The values at the edge of the field's bounds that are allowed."""
    step = 1 if f.type in (int, "int") else 0.5
    bounds = f.metadata
    values = [bounds["ge"]] if "ge" in bounds else []
    if "gt" in bounds:
        values.append(bounds["gt"] + step)
    if "lt" in bounds:
        values.append(bounds["lt"] - step if step == 1 else bounds["lt"] - 0.01)
    return values + list(bounds.get("choices", ()))


BOUNDED = bounded_fields(LoraFinetuneParams)
KEYS = [key for key, _ in BOUNDED]


@pytest.fixture(scope="module")
def lora_config(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """The default model and data under recipe=lora, which has every field of every recipe."""
    return compose_config(["recipe=lora", f"output_dir={tmp_path_factory.mktemp('out')}"])


def build_with(cfg: DictConfig, key: str, value: Any) -> LoraFinetuneParams:
    """`cfg` with `key=value`, typed by the schema as a command-line override is, then built."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, key, value)
    return build_params(cfg)


def test_the_bounded_fields_are_found() -> None:
    """Every kind of bound, nested ones included (guards the discovery itself)."""
    assert {"lr", "batch_size", "seed", "lora.dropout", "model.dim", "dataset.format"} <= set(KEYS)
    assert {"dataset.val_split", "lora.rank", "keep_last_n"} <= set(KEYS)


@pytest.mark.parametrize(("key", "f"), BOUNDED, ids=KEYS)
def test_a_value_outside_a_declared_bound_names_the_key_and_the_bound(
    key: str, f: dataclasses.Field, lora_config: DictConfig
) -> None:
    for value in out_of_bounds(f):
        with pytest.raises(ConfigError) as error:
            build_with(lora_config, key, value)
        expected = (
            rf"{re.escape(key)}: unknown {f.name} '{value}'; expected one of: .+"
            if isinstance(value, str)
            else rf"{re.escape(key)}: must be (>= |> |in \[).*, got {re.escape(repr(value))}"
        )
        assert re.fullmatch(expected, str(error.value)), str(error.value)


@pytest.mark.parametrize(("key", "f"), BOUNDED, ids=KEYS)
def test_a_value_on_a_declared_bound_is_accepted(
    key: str, f: dataclasses.Field, lora_config: DictConfig
) -> None:
    for value in on_the_bound(f):
        build_with(lora_config, key, value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", "batch_size: must be >= 1, got 0"),
        ("lr=0", "lr: must be > 0, got 0.0"),
        ("seed=-1", "seed: must be in [0, 2**32), got -1"),
        ("seed=4294967296", "seed: must be in [0, 2**32), got 4294967296"),
        ("lora.dropout=1.5", "lora.dropout: must be in [0, 1), got 1.5"),
        ("lora.alpha=0", "lora.alpha: must be > 0, got 0.0"),
        ("model.dim=-1", "model.dim: must be >= 0 (0 takes the checkpoint's), got -1"),
        ("dataset.val_split=1", "dataset.val_split: must be in [0, 1), got 1.0"),
        (
            "dataset.format=xml",
            "dataset.format: unknown format 'xml'; expected one of: alpaca, chat",
        ),
    ],
)
def test_bound_messages_are_the_documented_ones(
    override: str, message: str, tmp_path: Path
) -> None:
    """As typed on the command line, through Hydra's composition."""
    cfg = compose_config(["recipe=lora", f"output_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        build_params(cfg)
