"""The loop every recipe shares, and its parts: precision, optimizer, one step, evaluation."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import OmegaConf

from finetune import optimizers, ranks
from finetune.config import DType, FullFinetuneParams, recipe_of
from finetune.data import IGNORE_INDEX, Batch, Example, collate, epoch_order
from finetune.distributed import full_tensor, set_requires_gradient_sync
from finetune.errors import UserError
from finetune.interrupts import StopRequest, stopped_by_signal
from finetune.metrics import MetricsLog, drop_rows_after, late_loss, read_metrics
from finetune.model import Llama
from finetune.outputs import check_free_space
from finetune.packing import packed_rows
from finetune.provenance import device_name, record_provenance
from finetune.resume import resume, resume_settings
from finetune.runs import split_validation
from finetune.samples import Sampler, sample_prompts
from finetune.schedule import lr_schedule, total_steps, warn_if_data_runs_out
from finetune.sweep import job_prefix
from finetune.tokenizer import Tokenizer
from finetune.trackers import open_trackers
from finetune.training_state import (
    Checkpoints,
    TrainingState,
    advance,
    capture_rng,
    check_no_later_checkpoints,
    checkpoint_dirs,
    is_resuming,
    restore_rng,
    should_stop_early,
)

log = logging.getLogger(__name__)
B = TypeVar("B")

# A recipe's loss of one micro-batch, summed over its `n_targets` labelled tokens: the loop divides
# by their total over the optimizer step, so every token weighs the same however it is batched.
# A loss may come with metrics of its own, {name: value summed over the same targets}, which the
# loop averages the same way and logs beside the loss (e.g. DPO's rewards).
LossFn = Callable[
    [torch.nn.Module, Batch], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
]


def loss_and_metrics(
    output: torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A LossFn's output as (loss, its metric sums): none for a loss that has no metrics."""
    return output if isinstance(output, tuple) else (output, {})


def add_metrics(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    for name, value in metrics.items():
        sums[name] = sums.get(name, 0) + value.detach().double()


def mean_metrics(sums: dict[str, torch.Tensor], n_targets: int) -> dict[str, float]:
    """Metric sums over every process, divided by the targets they were summed over."""
    return {name: ranks.sum_over_ranks(float(value)) / n_targets for name, value in sums.items()}


# How a recipe makes one batch of its examples: (examples, pad_id, pad_to_multiple_of) -> batch.
# Its batches hold tensors and count the `n_targets` their loss sums over and the input
# `n_tokens` (see data.Batch); a recipe whose data differ brings its own.
Collate = Callable[[list[Example], int, int], Batch]


def autocast(device: torch.device, dtype: DType) -> AbstractContextManager:
    """bf16 runs compute in bf16 while weights and optimizer state stay fp32.

    Pure bf16 weights would lose most AdamW updates at fine-tuning learning rates (a 2e-5 step
    is below bf16's resolution for weights of magnitude > 1e-2).
    """
    if dtype is DType.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    kind: str = "adamw",
    in_backward: bool = False,
) -> torch.optim.Optimizer:
    """AdamW of `optimizer=<kind>` over the trainable parameters, per weight during backward when
    `in_backward` (see `finetune.optimizers`); weight decay on matrices, not on norm weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # `initial_lr` is the schedule's base, which a resumed run's scheduler starts from: set here,
    # so that it is part of the state a checkpoint saves and loads.
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [group | {"lr": lr, "initial_lr": lr} for group in groups]
    return optimizers.build(kind, groups, in_backward)


def optimizer_steps(
    examples: list[Example],
    params: FullFinetuneParams,
    pad_id: int,
    start_epoch: int = 0,
    start_example: int = 0,
    collate: Collate = collate,
) -> Iterator[tuple[int, int, list[Batch]]]:
    """(epoch, examples in the step over all processes, this process's micro-batches of it), for
    every optimizer step of every epoch: the loop's one source of data (see `ranks.this_rank`).

    Starts after the first `start_example` examples of `start_epoch` (a resumed run): the order is
    rebuilt from (seed, epoch) and the consumed part sliced off, so nothing skipped is collated.
    """
    for epoch in range(start_epoch, params.epochs):
        order = epoch_order(len(examples), params.shuffle, params.seed, epoch)
        if epoch == start_epoch:
            order = order[start_example:]
        chunks = ranks.this_rank(order, params.batch_size)
        accumulation = params.gradient_accumulation_steps
        per_step = accumulation * params.batch_size * ranks.world_size()
        for step, start in enumerate(range(0, len(chunks), accumulation)):
            group = chunks[start : start + accumulation]
            n_examples = len(order[step * per_step : (step + 1) * per_step])
            batches = [collated(examples, chunk, order, pad_id, params, collate) for chunk in group]
            yield epoch, n_examples, batches


def collated(
    examples: list[Example],
    chunk: list[int],
    order: list[int],
    pad_id: int,
    params: FullFinetuneParams,
    collate: Collate,
) -> Batch:
    """The examples of `chunk` made one batch. An empty chunk (this process's share of an epoch's
    last micro-batch, when fewer examples than processes are left) becomes the epoch's first
    example with no labels: the process runs the step with the others and adds nothing to it."""
    if chunk:
        return collate([examples[i] for i in chunk], pad_id, params.pad_to_multiple_of)
    stand_in = collate([examples[order[0]]], pad_id, params.pad_to_multiple_of)
    return dataclasses.replace(
        stand_in, targets=torch.full_like(stand_in.targets, IGNORE_INDEX), n_tokens=0
    )


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    n_tokens: int  # non-padding input tokens
    finite: bool = True  # False: NaN/inf loss or gradient, and the weights were not updated
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the LossFn's own


def next_token_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each labelled token given the tokens before it, summed."""
    return model(batch.inputs, batch.targets, positions=batch.positions)


def on_device(batch: B, device: torch.device) -> B:
    """`batch` with each of its tensors on `device` (a recipe's own batches may hold others)."""
    moved = {
        f.name: value.to(device, non_blocking=True)
        for f in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


def train_step(
    model: Llama,
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    params: FullFinetuneParams,
    device: torch.device,
    loss_fn: LossFn = next_token_loss,
) -> StepResult:
    """One optimizer step over `micro_batches`, the loss averaged over all their labelled tokens."""
    n_targets = max(1, ranks.sum_over_ranks(sum(b.n_targets for b in micro_batches)))
    in_backward = isinstance(optimizer, optimizers.OptimizerInBackward)
    loss_sum = torch.zeros((), device=device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        set_requires_gradient_sync(model, i == len(micro_batches) - 1)
        with autocast(device, params.dtype):
            loss, metrics = loss_and_metrics(loss_fn(model, on_device(batch, device)))
        loss_sum += loss.detach()
        add_metrics(metric_sums, metrics)
        if in_backward and not torch.isfinite(loss):
            continue  # backward would apply the update: a NaN loss must not reach the weights
        (loss / n_targets).backward()
    loss = ranks.sum_over_ranks(float(loss_sum)) / n_targets
    if in_backward:
        optimizer.step()  # closes the step whose updates backward applied
        norm, finite = optimizer.grad_norm_and_finite()
        finite = finite and math.isfinite(loss)
    else:
        norm, finite = clipped_update(model, optimizer, params.max_grad_norm, loss)
    n_tokens = ranks.sum_over_ranks(sum(b.n_tokens for b in micro_batches))
    return StepResult(loss, norm, n_tokens, finite, mean_metrics(metric_sums, n_targets))


def clipped_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, loss: float
) -> tuple[float, bool]:
    """Clip the accumulated gradient to `max_grad_norm` (0: no clipping) and update the weights,
    unless the loss or the gradient is not finite; (the gradient's norm, whether finite)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The norm of the whole gradient, over every process's shard of it.
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf))
    norm = float(grad_norm)
    # Checked before the update: one NaN gradient would turn every weight it reaches into NaN.
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


def evaluate(
    model: Llama,
    examples: list[Example],
    params: FullFinetuneParams,
    pad_id: int,
    loss_fn: LossFn = next_token_loss,
    collate: Collate = collate,
) -> float:
    """Mean loss over every labelled token of `examples` (see `evaluate_with_metrics`)."""
    return evaluate_with_metrics(model, examples, params, pad_id, loss_fn, collate)[0]


def evaluate_with_metrics(
    model: Llama,
    examples: list[Example],
    params: FullFinetuneParams,
    pad_id: int,
    loss_fn: LossFn = next_token_loss,
    collate: Collate = collate,
) -> tuple[float, dict[str, float]]:
    """Mean loss over every labelled token of `examples`, and the loss's own metrics averaged
    the same way, weights and training RNG untouched.

    Token-weighted like the training loss, so the two are on the same scale and batch size does
    not change the result. Eval mode turns off (LoRA) dropout: its masks would add noise to the
    result and draw from the global RNG, changing the masks of the training steps that follow.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metric_sums: dict[str, torch.Tensor] = {}
    n_targets = 0
    order = list(range(len(examples)))
    with torch.no_grad():
        for chunk in ranks.this_rank(order, params.batch_size):
            batch = collated(examples, chunk, order, pad_id, params, collate)
            with autocast(device, params.dtype):
                loss, metrics = loss_and_metrics(loss_fn(model, on_device(batch, device)))
            loss_sum += loss
            add_metrics(metric_sums, metrics)
            n_targets += batch.n_targets
    loss, n_targets = ranks.sum_over_ranks(float(loss_sum)), ranks.sum_over_ranks(n_targets)
    model.train(was_training)
    if n_targets == 0:
        raise UserError("the validation data has no labelled tokens to compute a loss on")
    return loss / n_targets, mean_metrics(metric_sums, n_targets)


def train(
    model: Llama,
    examples: list[Example],
    params: FullFinetuneParams,
    tokenizer: Tokenizer,
    saved_bytes: int,
    loss_fn: LossFn = next_token_loss,
    collate: Collate = collate,
    val_examples: list[Example] | None = None,
) -> float:
    """Run the training loop on `examples`, less any held-out validation part (or validated on
    `val_examples`, held out by the recipe), with the recipe's `loss_fn` on batches made by its
    `collate`. `saved_bytes`, the size of what the
    recipe saves when the loop ends, counts in the disk space checked before the first step.

    Returns the last validation loss when there is validation data (the number worth comparing
    between runs, e.g. in a sweep), else the mean training loss over the last 10 % of the steps
    (see `late_loss`): one step's loss is too noisy to compare runs by.
    """
    if val_examples is None:
        examples, val_examples = split_validation(examples, params, tokenizer)
    prompts = sample_prompts(val_examples or examples, params.sample_prompts, params.max_seq_len)
    # From here on an "example" is a row; validation is never packed, nor are preference pairs
    # (their datasets have no `packed`).
    if getattr(params.dataset, "packed", False):
        examples = packed_rows(examples, params.max_seq_len, params.shuffle, params.seed)
    pad_id = tokenizer.pad_id
    device = next(model.parameters()).device
    steps = total_steps(params, len(examples))
    warn_if_data_runs_out(params, len(examples))
    optimizer = build_optimizer(
        model, params.lr, params.weight_decay, params.optimizer, params.optimizer_in_backward
    )
    output_dir = Path(params.output_dir)
    recipe = recipe_of(params).name
    if params.warmup_steps >= steps:
        log.warning(
            "warmup_steps=%d is not below the run's %d steps: the learning rate never reaches "
            "lr=%g",
            params.warmup_steps,
            steps,
            params.lr,
        )
    state = TrainingState(n_examples=len(examples), settings=resume_settings(params))
    if is_resuming(params.resume):
        state = resume(params, recipe, model, optimizer, len(examples), steps)
    # The schedule is a function of the step, not saved: a resumed run rebuilds it at its step,
    # over its own length (which may be longer than the checkpoint's run, see `resume.resume`).
    schedule = lr_schedule(params, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=state.step - 1)
    check_no_later_checkpoints(output_dir, state.step)
    check_free_space(model, params, steps, len(checkpoint_dirs(output_dir)), saved_bytes)
    metrics_path = output_dir / "metrics.jsonl"
    # A resumed run continues the rows of the run it resumes, less those of the steps it redoes;
    # a new run in an old run's directory starts the file afresh.
    writes = ranks.writes_files()
    if writes:
        drop_rows_after(metrics_path, state.step)
    trackers = open_trackers(params) if writes else []
    metrics = MetricsLog(metrics_path, steps, job_prefix(), writes, trackers)

    checkpoints = Checkpoints(output_dir, recipe, params.keep_last_n)
    sampler = Sampler(
        model,
        prompts,
        tokenizer,
        output_dir,
        resumed_step=state.step,
        precision=partial(autocast, device, params.dtype),
        say=metrics.say,
    )

    def save(epoch_ended: bool, stopping_now: bool) -> Path | None:
        every = params.save_every_n_steps
        # The last step is saved too, so that a finished run can be continued for longer.
        due = state.step % every == 0 or epoch_ended or state.step == steps if every else False
        if not (stopping_now or due):
            return None
        state.rng = capture_rng()
        state.elapsed_s = metrics.elapsed()
        # A run that stops now, or ends, waits for its last checkpoint anyway.
        background = params.async_save and not stopping_now and state.step < steps
        return checkpoints.save(state.step, model, optimizer, state, background)

    def validate(step: int, epoch: int) -> float:
        started = time.perf_counter()
        val_loss, val_metrics = evaluate_with_metrics(
            model, val_examples, params, pad_id, loss_fn, collate
        )
        samples = sampler.generate(step)  # timed with the evaluation, not as training
        metrics.write_eval(step, epoch, val_loss, time.perf_counter() - started, val_metrics)
        sampler.write(samples)
        return val_loss

    # Written only now that every input has been read and checked: a run that fails on bad input
    # leaves an earlier run's params.yaml in the same directory as it was.
    if ranks.writes_files():
        (output_dir / "params.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(params)))
        record_provenance(params, device_name(device))
    model.train()
    metrics.start(elapsed_before=state.elapsed_s)
    if state.rng:
        # Last, so that the next dropout mask is the one the interrupted run would have drawn.
        restore_rng(state.rng)
    loss, tokens_since_log = math.nan, 0
    data = optimizer_steps(examples, params, pad_id, state.epoch, state.examples_done, collate)
    stop = StopRequest(output_dir)
    with stop.installed():
        for epoch, n_examples, micro_batches in data:
            if state.step >= steps:  # resumed from the last step: nothing left to do
                break
            step = state.step + 1
            lr = float(scheduler.get_last_lr()[0])  # a tensor for torchao's optimizers
            result = train_step(model, micro_batches, optimizer, params, device, loss_fn)
            scheduler.step()
            loss = result.loss
            tokens_since_log += result.n_tokens
            epoch_ended = advance(state, epoch, n_examples, result.n_tokens, len(examples))
            if not result.finite:
                state.skipped_steps += 1
                metrics.say(check_nonfinite(result, step, state.skipped_steps, params))
            if step % params.log_every_n_steps == 0 or step == steps:
                metrics.write(
                    step, epoch, loss, lr, result.grad_norm, tokens_since_log, result.metrics
                )
                tokens_since_log = 0
            every = params.eval_every_n_steps
            if val_examples and (step == steps or (every and step % every == 0)):
                val_loss = validate(step, epoch)
                no_progress = should_stop_early(state, val_loss, params.early_stopping_patience)
                if ranks.any_rank(no_progress):
                    if tokens_since_log:  # the last step's row, which log_every_n_steps skipped
                        metrics.write(
                            step,
                            epoch,
                            loss,
                            lr,
                            result.grad_norm,
                            tokens_since_log,
                            result.metrics,
                        )
                    metrics.say(
                        f"early stopping at step {step}/{steps}: val_loss has not improved on "
                        f"{state.best_val_loss:.4f} (step {state.best_step}) for "
                        f"{params.early_stopping_patience} evaluations"
                    )
                    break
            # A signal during the last step lets the run finish: its end is as near as a checkpoint.
            stopping_now = ranks.any_rank(stop.signum is not None) and step < steps
            saved = save(epoch_ended, stopping_now)
            if stopping_now:
                metrics.close()
                raise SystemExit(stopped_by_signal(stop.signum, step, steps, saved, output_dir))
            if step == steps:
                break
    # The end's samples, unless its evaluation took them (or the run it resumes did).
    sampler.write(sampler.generate(state.step))
    checkpoints.settle()
    metrics.close()
    if val_examples:
        return state.val_loss
    # The file also holds the rows before a resume; a process that writes none has its own.
    return late_loss(read_metrics(metrics_path) if writes else metrics.rows)


def check_nonfinite(result: StepResult, step: int, skipped: int, params: FullFinetuneParams) -> str:
    """The line reporting a skipped non-finite step; raises once more than allowed were skipped."""
    what = f"step {step}: loss {result.loss}, grad_norm {result.grad_norm}"
    allowed = params.skip_nonfinite_steps
    if skipped > allowed:
        raise UserError(
            f"{what} is not finite; stopped with the weights of the step before "
            f"({skipped - 1} such steps skipped, skip_nonfinite_steps={allowed}); lower lr, "
            "check the data, or set skip_nonfinite_steps=N"
        )
    return f"{what} is not finite; skipped the update ({skipped}/{allowed} allowed)"
