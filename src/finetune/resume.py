"""Resuming a run from a training-state checkpoint: what a resumed run may change (its length)
and what it must keep (the data order, the optimizer's settings), and the checks of both."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from finetune import ranks
from finetune.config import FullFinetuneParams
from finetune.errors import UserError
from finetune.model import Llama
from finetune.schedule import count, lr_schedule
from finetune.training_state import TrainingState, find_checkpoint, load_checkpoint_state

log = logging.getLogger(__name__)


# What a resumed run cannot change: the data order and the examples of each optimizer step
# (global_batch_size, seed, ..., max_seq_len), what the restored optimizer holds (lr,
# weight_decay, the optimizer and its layout) or the schedule (warmup, its shape and floor).
# How a step's examples are split into micro-batches and processes may change: 2 processes x
# batch_size=2 continue as 1 x 4.
RESUME_SETTINGS = (
    "global_batch_size",
    "seed",
    "shuffle",
    "max_seq_len",
    "lr",
    "weight_decay",
    "warmup_steps",
    "lr_schedule",
    "min_lr_ratio",
    "optimizer",
    "optimizer_in_backward",
)

# What checkpoints saved before a setting existed were trained with.
EARLIER_DEFAULTS: dict[str, float | int | bool | str] = {
    "lr_schedule": "cosine",
    "min_lr_ratio": 0.0,
}


EXPLAINED = {"global_batch_size": " (batch_size x gradient_accumulation_steps x processes)"}


# What it can: the run's length, to train a finished run for longer (or end an unfinished one
# sooner). The cosine decay is then recomputed over the new length.
LENGTH_SETTINGS = ("epochs", "max_steps")


def resume_settings(params: FullFinetuneParams) -> dict[str, float | int | bool | str]:
    settings = {"global_batch_size": global_batch_size(params)}
    return settings | {key: getattr(params, key) for key in RESUME_SETTINGS[1:] + LENGTH_SETTINGS}


def global_batch_size(params: FullFinetuneParams) -> int:
    """The examples of one optimizer step: batch_size x gradient_accumulation_steps x processes."""
    return params.batch_size * params.gradient_accumulation_steps * ranks.world_size()


def resume(
    params: FullFinetuneParams,
    recipe: str,
    model: Llama,
    optimizer: torch.optim.Optimizer,
    n_examples: int,
    steps: int,
) -> TrainingState:
    """Load the checkpoint `params.resume` names into `model` and `optimizer`; the training set
    and the settings in RESUME_SETTINGS must be the ones it was saved with."""
    directory = find_checkpoint(params.resume, Path(params.output_dir))
    state = load_checkpoint_state(directory, recipe, model, optimizer)
    if state.n_examples != n_examples:
        raise UserError(
            f"{directory}: saved from a run of {state.n_examples} training examples, "
            f"this one has {n_examples}; resume needs the same data and val_split"
        )
    ours = resume_settings(params)
    state.settings = EARLIER_DEFAULTS | state.settings
    changed = [key for key in RESUME_SETTINGS if state.settings.get(key, ours[key]) != ours[key]]
    if changed:
        saved = ", ".join(f"{key}={state.settings[key]}" for key in changed)
        now = ", ".join(f"{key}={ours[key]}{EXPLAINED.get(key, '')}" for key in changed)
        raise UserError(
            f"{directory}: saved with {saved}, but this run has {now}; resume with the "
            "settings of the run it continues"
        )
    lengthened = [key for key in LENGTH_SETTINGS if state.settings.get(key, ours[key]) != ours[key]]
    if lengthened and steps < state.step:
        now = ", ".join(f"{key}={ours[key]}" for key in lengthened)
        raise UserError(
            f"{directory}: saved at step {state.step}, after the {count(steps, 'step')} of this "
            f"run ({now}); resume with a larger max_steps or epochs"
        )
    if ranks.writes_files():
        print(f"resuming from {directory} at step {state.step}", flush=True)
    if lengthened:
        log.info(length_change(state, params, lengthened, steps))
    # Later checkpoints record this run's length, so that resuming one changes nothing again.
    state.settings = ours
    return state


def length_change(
    state: TrainingState, params: FullFinetuneParams, changed: list[str], steps: int
) -> str:
    """The log line of a resume that changes the run's length: what changed and the new lr."""
    was = ", ".join(f"{key}={state.settings[key]}" for key in changed)
    now = ", ".join(f"{key}={getattr(params, key)}" for key in changed)
    lr = params.lr * lr_schedule(params, steps)(state.step)
    return (
        f"{now} (the checkpoint's run had {was}): training runs to step {steps}; the learning "
        f"rate follows the {params.lr_schedule} schedule of a {steps}-step run, lr {lr:.3e} at "
        f"step {state.step + 1}"
    )
