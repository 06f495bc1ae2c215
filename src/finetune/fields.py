"""How a parameter is declared and checked: its one-line help and bounds beside it
(`option(4, "...", ge=1)`), the one loop that checks the bounds, the checks of required files and
directories, paths made absolute, and the rows `--help` shows. No torch: the CLI imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from enum import Enum
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError


def option(
    default: Any = None,
    doc: str = "",
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    note: str = "",
) -> Any:
    """A dataclass field whose one-line help (`doc`) shows in `--help`, with its bounds.

    `ge`, `gt`, `lt` and `choices` are checked by `check_bounds`, which the dataclass's
    `__post_init__` calls; `note` is added to the bound's message (why the bound is what it is).
    """
    # The forms the messages can say: `>= ge`, `> gt`, `in [ge, lt)`.
    if (lt is not None and ge is None) or (gt is not None and (ge, lt) != (None, None)):
        raise TypeError("a bound is ge=, gt=, or ge= with lt=")
    bounds = {"ge": ge, "gt": gt, "lt": lt, "choices": choices, "note": note}
    metadata = {"help": doc, **{k: v for k, v in bounds.items() if v is not None and v != ""}}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_bounds(config: Any, prefix: str = "") -> None:
    """Every field of the dataclass `config` within the bounds declared with it by `option`.

    `prefix` is where `config` sits in the run's parameters (`lora.`), for the message's key.
    """
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), prefix + f.name
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(
                key, f"unknown {f.name} {value!r}; expected one of: " + ", ".join(choices)
            )
        bound = bound_text(f.metadata)
        if bound and not is_within(value, f.metadata):
            note = f" ({f.metadata['note']})" if "note" in f.metadata else ""
            raise ConfigError(key, f"must be {bound}{note}, got {value!r}")


def bound_text(metadata: Mapping[str, Any]) -> str:
    """A field's numeric bound as messages and `--help` say it: `>= 1`, `in [0, 1)`; "" if none."""
    ge, gt, lt = metadata.get("ge"), metadata.get("gt"), metadata.get("lt")
    if lt is not None:
        return f"in [{_shown(ge)}, {_shown(lt)})"
    if ge is not None:
        return f">= {_shown(ge)}"
    if gt is not None:
        return f"> {_shown(gt)}"
    return ""


def is_within(value: float, metadata: Mapping[str, Any]) -> bool:
    ge, gt, lt = metadata.get("ge"), metadata.get("gt"), metadata.get("lt")
    return (ge is None or value >= ge) and (gt is None or value > gt) and (lt is None or value < lt)


def _shown(bound: float) -> str:
    """A bound as people write it: a seed's 2**32 rather than 4294967296."""
    if isinstance(bound, int) and bound >= 2**16 and bound & (bound - 1) == 0:
        return f"2**{bound.bit_length() - 1}"
    return str(bound)


def absolute_path(path: str) -> str:
    """`path` with `~` expanded, relative to the directory the command ran in ("" stays unset).

    Hydra does not chdir (version_base 1.3), so that is the process's working directory. Saved
    absolute, params.yaml and the adapter's base model name work from any other directory.
    """
    return str(Path(path).expanduser().absolute()) if path else ""


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"{rule}, got {value!r}")


def require_dir(path: str, key: str) -> None:
    if not path:
        raise ConfigError(key, "is required (a directory)")
    if not Path(path).is_dir():
        raise ConfigError(key, f"directory not found: {path}")


def require_file(path: str, key: str, suffixes: tuple[str, ...]) -> None:
    kinds = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)
    if not path:
        raise ConfigError(key, f"is required (a {kinds} file)")
    if not Path(path).is_file():
        raise ConfigError(key, f"file not found: {path}")
    if Path(path).suffix not in suffixes:
        raise ConfigError(key, f"expected a {kinds} file, got {path}")


def field_help(params: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(name, type and bounds, default, help) for every field, nested dataclasses flattened with
    dots."""
    rows = []
    for f in dataclasses.fields(params):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += field_help(type(default), f"{prefix}{f.name}.")
            continue
        shown = default.value if isinstance(default, Enum) else default
        kind = ", ".join(filter(None, [type_name(default, f.metadata), bound_text(f.metadata)]))
        rows.append((prefix + f.name, kind, repr(shown), f.metadata.get("help", "")))
    return rows


def type_name(default: Any, metadata: Mapping[str, Any]) -> str:
    """A field's type for `--help`; an Enum's or a string's choices as `a|b`."""
    if isinstance(default, Enum):
        return "|".join(m.value for m in type(default))
    if "choices" in metadata:
        return "|".join(metadata["choices"])
    return type(default).__name__
