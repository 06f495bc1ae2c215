"""Full fine-tuning: every weight of the model trains. `python -m finetune recipe=full`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.checkpoint import load_hf, save_hf
from finetune.config import DType, FullFinetuneParams
from finetune.data import load_dataset
from finetune.metrics import plot_metrics
from finetune.model import count_parameters
from finetune.tokenizer import Tokenizer
from finetune.training import resolve_device, seed_everything, train

log = logging.getLogger(__name__)


def run(params: FullFinetuneParams) -> float:
    """Fine-tune `params.checkpoint` on `params.dataset`; returns the final training loss."""
    out_dir = Path(params.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(params)))
    seed_everything(params.seed)
    device = resolve_device(params.device)

    tokenizer = Tokenizer(Path(params.tokenizer))
    tokenizer.check_vocab(params.model.vocab_size)
    examples = load_dataset(params.dataset, tokenizer, params.max_seq_len)
    # fp32 master weights in every run; bf16 runs autocast the compute (see training.autocast).
    model = load_hf(params.model, Path(params.checkpoint), device, torch.float32)
    log.info(
        "%s: %.1fM parameters on %s, %s; %d examples from %s",
        params.checkpoint,
        count_parameters(model) / 1e6,
        device,
        params.dtype.value,
        len(examples),
        params.dataset.path,
    )

    final_loss = train(model, examples, params, tokenizer.pad_id)

    save_hf(
        model,
        out_dir / "model",
        tokenizer=Path(params.tokenizer),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        dtype=torch.bfloat16 if params.dtype is DType.bf16 else torch.float32,
        max_shard_bytes=params.max_shard_size_mb * 1_000_000,
    )
    plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
    log.info("final loss %.4f; model saved to %s", final_loss, out_dir / "model")
    return final_loss
