"""How long a run is, in optimizer steps, and its learning rate over those steps."""

from __future__ import annotations

import logging
import math

from finetune.config import FullFinetuneParams

log = logging.getLogger(__name__)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay towards 0; `step` counts from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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
