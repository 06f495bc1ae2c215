"""Evaluation: the loss and perplexity of a model on a dataset, computed as training's validation
loss (`training.evaluate`: the same tokenization, masking and batches, token-weighted).

    python -m finetune recipe=eval checkpoint=outputs/.../model dataset.path=data.jsonl
    python -m finetune recipe=eval checkpoint=BASE adapter=outputs/.../adapter dataset.val_split=0.1

With `dataset.val_path` or `dataset.val_split` it reads the validation part, split exactly as
training splits it (val_split with the same `seed`), so the loss is the run's final val_loss;
without either, every example of `dataset.path`. Writes eval.json to the run directory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from finetune.config import DType, EvalParams
from finetune.data import IGNORE_INDEX, Example, load_dataset, split_examples
from finetune.inference import load_for_inference
from finetune.outputs import check_writable
from finetune.provenance import device_name, record_provenance, start_hashing
from finetune.runs import load_tokenizer, resolve_device, seed_everything
from finetune.tokenizer import Tokenizer
from finetune.training import evaluate

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


def run(params: EvalParams) -> float:
    """Write and print the loss of `params.checkpoint` (with `params.adapter`) on the data;
    returns the loss."""
    check_writable(Path(params.output_dir))
    start_hashing(params)  # for provenance.json, while the data and the model load
    seed_everything(params.seed)
    device = resolve_device(params.device)
    tokenizer = load_tokenizer(params)
    examples, data = evaluated_examples(params, tokenizer)
    model = load_for_inference(params, device, weights_dtype(params), params.adapter)
    loss = evaluate(model, examples, params, tokenizer.pad_id)
    result = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": sum(labelled_tokens(e) for e in examples),
        "examples": len(examples),
        "data": data,
        "checkpoint": params.checkpoint,
        "adapter": params.adapter or None,
    }
    record_provenance(params, device_name(device))
    path = Path(params.output_dir) / EVAL_FILE
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"loss {loss:.4f} perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
        f"of {len(examples)} examples ({data})",
        flush=True,
    )
    log.info("written to %s", path)
    return loss


def evaluated_examples(params: EvalParams, tokenizer: Tokenizer) -> tuple[list[Example], str]:
    """(the examples evaluated, which data they are): the validation part, as training reads
    and splits it (see `runs.split_validation`), when there is one; else all of dataset.path."""
    cfg = params.dataset
    if cfg.val_path:
        return load_dataset(cfg, tokenizer, params.max_seq_len, path=cfg.val_path), cfg.val_path
    examples = load_dataset(cfg, tokenizer, params.max_seq_len)
    if not cfg.val_split:
        return examples, cfg.path
    _, validation = split_examples(examples, cfg.val_split, params.seed)
    return validation, f"{cfg.path}, val_split={cfg.val_split} with seed={params.seed}"


def weights_dtype(params: EvalParams) -> torch.dtype:
    """The dtype training held the weights in: fp32, but a bf16 LoRA run keeps its frozen base in
    bf16 (recipes/lora.py). bf16 runs also autocast, in `evaluate`, as training does."""
    if params.adapter and params.dtype is DType.bf16:
        return torch.bfloat16
    return torch.float32


def labelled_tokens(example: Example) -> int:
    """The tokens whose prediction counts in the loss (a position predicts the next label)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])
