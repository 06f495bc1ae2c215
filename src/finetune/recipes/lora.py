"""LoRA fine-tuning: the base model is frozen and low-rank adapters train.

    python -m finetune recipe=lora lora.rank=16 lora.alpha=32 lr=3e-4

Writes `adapter/` in PEFT's layout and, unless `save_merged=false`, `model/`: the base with the
adapters merged in, in Hugging Face format.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from finetune import ranks
from finetune.config import DType, LoraFinetuneParams
from finetune.lora import apply_lora, merge_lora
from finetune.metrics import plot_metrics
from finetune.model import Llama
from finetune.outputs import model_bytes, written_by_rank_zero
from finetune.peft_format import load_adapter, save_adapter
from finetune.runs import explains_out_of_memory, load_model, log_model, save_model, start_run
from finetune.training import train

log = logging.getLogger(__name__)


def memory_tips(params: LoraFinetuneParams) -> list[str]:
    """What this recipe adds to the out-of-memory advice: QLoRA's 4-bit base, if not in use."""
    return [] if params.lora.quantize_base else ["lora.quantize_base=true"]


@explains_out_of_memory(memory_tips)
def run(params: LoraFinetuneParams) -> float:
    """Train adapters on `params.checkpoint`; returns the final validation loss (the training
    loss when there is no validation data)."""
    device, tokenizer, examples = start_run(params)
    # The frozen base needs no fp32 master copy: bf16 runs keep it in bf16, which halves its
    # memory and feeds the bf16 matmuls directly. The adapters and their AdamW state stay fp32.
    base_dtype = torch.bfloat16 if params.dtype is DType.bf16 else torch.float32
    model = load_model(params, device, base_dtype, adapt=partial(apply_lora, cfg=params.lora))
    if params.adapter:
        load_adapter(model, Path(params.adapter))
    log_model(model, params, len(examples))

    final_loss = train(model, examples, params, tokenizer, saved_bytes(model, params))

    out_dir = Path(params.output_dir)
    with written_by_rank_zero(out_dir / "adapter") as tmp:
        save_adapter(model, tmp, params.checkpoint, params.lora)
    if ranks.writes_files():
        log.info("adapter saved to %s", out_dir / "adapter")
    if params.save_merged:
        merge_lora(model)
        save_model(model, params, tokenizer, out_dir / "model")
    if ranks.writes_files():
        plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
    return final_loss


def saved_bytes(model: Llama, params: LoraFinetuneParams) -> int:
    """The size of what `run` saves once trained: the adapter's fp32 weights, and the merged
    model unless save_merged=false."""
    adapter = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return adapter + (model_bytes(model, params) if params.save_merged else 0)
