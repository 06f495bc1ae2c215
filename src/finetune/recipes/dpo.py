"""Preference tuning with DPO: `python -m finetune recipe=dpo`, every weight trained or, with
`dpo.lora=true`, LoRA adapters.

    python -m finetune recipe=dpo checkpoint=outputs/.../model dataset=preference \\
        dataset.path=prefs.jsonl dpo.beta=0.1

Each pair's loss compares how much more likely the trained model (the policy) makes each answer
than the reference model (the checkpoint as loaded) does, over the answer tokens:
h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), and
sigmoid: -log sigmoid(beta h) (with label smoothing e: -(1 - e) log sigmoid(beta h) -
e log sigmoid(-beta h)); ipo: (h - 1 / (2 beta))^2; hinge: max(0, 1 - beta h).
The rewards logged are beta (log pi - log ref) of each answer.

The reference never costs a second model in memory. With LoRA it is the same model with its
adapters disabled: one more forward pass per step, without gradients. With full fine-tuning the
reference log-probabilities of every pair are computed in one pass before training and kept in
`reference_logps.json` in the run directory, which a resumed run reads back.

Writes `model/` (with LoRA: the adapters merged in) and, with LoRA, `adapter/` in PEFT's layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune import ranks
from finetune.config import DPOConfig, DPOParams, DType
from finetune.data import IGNORE_INDEX
from finetune.lora import apply_lora, lora_modules, merge_lora
from finetune.metrics import plot_metrics
from finetune.model import Llama
from finetune.outputs import model_bytes, written_by_rank_zero
from finetune.peft_format import save_adapter
from finetune.preference import PreferenceBatch, PreferencePair, collate_pairs, load_pairs
from finetune.runs import (
    explains_out_of_memory,
    load_model,
    log_model,
    save_model,
    split_validation,
    start_run,
)
from finetune.training import autocast, on_device, train

log = logging.getLogger(__name__)

# Beside the run's other files: the reference log-probabilities of full fine-tuning.
REFERENCE_FILE = "reference_logps.json"


def memory_tips(params: DPOParams) -> list[str]:
    """What this recipe adds to the out-of-memory advice: adapters, then a 4-bit base."""
    if not params.dpo.lora:
        return ["dpo.lora=true"]
    return [] if params.lora.quantize_base else ["lora.quantize_base=true"]


@explains_out_of_memory(memory_tips)
def run(params: DPOParams) -> float:
    """Tune `params.checkpoint` on the preference pairs of `params.dataset`; returns the final
    validation loss (the training loss when there is no validation data)."""
    device, tokenizer, pairs = start_run(params, load=load_pairs)
    model = load_policy(params, device)
    log_model(model, params, len(pairs))
    pairs, val_pairs = split_validation(pairs, params, tokenizer, load=load_pairs)
    if not params.dpo.lora:
        attach_reference_logps(model, pairs + val_pairs, params, tokenizer.pad_id)

    final_loss = train(
        model,
        pairs,
        params,
        tokenizer,
        saved_bytes(model, params),
        loss_fn=partial(dpo_loss, cfg=params.dpo),
        collate=collate_pairs,
        val_examples=val_pairs,
    )

    out_dir = Path(params.output_dir)
    if params.dpo.lora:
        with written_by_rank_zero(out_dir / "adapter") as tmp:
            save_adapter(model, tmp, params.checkpoint, params.lora)
        merge_lora(model)
    save_model(model, params, tokenizer, out_dir / "model")
    if ranks.writes_files():
        plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png")
    return final_loss


def load_policy(params: DPOParams, device: torch.device) -> Llama:
    """The model to train: fp32 weights, or with LoRA a frozen base (bf16 under dtype=bf16, as
    recipe=lora keeps it) with fp32 adapters."""
    if not params.dpo.lora:
        return load_model(params, device, torch.float32)
    base_dtype = torch.bfloat16 if params.dtype is DType.bf16 else torch.float32
    return load_model(params, device, base_dtype, adapt=partial(apply_lora, cfg=params.lora))


def saved_bytes(model: Llama, params: DPOParams) -> int:
    """The size of what `run` saves: the model, and with LoRA the adapters' fp32 weights."""
    adapter = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return model_bytes(model, params) + (adapter if params.dpo.lora else 0)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    cfg: DPOConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) of each pair, from the summed log-probabilities of
    its answers, each (pairs,); the rewards carry no gradient."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if cfg.loss == "sigmoid":
        smoothing = cfg.label_smoothing
        losses = -(1 - smoothing) * F.logsigmoid(cfg.beta * h) - smoothing * F.logsigmoid(
            -cfg.beta * h
        )
    elif cfg.loss == "ipo":
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - cfg.beta * h)
    return losses, (cfg.beta * chosen_ratio).detach(), (cfg.beta * rejected_ratio).detach()


def dpo_loss(
    model: Llama, batch: PreferenceBatch, cfg: DPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss of the batch's pairs, and its metrics summed over them (training.LossFn)."""
    policy = sequence_logps(model, batch.inputs, batch.targets)
    reference = batch.reference_logps
    if reference is None:  # LoRA: the base model is the reference
        with torch.no_grad(), adapters_disabled(model):
            reference = sequence_logps(model, batch.inputs, batch.targets)
    n = len(policy) // 2
    losses, chosen, rejected = preference_losses(
        policy[:n], policy[n:], reference[:n], reference[n:], cfg
    )
    # A process's stand-in rows (see training.collated) have no labels, and count for nothing.
    keep = batch.labelled_pairs().to(losses.dtype)
    logps = policy.detach()
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracy": (chosen > rejected).to(losses.dtype),
        "rewards/margin": chosen - rejected,
        "logps/chosen": logps[:n],
        "logps/rejected": logps[n:],
    }
    return (losses * keep).sum(), {name: (v * keep).sum() for name, v in metrics.items()}


def sequence_logps(model: Llama, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows,) fp32: the summed log-probability of each row's labelled tokens.

    One call of the model per row, cut after its last label: its fused, chunked loss gives the
    sum without the logits of a whole batch, and no padding runs through the model. A row with
    no label (a stand-in) runs whole, so that every process makes the same calls.
    """
    logps = []
    for row_inputs, row_targets in zip(inputs, targets, strict=True):
        labelled = (row_targets != IGNORE_INDEX).nonzero()
        end = int(labelled[-1]) + 1 if len(labelled) else len(row_targets)
        logps.append(-model(row_inputs[None, :end], row_targets[None, :end]))
    return torch.stack(logps)


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The model as its base alone, without a copy: each LoRA layer answers with its frozen
    layer, and an adapted lm_head gives the loss its base weight. The adapters are set aside,
    not changed, and back when the block ends."""
    modules = list(lora_modules(model).values())
    for module in modules:
        # Instance attributes shadow the methods that nn.Module's call and Llama.output_weight
        # look up.
        module.forward = module.base.__call__
        module.effective_weight = module.base_weight
    try:
        yield
    finally:
        for module in modules:
            del module.forward
            del module.effective_weight


# --------------------------------------------------------------------------------------------
# The reference of full fine-tuning
# --------------------------------------------------------------------------------------------


def attach_reference_logps(
    model: Llama, pairs: list[PreferencePair], params: DPOParams, pad_id: int
) -> None:
    """Give every pair the reference model's log-probabilities of its answers: read from the
    run directory's REFERENCE_FILE when it holds those of these pairs, this checkpoint and dtype
    (a resumed run), else computed by `model`, which must be the reference still."""
    path = Path(params.output_dir) / REFERENCE_FILE
    key = reference_key(pairs, params)
    logps = cached_reference_logps(path, key)
    if logps is None:
        logps = compute_reference_logps(model, pairs, params, pad_id)
        if ranks.writes_files():
            path.write_text(json.dumps({"key": key, "logps": logps}))
        log.info("reference log-probabilities of %d pairs saved to %s", len(pairs), path)
    else:
        log.info("reference log-probabilities of %d pairs read from %s", len(pairs), path)
    for pair, (chosen, rejected) in zip(pairs, logps, strict=True):
        pair.reference_logps = (chosen, rejected)


def reference_key(pairs: list[PreferencePair], params: DPOParams) -> str:
    """What the reference log-probabilities depend on: the checkpoint, the dtype, the pairs."""
    digest = hashlib.sha256(f"{params.checkpoint}\n{params.dtype.value}\n".encode())
    for pair in pairs:
        for example in (pair.chosen, pair.rejected):
            digest.update(json.dumps([example.tokens, example.labels]).encode())
    return digest.hexdigest()


def cached_reference_logps(path: Path, key: str) -> list[list[float]] | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # a file cut short: computed again
        return None
    return saved["logps"] if isinstance(saved, dict) and saved.get("key") == key else None


def compute_reference_logps(
    model: Llama, pairs: list[PreferencePair], params: DPOParams, pad_id: int
) -> list[list[float]]:
    """[chosen, rejected] of every pair, by the model as it is now, as training computes them."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logps: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(pairs), params.batch_size):
            chunk = pairs[start : start + params.batch_size]
            batch = on_device(collate_pairs(chunk, pad_id, params.pad_to_multiple_of), device)
            with autocast(device, params.dtype):
                rows = sequence_logps(model, batch.inputs, batch.targets).tolist()
            n = len(chunk)
            logps += [[c, r] for c, r in zip(rows[:n], rows[n:], strict=True)]
    model.train(was_training)
    return logps
