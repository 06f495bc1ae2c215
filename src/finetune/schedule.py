"""How long a run is, in optimizer steps, and its learning rate over those steps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

from finetune.config import FullFinetuneParams

log = logging.getLogger(__name__)

# How the learning rate falls from its peak (1) to its floor (0) as the run's progress after the
# warmup goes from 0 to 1; `lr_multiplier` lifts the floor to min_lr_ratio.
DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
}


def lr_multiplier(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate of `step` (counted from 0) as a fraction of the peak: linear warmup to
    1, then `schedule`'s decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    # With min_lr_ratio=0 this is the decay itself, bit for bit (0.0 + 1.0 * x == x).
    return min_lr_ratio + (1.0 - min_lr_ratio) * DECAYS[schedule](progress)


def lr_schedule(params: FullFinetuneParams, total_steps: int) -> Callable[[int], float]:
    """`params`' multiplier of the learning rate by step, over a run of `total_steps`."""
    return partial(
        lr_multiplier,
        warmup_steps=params.warmup_steps,
        total_steps=total_steps,
        schedule=params.lr_schedule,
        min_lr_ratio=params.min_lr_ratio,
    )


def steps_per_epoch(n_examples: int, batch_size: int, accumulation_steps: int) -> int:
    return math.ceil(math.ceil(n_examples / batch_size) / accumulation_steps)


def warn_if_data_runs_out(params: FullFinetuneParams, n_examples: int) -> None:
    """Say at the start when `epochs` passes over the data end before `max_steps`."""
    per_epoch = steps_per_epoch(n_examples, params.batch_size, params.gradient_accumulation_steps)
    if params.max_steps <= params.epochs * per_epoch:
        return
    batches = f"batch_size={params.batch_size}"
    if params.gradient_accumulation_steps > 1:
        batches += f", gradient_accumulation_steps={params.gradient_accumulation_steps}"
    log.warning(
        f"{n_examples} examples, {batches}: {count(per_epoch, 'step')} per epoch, so "
        f"epochs={params.epochs} ends after {count(params.epochs * per_epoch, 'step')}; "
        f"max_steps={params.max_steps} needs epochs={math.ceil(params.max_steps / per_epoch)}"
    )


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def total_steps(params: FullFinetuneParams, n_examples: int) -> int:
    steps = params.epochs * steps_per_epoch(
        n_examples, params.batch_size, params.gradient_accumulation_steps
    )
    return min(steps, params.max_steps) if params.max_steps else steps
