"""The command line as typed, checked and put in order before Hydra reads it.

Hydra's own messages for a mistyped override are the parser's (`mismatched input '<EOF>'`), and its
argument parser takes flags only before the overrides. Here each override is parsed on its own, so
an error names the one that failed and how to write it; flags move ahead of the overrides; and a
`checkpoint=` given without a `model=` option reads the architecture from that checkpoint.
No torch here: this runs on every start-up, `--help` included.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from finetune.config import config_dir
from finetune.errors import UserError

# Hydra's flags that take a value as the next argument (`--info` only sometimes).
VALUE_FLAGS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
    | {"--config-dir", "-cd", "--experimental-rerun"}
)
INFO_FLAGS = frozenset({"--info", "-i"})
INFO_TOPICS = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
# Characters an unquoted value may hold (Hydra's override grammar); anything else needs quotes.
_UNQUOTED = re.compile(r"[\w/\\\-+.$%*@?|:, \[\]{}]")
# What a group option stands in for when the user gives a path instead of an option's name.
PATH_FIELDS = {"dataset": ("a file", "dataset.path"), "model": ("a checkpoint", "checkpoint")}


def command_line(argv: list[str], group_options: dict[str, list[str]]) -> list[str]:
    """`argv` as Hydra's parser takes it: flags first, then the checked overrides, with
    `model=auto` added when a checkpoint is given without a model option."""
    flags, overrides = split_flags(argv)
    parsed = parse_each(overrides)
    check_group_choices(parsed, group_options)
    if choosing_checkpoint_without_model(parsed):
        overrides.append("model=auto")
    rerun = [o for o in parsed if o.key_or_group == "rerun"]
    if rerun:
        overrides = [o for o in overrides if not o.startswith("rerun=")]
        flags += saved_config_flags(str(rerun[-1].value()))
        overrides = [*finetune_hydra_settings(), *overrides]
    return [*flags, *overrides]


def saved_config_flags(run_dir: str) -> list[str]:
    """`rerun=DIR`: compose DIR's saved config (`.hydra/config.yaml`, every value the run had)
    instead of conf/'s, so later changes to the YAML files do not change the rerun."""
    saved = Path(run_dir).expanduser().absolute() / ".hydra"
    if not (saved / "config.yaml").is_file():
        raise UserError(
            f"rerun: {run_dir} holds no .hydra/config.yaml; expected the directory of a run"
        )
    # An absolute path: Hydra reads a relative --config-path from the package's directory.
    return ["--config-path", str(saved), "--config-name", "config"]


def finetune_hydra_settings() -> list[str]:
    """conf/config.yaml's `hydra:` settings as overrides, which a saved config does not carry
    (run directories, the job name that names finetune.log, the sweep report)."""
    settings = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml").hydra)

    def leaves(node: object, key: str) -> list[str]:
        if isinstance(node, dict):
            return [leaf for k, child in node.items() for leaf in leaves(child, f"{key}.{k}")]
        return [f"++{key}={node}"]

    return leaves(settings, "hydra")


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides), each in the order given."""
    flags: list[str] = []
    overrides: list[str] = []
    takes_value = False
    for arg in argv:
        if takes_value:
            flags.append(arg)
            takes_value = False
        elif arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in VALUE_FLAGS
        elif flags and flags[-1] in INFO_FLAGS and arg in INFO_TOPICS:
            flags.append(arg)
        else:
            overrides.append(arg)
    return flags, overrides


def parse_each(overrides: list[str]) -> list[Override]:
    """Each override parsed alone, so a syntax error names the one that has it."""
    parser = OverridesParser.create()
    parsed = []
    for i, override in enumerate(overrides):
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as error:
            raise UserError(syntax_error(override, overrides[i + 1 :], error)) from None
    return parsed


def syntax_error(override: str, following: list[str], error: OverrideParseException) -> str:
    """What is wrong with `override` and how to write it, for the mistakes people make."""
    key, _, value = override.partition("=")
    if value.count("[") > value.count("]"):
        # The shell split the list at a space: show it rejoined.
        rest = []
        for part in following:
            rest.append(part)
            if (value + "".join(rest)).count("]") >= value.count("["):
                break
        return (
            f"{override}: a list is one argument, without spaces: write '{override}{''.join(rest)}'"
        )
    if value.endswith(","):
        return (
            f"{override}: a value cannot end with a comma: write {override.rstrip(',')} "
            f"(a sweep is -m {key}=A,B)"
        )
    odd = next((c for c in value if not _UNQUOTED.fullmatch(c)), None)
    if odd is not None:
        return f"{override}: {odd!r} needs quotes in a value; write '{key}=\"{value}\"'"
    reason = str(error).split(" See https://")[0].strip()
    return f"{override}: not a valid override ({reason}); quote a value with special characters"


def check_group_choices(parsed: list[Override], group_options: dict[str, list[str]]) -> None:
    """A path given as a group's option (`dataset=data.jsonl`) says which field takes it; an
    unknown option is refused here, as Hydra does, also for an optional group (`tuning=`), which
    Hydra would skip in silence."""
    for override in parsed:
        group = override.key_or_group
        if group not in group_options or override.is_sweep_override():
            continue
        value = override.value()
        if not isinstance(value, str) or value in group_options[group]:
            continue
        options = ", ".join(group_options[group])
        if "/" in value or Path(value).suffix:
            what, field = PATH_FIELDS.get(group, ("a path", f"a {group}.* field"))
            raise UserError(
                f"{group}={value}: {group}= picks an option ({options}); "
                f"{what} goes in {field}={value}"
            )
        raise UserError(f"{group}={value}: no such option; available: {options}")


def choosing_checkpoint_without_model(parsed: list[Override]) -> bool:
    """A checkpoint given with no model option (or experiment, which picks one) is read as
    model=auto: its own config.json or params.json says what it is."""
    keys = {override.key_or_group for override in parsed}
    return "checkpoint" in keys and not keys & {"model", "experiment"}
