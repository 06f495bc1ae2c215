"""`python -m finetune` (or `finetune`): compose the config with Hydra, build the params, run.

Only Hydra, OmegaConf and the config dataclasses are imported here, so `--help`, `--cfg job` and
`--info` answer without loading torch; a recipe imports torch when it is called.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune import sweep
from finetune.config import (
    RECIPES,
    CheckpointParams,
    FullFinetuneParams,
    build_params,
    config_dir,
    recipe_of,
)
from finetune.config import register_schemas as _register_schemas
from finetune.errors import RunFailed, UserError
from finetune.fields import field_help
from finetune.overrides import command_line, split_flags

_register_schemas()


_SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"
_USER_ERRORS = (UserError, HydraException, OmegaConfBaseException)
log = logging.getLogger(__name__)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> float:
    multirun = HydraConfig.get().mode is RunMode.MULTIRUN
    if multirun and sweep.stop_signal is not None:
        return not_run_job()
    try:
        params = build_params(cfg)
        # Generation and evaluation have nothing to resume.
        if multirun and is_resuming_sweep(getattr(params, "resume", "")):
            earlier = sweep.earlier_outcome(Path(params.output_dir))
            if earlier is not None and earlier["status"] == "completed":
                log.info("job %s completed in an earlier attempt: kept", HydraConfig.get().job.num)
                return earlier["result"] if earlier["result"] is not None else math.nan
            if not sweep.has_checkpoint(Path(params.output_dir)):
                params.resume = ""  # never started, or stopped before its first checkpoint
        return run(params)
    except (KeyboardInterrupt, SystemExit):
        # A signal during training saved a checkpoint and set sweep.stop_signal; a Ctrl-C
        # elsewhere (loading the model) saved nothing. Either way the sweep stops with its report.
        if not multirun:
            raise
        sweep.stop_signal = sweep.stop_signal or signal.SIGINT
        return sweep.interrupted_job(Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:
        # In a sweep the other jobs go on; the report lists this one with its error.
        if multirun and not _SHOW_TRACEBACK:
            return failed_job(error)
        # A single run ends here, before Hydra adds its own lines.
        if isinstance(error, _USER_ERRORS):
            exit_with(error)
        if isinstance(error, RunFailed) and not _SHOW_TRACEBACK:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        if lost_another_rank(error):
            raise SystemExit(1) from None
        raise


def run(params: CheckpointParams) -> float:
    """Train in this process, or in the nproc_per_node x nnodes processes of launch.py;
    generation and evaluation run in this process."""
    if not isinstance(params, FullFinetuneParams):
        if under_torchrun():
            raise UserError(
                f"recipe={recipe_of(params).name} runs on one process: start it without torchrun"
            )
        return recipe_of(params).run(params)
    if params.nproc_per_node * params.nnodes == 1 and not under_torchrun():
        return recipe_of(params).run(params)
    from finetune import launch  # torch.distributed: only for runs over several processes

    return launch.run(params)


def under_torchrun() -> bool:
    """Whether this process is one of several that the user's torchrun (or SLURM) started."""
    if "WORLD_SIZE" not in os.environ and "SUBMITIT_EXECUTOR" not in os.environ:
        return False  # decided without importing torch, which --help and --cfg job never load
    from finetune import distributed, launch

    launch.export_slurm_environment()
    return distributed.started_by_launcher()


def lost_another_rank(error: Exception) -> bool:
    """Whether this is one rank of several, whose collective failed because another rank failed
    first: that rank says why, and this one ends without a word."""
    if "WORLD_SIZE" not in os.environ:
        return False
    from finetune import launch

    return launch.lost_a_peer(error)


def as_torchrun_rank() -> None:
    """One rank of the user's torchrun: rank 0 composes with Hydra, in its one run directory,
    and passes the params on; the other ranks run no Hydra and train what rank 0 sends."""
    from finetune import launch

    if os.environ.get("RANK", "0") != "0":
        launch.follow_rank_zero()
    with launch.leading_other_ranks():
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            # Each job of a sweep would need the ranks to meet again; finetune's launcher does.
            raise UserError(
                "-m under torchrun: run `python -m finetune -m ... nproc_per_node=N` without "
                "torchrun, which starts the processes of each job"
            )
        _task()


def is_resuming_sweep(resume: str) -> bool:
    """resume=true in a sweep continues each job from its own directory."""
    return resume.lower() in ("true", "latest")


def not_run_job() -> sweep.JobFailure:
    """A job after the one a signal interrupted: recorded as not run, so the report lists it."""
    log.info("job %s not run: the sweep was interrupted", HydraConfig.get().job.num)
    return sweep.JobFailure("the sweep was interrupted before this job", "not run")


def failed_job(error: Exception) -> sweep.JobFailure:
    """Log a sweep job's error in one line and return it as a value: a raise would end the sweep."""
    message = describe(error)
    log.error("job %s failed: %s", HydraConfig.get().job.num, message)
    return sweep.JobFailure(message)


def main() -> None:
    if not under_torchrun():
        run_command_line(_task)
        return
    from finetune import launch

    launch.end_process(launch.status_of(lambda: run_command_line(as_torchrun_rank)))


def run_command_line(task: Callable[[], object]) -> None:
    """Read the command line and run `task` (Hydra's) on it, or answer --help; bad input ends
    here with its one line."""
    try:
        sys.argv[1:] = command_line(sys.argv[1:], group_options())
        if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
            print(help_text(sys.argv[1:]))
            return
        # Let Hydra raise instead of printing its own report, so bad input gets a single line.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        task()
    except _USER_ERRORS as error:
        exit_with(error)
    except OSError as error:
        if not error.filename:  # not a file the user named: a bug, shown with its traceback
            raise
        exit_with(error)  # e.g. Hydra creating hydra.run.dir where it cannot
    except KeyboardInterrupt:  # outside the training loop, where Ctrl-C needs no checkpoint
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if sweep.failure_message is not None:
        print(f"error: {sweep.failure_message}", file=sys.stderr)
        sys.exit(1)


def exit_with(error: BaseException) -> None:
    if _SHOW_TRACEBACK:
        raise error
    print(f"error: {describe(error)}", file=sys.stderr)
    sys.exit(2)


def describe(error: BaseException) -> str:
    """One line that names the key or file and what was expected."""
    if isinstance(error, MissingConfigException) and (extra := _missing_extra(error)):
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return f"{group}={option}: Hydra plugin not installed; pip install 'finetune[{extra}]'"
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = str(error.missing_cfg_file).rpartition("/")[0]
        option = str(error.missing_cfg_file).rpartition("/")[2]
        return f"{group}={option}: no such option; available: {', '.join(error.options)}"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    cause = error.__cause__
    if isinstance(error, HydraException) and isinstance(cause, OmegaConfBaseException):
        error = cause
    if isinstance(error, OmegaConfBaseException):
        key = getattr(error, "full_key", None)
        message = str(getattr(error, "msg", None) or error).strip().splitlines()[0]
        return f"{key}: {message}" if key else message
    return " ".join(str(error).split())


def _missing_extra(error: MissingConfigException) -> str | None:
    """The extra that installs the Hydra plugin whose config was not found, if it is one."""
    missing = str(error.missing_cfg_file)
    return next((x for cfg, x in sweep.PLUGIN_EXTRAS.items() if missing.startswith(cfg)), None)


def help_text(argv: list[str]) -> str:
    """Usage, the config groups and their options, and every field of the selected recipe."""
    recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("recipe=")), "full")
    params = RECIPES[recipe].params if recipe in RECIPES else FullFinetuneParams
    defaults = _primary_defaults()
    command = "finetune" if Path(sys.argv[0]).name == "finetune" else "python -m finetune"
    lines = [
        f"usage: {command} [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--info]",
        "",
        "Fine-tunes a Llama model; writes metrics, loss.png and the model to the run directory.",
        "-m runs a sweep over comma-separated values, e.g. -m lr=1e-5,3e-5, and writes",
        "summary.csv and summary.png to the sweep directory; -m hparams_search=lora_optuna",
        "searches with Optuna (pip install 'finetune[sweep]').",
        "",
        "Config groups (GROUP=OPTION, * marks the default):",
    ]
    for group, options in group_options().items():
        marked = [f"{o}*" if defaults.get(group) == o else o for o in options]
        # An option picked by other groups' choices, e.g. tuning: ${model}_${recipe}.
        picked = defaults.get(group) or ""
        shown = re.sub(r"\$\{(\w+)\}", r"<\1>", picked)
        by = f" (default: {shown}, where it exists)" if shown != picked else ""
        lines.append(f"  {group:<15} {', '.join(marked)}{by}")
    overrides = split_flags(argv)[1]
    values = _composed_values(overrides)
    given = f" with {' '.join(overrides)}" if overrides else ""
    lines += ["", f"Parameters of recipe={recipe} ({params.__name__}), their values{given}:"]
    rows = [
        (name, values.get(name, default), f"{doc} ({kind})")
        for name, kind, default, doc in field_help(params)
    ]
    name_width = max(len(name) for name, *_ in rows)
    value_width = min(14, max(len(value) for _, value, _ in rows))
    for name, value, doc in rows:
        lines.append(f"  {name:<{name_width}}  {value:<{value_width}}  {doc}")
    lines += [
        "",
        "`--cfg job` prints the composed config; `--hydra-help` lists Hydra's own flags.",
    ]
    return "\n".join(lines)


def group_options() -> dict[str, list[str]]:
    """Each config group of `conf/` with its options, e.g. "model" -> ["auto", "llama2", ...]."""
    groups = {}
    for group in sorted(p.name for p in config_dir().iterdir() if p.is_dir()):
        options = sorted(f.stem for f in (config_dir() / group).glob("*.yaml"))
        if options:  # conf/hydra/ holds Hydra's own groups, not ours
            groups[group] = options
    return groups


def _composed_values(overrides: list[str]) -> dict[str, str]:
    """Each field's value after the YAML options and `overrides`, as dotted name -> text.
    Overrides that do not compose raise: help must not show defaults as the run's values."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    values: dict[str, str] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{path}.{key}" if path else key)
            return
        try:
            value = OmegaConf.select(cfg, path, throw_on_resolution_failure=True)
        except OmegaConfBaseException:  # output_dir: Hydra's run directory exists only in a run
            value = node
        values[path] = repr(value.value if isinstance(value, Enum) else value)

    walk(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True), "")
    return values


def _primary_defaults() -> dict[str, str]:
    """Each group's default option as conf/config.yaml writes it (interpolations unresolved)."""
    primary = _group_defaults(config_dir() / "config.yaml")
    # The recipes that read data pick the default dataset in their own file.
    return {**_group_defaults(config_dir() / "recipe" / f"{primary['recipe']}.yaml"), **primary}


def _group_defaults(path: Path) -> dict[str, str]:
    defaults = OmegaConf.to_container(OmegaConf.load(path).defaults)
    return {
        k.removeprefix("optional ").removeprefix("/"): v
        for entry in defaults
        if isinstance(entry, dict)
        for k, v in entry.items()
    }


if __name__ == "__main__":
    main()
