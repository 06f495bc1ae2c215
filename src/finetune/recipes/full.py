"""Full fine-tuning: every weight of the model trains. `python -m finetune recipe=full`."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import ranks
from finetune.config import FullFinetuneParams
from finetune.metrics import plot_metrics
from finetune.model import Llama
from finetune.outputs import model_bytes
from finetune.runs import explains_out_of_memory, load_model, log_model, save_model, start_run
from finetune.training import train


def memory_tips(params: FullFinetuneParams) -> list[str]:
    """What this recipe adds to the out-of-memory advice: LoRA trains a fraction of the weights."""
    return ["recipe=lora"]


@explains_out_of_memory(memory_tips)
def run(params: FullFinetuneParams) -> float:
    """Fine-tune `params.checkpoint` on `params.dataset`; returns the final validation loss
    (the training loss when there is no validation data)."""
    device, tokenizer, examples = start_run(params)
    # fp32 master weights in every run; bf16 runs autocast the compute (see training.autocast).
    model = load_model(params, device, torch.float32)
    log_model(model, params, len(examples))

    final_loss = train(model, examples, params, tokenizer, saved_bytes(model, params))

    out_dir = Path(params.output_dir)
    save_model(model, params, tokenizer, out_dir / "model")
    if ranks.writes_files():
        plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
    return final_loss


def saved_bytes(model: Llama, params: FullFinetuneParams) -> int:
    """The size of what `run` saves once trained: the model."""
    return model_bytes(model, params)
