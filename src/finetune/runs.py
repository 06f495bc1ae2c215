"""A run's start and end around the training loop: the checks and loading before it (seed,
device, tokenized data, validation split), and the model saved after it, with the out-of-memory
advice that wraps a whole recipe."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import torch

from finetune import ranks
from finetune.chat_format import LLAMA2_CHAT_TEMPLATE
from finetune.checkpoint import load_checkpoint, load_sharded_weights, output_dtype
from finetune.config import CheckpointParams, Device, DType, FullFinetuneParams, OutputFormat
from finetune.data import ALPACA_CHAT_TEMPLATE, Example, load_dataset, split_examples
from finetune.distributed import local_device, shard_model
from finetune.errors import UserError
from finetune.hf_format import save_hf
from finetune.lora import init_adapters
from finetune.meta_format import save_meta
from finetune.model import Llama, count_parameters
from finetune.outputs import check_no_finished_run, check_writable, written_by_rank_zero
from finetune.parallel import prepare_model
from finetune.provenance import start_hashing
from finetune.tokenizer import Tokenizer
from finetune.training_state import check_resume_before_loading, is_resuming

log = logging.getLogger(__name__)
P = TypeVar("P", bound=FullFinetuneParams)

# The chat template a saved model carries, by the `dataset.format` it was trained on: its prompt
# format, for `apply_chat_template` and chat endpoints.
CHAT_TEMPLATES = {"alpaca": ALPACA_CHAT_TEMPLATE, "chat": LLAMA2_CHAT_TEMPLATE}


# How a recipe reads its data: (dataset config, tokenizer, max_seq_len, path; "" for
# dataset.path) -> examples. Instruction data by default; preference pairs have their own.
LoadData = Callable[[Any, Tokenizer, int, str], list]


def start_run(
    params: FullFinetuneParams, load: LoadData = load_dataset
) -> tuple[torch.device, Tokenizer, list[Example]]:
    """What every recipe does first: seed, pick the device, tokenize the data (read by `load`)."""
    check_writable(Path(params.output_dir))
    if not is_resuming(params.resume):  # a resumed run is meant to replace its model
        check_no_finished_run(Path(params.output_dir))
    check_resume_before_loading(params.resume, Path(params.output_dir))
    if ranks.writes_files():
        start_hashing(params)  # for provenance.json, while the data and the model load
    seed_everything(params.seed)
    device = resolve_device(params.device)
    tokenizer = load_tokenizer(params)
    examples = load(params.dataset, tokenizer, params.max_seq_len, "")
    return device, tokenizer, examples


def load_tokenizer(params: CheckpointParams) -> Tokenizer:
    """`params.tokenizer`, which must fit the model's embedding (and gives Meta's checkpoints,
    whose params.json leaves the vocabulary to it, their vocab_size)."""
    tokenizer = Tokenizer(Path(params.tokenizer))
    if not params.model.vocab_size:
        params.model = dataclasses.replace(params.model, vocab_size=tokenizer.vocab_size)
    tokenizer.check_vocab(params.model.vocab_size)
    return tokenizer


def load_model(
    params: CheckpointParams,
    device: torch.device,
    dtype: torch.dtype,
    adapt: Callable[[Llama], None] | None = None,
) -> Llama:
    """The model to train: `params.checkpoint` in `dtype`, changed by the recipe's `adapt` (e.g.
    adapters added), then prepared (activation checkpointing, compile). Generation and
    evaluation load it the same way on one process, with nothing to prepare: no backward pass.

    On one process the checkpoint is loaded whole. On several, the model is built on the meta
    device, adapted, prepared and sharded (distributed.shard_model), and only then does each
    process read its own rows of each weight: no process ever holds the whole model.
    """
    if ranks.world_size() == 1:
        model = load_checkpoint(params.model, Path(params.checkpoint), device, dtype)
        if adapt:
            adapt(model)
        if isinstance(params, FullFinetuneParams):
            prepare_model(model, params)
        return model
    assert isinstance(params, FullFinetuneParams)  # only training runs on several processes
    with torch.device("meta"):
        model = Llama(params.model).to(dtype)
    if adapt:
        adapt(model)
    prepare_model(model, params)
    shard_model(model, params)
    load_sharded_weights(model, Path(params.checkpoint))
    # Adapters added on the meta device have no values yet; they start from the loaded base.
    init_adapters(model)
    return model


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
    """The model in Hugging Face format (and Meta's with output_format=meta), in output_dtype.
    Every process calls it: a sharded model is gathered to rank 0, which writes."""
    dtype = output_dtype(params.output_dtype, Path(params.checkpoint))
    # Atomic, so a rerun in the same directory that fails (disk full) keeps the earlier model.
    with written_by_rank_zero(out_dir) as tmp:
        save_hf(
            model,
            tmp,
            tokenizer=tokenizer.path,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            dtype=dtype,
            max_shard_bytes=params.max_shard_size_mb * 1_000_000,
            chat_template=CHAT_TEMPLATES[params.dataset.format],
        )
    if ranks.writes_files():
        log.info("model saved to %s (%s)", out_dir, str(dtype).removeprefix("torch."))
    if params.output_format is OutputFormat.meta:
        meta_dir = out_dir.with_name(out_dir.name + "_meta")
        with written_by_rank_zero(meta_dir) as tmp:
            save_meta(model, tmp, tokenizer.path, dtype)
        if ranks.writes_files():
            log.info("Meta format copy saved to %s", meta_dir)


def explains_out_of_memory(
    recipe_tips: Callable[[P], list[str]],
) -> Callable[[Callable[[P], float]], Callable[[P], float]]:
    """Turn a recipe's GPU out-of-memory error into one line naming the settings that lower
    memory: those of every run, and the recipe's own (`recipe_tips(params)`). Checkpoints
    already saved stay as they are."""

    def decorate(run: Callable[[P], float]) -> Callable[[P], float]:
        @wraps(run)
        def recipe(params: P) -> float:
            try:
                return run(params)
            except torch.OutOfMemoryError as error:
                message = out_of_memory_message(params, str(error), recipe_tips(params))
                raise UserError(message) from None

        return recipe

    return decorate


def out_of_memory_message(params: FullFinetuneParams, error: str, recipe_tips: list[str]) -> str:
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
    tips += recipe_tips
    tips.append(f"a max_seq_len below {params.max_seq_len}")
    return f"{what}; settings that lower memory: {', '.join(tips)}"


def resolve_device(device: Device) -> torch.device:
    if device is Device.cuda and not torch.cuda.is_available():
        raise UserError("device: cuda was requested but no CUDA device is available")
    if device is Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return local_device()  # this process's GPU, when there is one per process


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def split_validation(
    examples: list[Example],
    params: FullFinetuneParams,
    tokenizer: Tokenizer,
    load: LoadData = load_dataset,
) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples: `dataset.val_split` of `examples`, or `dataset.val_path`.

    Empty validation when neither is set. The validation file is tokenized by `tokenizer`, as the
    training data was.
    """
    cfg = params.dataset
    if cfg.val_split:
        train_examples, val_examples = split_examples(examples, cfg.val_split, params.seed)
    elif cfg.val_path:
        train_examples = examples
        val_examples = load(cfg, tokenizer, params.max_seq_len, cfg.val_path)
    else:
        return examples, []
    log.info(
        "training on %d examples, validating on %d (%s)",
        len(train_examples),
        len(val_examples),
        cfg.val_path or f"val_split={cfg.val_split}",
    )
    return train_examples, val_examples
