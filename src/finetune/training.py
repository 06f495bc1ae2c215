"""The pieces every recipe shares: device and precision, loss, optimizer, schedule, the loop."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import OmegaConf

from finetune.chat_format import LLAMA2_CHAT_TEMPLATE
from finetune.checkpoint import output_dtype
from finetune.config import (
    RECIPE_PARAMS,
    Device,
    DType,
    FullFinetuneParams,
    LoraFinetuneParams,
    OutputFormat,
)
from finetune.data import Batch, Example, batches, epoch_order, load_dataset, split_examples
from finetune.errors import UserError
from finetune.hf_format import save_hf
from finetune.interrupts import StopRequest, stopped_by_signal
from finetune.lora import output_weight
from finetune.loss import chunked_cross_entropy
from finetune.meta_format import save_meta
from finetune.metrics import MetricsLog, drop_rows_after, late_loss, read_metrics
from finetune.model import Llama, count_parameters
from finetune.outputs import (
    atomic_directory,
    check_free_space,
    check_no_finished_run,
    check_writable,
)
from finetune.state import (
    TrainingState,
    capture_rng,
    check_no_later_checkpoints,
    check_resume_before_loading,
    checkpoint_dirs,
    find_checkpoint,
    is_resuming,
    latest_checkpoint_note,
    load_checkpoint_state,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    step_dir,
)
from finetune.sweep import job_prefix
from finetune.tokenizer import Tokenizer

log = logging.getLogger(__name__)
P = TypeVar("P", bound=FullFinetuneParams)


def start_run(params: FullFinetuneParams) -> tuple[torch.device, Tokenizer, list[Example]]:
    """What every recipe does first: seed, pick the device, tokenize the data."""
    check_writable(Path(params.output_dir))
    if not is_resuming(params.resume):  # a resumed run is meant to replace its model
        check_no_finished_run(Path(params.output_dir))
    check_resume_before_loading(params.resume, Path(params.output_dir))
    seed_everything(params.seed)
    device = resolve_device(params.device)
    tokenizer = Tokenizer(Path(params.tokenizer))
    if not params.model.vocab_size:  # Meta's params.json leaves it to the tokenizer
        params.model = dataclasses.replace(params.model, vocab_size=tokenizer.vocab_size)
    tokenizer.check_vocab(params.model.vocab_size)
    examples = load_dataset(params.dataset, tokenizer, params.max_seq_len)
    return device, tokenizer, examples


def log_model(model: Llama, params: FullFinetuneParams, n_examples: int) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "%s: %.1fM parameters (%.2fM trainable) on %s, %s; %d examples from %s",
        params.checkpoint,
        count_parameters(model) / 1e6,
        trainable / 1e6,
        next(model.parameters()).device,
        params.dtype.value,
        n_examples,
        params.dataset.path,
    )


def save_model(
    model: Llama, params: FullFinetuneParams, tokenizer: Tokenizer, out_dir: Path
) -> None:
    """The model in Hugging Face format (and Meta's with output_format=meta), in output_dtype."""
    dtype = output_dtype(params.output_dtype, Path(params.checkpoint))
    # Atomic, so a rerun in the same directory that fails (disk full) keeps the earlier model.
    with atomic_directory(out_dir) as tmp:
        save_hf(
            model,
            tmp,
            tokenizer=tokenizer.path,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            dtype=dtype,
            max_shard_bytes=params.max_shard_size_mb * 1_000_000,
            chat_template=LLAMA2_CHAT_TEMPLATE if params.dataset.format == "chat" else "",
        )
    log.info("model saved to %s (%s)", out_dir, str(dtype).removeprefix("torch."))
    if params.output_format is OutputFormat.meta:
        meta_dir = out_dir.with_name(out_dir.name + "_meta")
        with atomic_directory(meta_dir) as tmp:
            save_meta(model, tmp, tokenizer.path, dtype)
        log.info("Meta format copy saved to %s", meta_dir)


def explains_out_of_memory(run: Callable[[P], float]) -> Callable[[P], float]:
    """Turn a recipe's GPU out-of-memory error into one line naming the settings that lower
    memory. Checkpoints already saved stay as they are."""

    @wraps(run)
    def recipe(params: P) -> float:
        try:
            return run(params)
        except torch.OutOfMemoryError as error:
            raise UserError(out_of_memory_message(params, str(error))) from None

    return recipe


def out_of_memory_message(params: FullFinetuneParams, error: str) -> str:
    tried = re.search(r"Tried to allocate [\d.]+ \w+", error)
    what = f"out of GPU memory ({tried.group(0)})" if tried else "out of GPU memory"
    tips = []
    batch, accumulation = params.batch_size, params.gradient_accumulation_steps
    if batch > 1:
        smaller = batch // 2 if batch % 2 == 0 else 1
        tips.append(
            f"batch_size={smaller} with gradient_accumulation_steps="
            f"{accumulation * batch // smaller} (the same effective batch)"
        )
    if not params.activation_checkpointing:
        tips.append("activation_checkpointing=true")
    if params.dtype is not DType.bf16:
        tips.append("dtype=bf16")
    if not isinstance(params, LoraFinetuneParams):
        tips.append("recipe=lora")
    elif not params.lora.quantize_base:
        tips.append("lora.quantize_base=true")
    tips.append(f"a max_seq_len below {params.max_seq_len}")
    return f"{what}; settings that lower memory: {', '.join(tips)}"


def resolve_device(device: Device) -> torch.device:
    if device is Device.cuda and not torch.cuda.is_available():
        raise UserError("device: cuda was requested but no CUDA device is available")
    if device is Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast(device: torch.device, dtype: DType) -> AbstractContextManager:
    """bf16 runs compute in bf16 while weights and optimizer state stay fp32.

    Pure bf16 weights would lose most AdamW updates at fine-tuning learning rates (a 2e-5 step
    is below bf16's resolution for weights of magnitude > 1e-2).
    """
    if dtype is DType.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices, not on norm weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is one pass over the parameters; on the CPU it is ~8x faster than the
    # default multi-tensor AdamW.
    return torch.optim.AdamW(groups, lr=lr, fused=True)


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


def optimizer_steps(
    examples: list[Example],
    params: FullFinetuneParams,
    pad_id: int,
    start_epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[tuple[int, list[Batch]]]:
    """(epoch, the micro-batches of one optimizer step), over every epoch.

    Starts at micro-batch `start_batch` of `start_epoch` (a resumed run): the order is rebuilt
    from (seed, epoch) and the consumed part sliced off, so nothing skipped is collated.
    """
    for epoch in range(start_epoch, params.epochs):
        order = epoch_order(len(examples), params.shuffle, params.seed, epoch)
        if epoch == start_epoch:
            order = order[start_batch * params.batch_size :]
        group: list[Batch] = []
        for batch in batches(examples, params.batch_size, pad_id, order, params.pad_to_multiple_of):
            group.append(batch)
            if len(group) == params.gradient_accumulation_steps:
                yield epoch, group
                group = []
        if group:
            yield epoch, group


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    n_tokens: int  # non-padding input tokens
    finite: bool = True  # False: NaN/inf loss or gradient, and the weights were not updated


def train_step(
    model: Llama,
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    params: FullFinetuneParams,
    device: torch.device,
) -> StepResult:
    """One optimizer step over `micro_batches`, the loss averaged over all their labelled tokens."""
    n_targets = max(1, sum(b.n_targets for b in micro_batches))
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        inputs = batch.inputs.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        with autocast(device, params.dtype):
            hidden = model.hidden_states(inputs)
            loss = chunked_cross_entropy(hidden, output_weight(model), targets)
        (loss / n_targets).backward()
        loss_sum += loss.detach()
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = params.max_grad_norm or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    loss, norm = float(loss_sum) / n_targets, float(grad_norm)
    # Checked before the update: one NaN gradient would turn every weight it reaches into NaN.
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_tokens = sum(b.n_tokens for b in micro_batches)
    return StepResult(loss, norm, n_tokens, finite)


def split_validation(
    examples: list[Example], params: FullFinetuneParams
) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples: `dataset.val_split` of `examples`, or `dataset.val_path`.

    Empty validation when neither is set. The validation file is tokenized like the training one.
    """
    cfg = params.dataset
    if cfg.val_split:
        train_examples, val_examples = split_examples(examples, cfg.val_split, params.seed)
    elif cfg.val_path:
        tokenizer = Tokenizer(Path(params.tokenizer))
        train_examples = examples
        val_examples = load_dataset(cfg, tokenizer, params.max_seq_len, path=cfg.val_path)
    else:
        return examples, []
    log.info(
        "training on %d examples, validating on %d (%s)",
        len(train_examples),
        len(val_examples),
        cfg.val_path or f"val_split={cfg.val_split}",
    )
    return train_examples, val_examples


def evaluate(
    model: Llama, examples: list[Example], params: FullFinetuneParams, pad_id: int
) -> float:
    """Mean loss over every labelled token of `examples`, weights and training RNG untouched.

    Token-weighted like the training loss, so the two are on the same scale and batch size does
    not change the result. Eval mode turns off (LoRA) dropout: its masks would add noise to the
    result and draw from the global RNG, changing the masks of the training steps that follow.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_targets = 0
    order = list(range(len(examples)))
    with torch.no_grad():
        # Detached: the loss computes its gradients in the forward pass for every input that
        # requires them, which no_grad alone does not switch off.
        weight = output_weight(model).detach()
        for batch in batches(examples, params.batch_size, pad_id, order, params.pad_to_multiple_of):
            with autocast(device, params.dtype):
                hidden = model.hidden_states(batch.inputs.to(device, non_blocking=True))
                targets = batch.targets.to(device, non_blocking=True)
                loss_sum += chunked_cross_entropy(hidden, weight, targets)
            n_targets += batch.n_targets
    model.train(was_training)
    if n_targets == 0:
        raise UserError("the validation data has no labelled tokens to compute a loss on")
    return float(loss_sum) / n_targets


def should_stop_early(state: TrainingState, val_loss: float, patience: int) -> bool:
    """Record a validation pass after `state.step`; True once `patience` passes in a row have not
    improved on the best val_loss (patience 0 never stops). The counters live in the checkpointed
    state, so a resumed run stops where an uninterrupted one would."""
    state.val_loss = val_loss
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = (
            val_loss,
            state.step,
            0,
        )
    else:
        state.evals_without_improvement += 1
    return 0 < patience <= state.evals_without_improvement


def train(model: Llama, examples: list[Example], params: FullFinetuneParams, pad_id: int) -> float:
    """Run the training loop on `examples`, less any held-out validation part.

    Returns the last validation loss when there is validation data (the number worth comparing
    between runs, e.g. in a sweep), else the mean training loss over the last 10 % of the steps
    (see `late_loss`): one step's loss is too noisy to compare runs by.
    """
    examples, val_examples = split_validation(examples, params)
    device = next(model.parameters()).device
    steps = total_steps(params, len(examples))
    warn_if_data_runs_out(params, len(examples))
    optimizer = build_optimizer(model, params.lr, params.weight_decay)
    output_dir = Path(params.output_dir)
    recipe = recipe_name(params)
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
    # over its own length (which may be longer than the checkpoint's run, see `resume`).
    schedule = partial(lr_multiplier, warmup_steps=params.warmup_steps, total_steps=steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=state.step - 1)
    check_no_later_checkpoints(output_dir, state.step)
    check_free_space(model, params, steps, len(checkpoint_dirs(output_dir)))
    metrics_path = output_dir / "metrics.jsonl"
    # A resumed run continues the rows of the run it resumes, less those of the steps it redoes;
    # a new run in an old run's directory starts the file afresh.
    drop_rows_after(metrics_path, state.step)
    metrics = MetricsLog(metrics_path, total_steps=steps, prefix=job_prefix())
    batches_per_epoch = math.ceil(len(examples) / params.batch_size)

    def save(epoch_ended: bool, stopping_now: bool) -> Path | None:
        every = params.save_every_n_steps
        # The last step is saved too, so that a finished run can be continued for longer.
        due = state.step % every == 0 or epoch_ended or state.step == steps if every else False
        if not (stopping_now or due):
            return None
        directory = step_dir(output_dir, state.step)
        state.rng = capture_rng()
        state.elapsed_s = metrics.elapsed()
        try:
            save_checkpoint(directory, recipe, model, optimizer, state)
        except UserError as error:
            raise UserError(f"{error}; {latest_checkpoint_note(output_dir)}") from None
        prune_checkpoints(output_dir, params.keep_last_n)
        return directory

    def validate(step: int, epoch: int) -> float:
        started = time.perf_counter()
        val_loss = evaluate(model, val_examples, params, pad_id)
        metrics.write_eval(step, epoch, val_loss, time.perf_counter() - started)
        return val_loss

    # Written only now that every input has been read and checked: a run that fails on bad input
    # leaves an earlier run's params.yaml in the same directory as it was.
    (output_dir / "params.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(params)))
    model.train()
    metrics.start(elapsed_before=state.elapsed_s)
    if state.rng:
        # Last, so that the next dropout mask is the one the interrupted run would have drawn.
        restore_rng(state.rng)
    loss, tokens_since_log = math.nan, 0
    data = optimizer_steps(examples, params, pad_id, state.epoch, state.batch_index)
    stop = StopRequest(output_dir)
    with stop.installed():
        for epoch, micro_batches in data:
            if state.step >= steps:  # resumed from the last step: nothing left to do
                break
            step = state.step + 1
            lr = scheduler.get_last_lr()[0]
            result = train_step(model, micro_batches, optimizer, params, device)
            scheduler.step()
            loss = result.loss
            tokens_since_log += result.n_tokens
            epoch_ended = advance(state, epoch, micro_batches, result.n_tokens, batches_per_epoch)
            if not result.finite:
                state.skipped_steps += 1
                metrics.say(check_nonfinite(result, step, state.skipped_steps, params))
            if step % params.log_every_n_steps == 0 or step == steps:
                metrics.write(step, epoch, loss, lr, result.grad_norm, tokens_since_log)
                tokens_since_log = 0
            every = params.eval_every_n_steps
            if val_examples and (step == steps or (every and step % every == 0)):
                val_loss = validate(step, epoch)
                if should_stop_early(state, val_loss, params.early_stopping_patience):
                    if tokens_since_log:  # the last step's row, which log_every_n_steps skipped
                        metrics.write(step, epoch, loss, lr, result.grad_norm, tokens_since_log)
                    metrics.say(
                        f"early stopping at step {step}/{steps}: val_loss has not improved on "
                        f"{state.best_val_loss:.4f} (step {state.best_step}) for "
                        f"{params.early_stopping_patience} evaluations"
                    )
                    break
            # A signal during the last step lets the run finish: its end is as near as a checkpoint.
            stopping_now = stop.signum is not None and step < steps
            saved = save(epoch_ended, stopping_now)
            if stopping_now:
                metrics.close()
                raise SystemExit(stopped_by_signal(stop.signum, step, steps, saved, output_dir))
            if step == steps:
                break
    metrics.close()
    return state.val_loss if val_examples else late_loss(read_metrics(metrics_path))


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


def recipe_name(params: FullFinetuneParams) -> str:
    return next(name for name, cls in RECIPE_PARAMS.items() if type(params) is cls)


def advance(
    state: TrainingState,
    epoch: int,
    micro_batches: list[Batch],
    n_tokens: int,
    batches_per_epoch: int,
) -> bool:
    """Record one finished optimizer step in `state`; True when it ended an epoch."""
    state.step += 1
    state.tokens_seen += n_tokens
    state.epoch = epoch
    state.batch_index += len(micro_batches)
    if state.batch_index >= batches_per_epoch:
        state.epoch, state.batch_index = epoch + 1, 0
    return state.batch_index == 0


# What a resumed run cannot change: the data order and batches (batch_size, ..., max_seq_len),
# and what the restored optimizer holds (lr, weight_decay) or the schedule's start (warmup).
RESUME_SETTINGS = (
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "shuffle",
    "max_seq_len",
    "lr",
    "weight_decay",
    "warmup_steps",
)
# What it can: the run's length, to train a finished run for longer (or end an unfinished one
# sooner). The cosine decay is then recomputed over the new length.
LENGTH_SETTINGS = ("epochs", "max_steps")


def resume_settings(params: FullFinetuneParams) -> dict[str, float | int | bool]:
    return {key: getattr(params, key) for key in RESUME_SETTINGS + LENGTH_SETTINGS}


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
    changed = [key for key in RESUME_SETTINGS if state.settings.get(key, ours[key]) != ours[key]]
    if changed:
        saved = ", ".join(f"{key}={state.settings[key]}" for key in changed)
        now = ", ".join(f"{key}={ours[key]}" for key in changed)
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
    lr = params.lr * lr_multiplier(state.step, params.warmup_steps, steps)
    return (
        f"{now} (the checkpoint's run had {was}): training runs to step {steps}; the learning "
        f"rate follows the cosine schedule of a {steps}-step run, lr {lr:.3e} at step "
        f"{state.step + 1}"
    )
