"""Activation checkpointing and torch.compile change how the model runs, never what it computes:
the same losses as a plain run, and (for checkpointing) fewer activations kept for backward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from finetune.config import FullFinetuneParams, LoraConfig
from finetune.lora import apply_lora
from finetune.loss import chunked_cross_entropy
from finetune.model import Llama
from finetune.parallel import apply_activation_checkpointing
from finetune.recipes import full
from finetune.recipes import lora as lora_recipe
from tests.conftest import SMALL_MODEL, logged_losses, small_params

# A high, constant learning rate, so that the three steps visibly change the weights.
STEPS = ["max_steps=3", "lr=1e-2", "warmup_steps=0"]
LORA = ["recipe=lora", "lora.rank=4", "lora.alpha=8", "lora.targets=[q_proj,v_proj,down_proj]"]


def params(checkpoint: Path, out: Path, *overrides: str) -> FullFinetuneParams:
    return small_params(checkpoint, out, *STEPS, *overrides)


def losses(run: Callable[[FullFinetuneParams], float], p: FullFinetuneParams) -> list[float]:
    run(p)
    return [loss for _, loss in logged_losses(Path(p.output_dir))]


@pytest.mark.parametrize(
    ("run", "overrides"),
    [(full.run, []), (lora_recipe.run, [*LORA, "lora.dropout=0.3", "save_merged=false"])],
    ids=["full", "lora_with_dropout"],
)
def test_activation_checkpointing_gives_the_same_losses(
    run: Callable, overrides: list[str], small_checkpoint: Path, tmp_path: Path
) -> None:
    plain = losses(run, params(small_checkpoint, tmp_path / "plain", *overrides))
    checkpointed = losses(
        run,
        params(small_checkpoint, tmp_path / "ac", *overrides, "activation_checkpointing=true"),
    )
    assert len(plain) == 3
    # Recomputation replays the same ops (and, non-reentrant, the same dropout masks) in the
    # same order: the results agree to rounding.
    assert checkpointed == pytest.approx(plain, rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_compile_after_checkpointing_gives_the_same_losses(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    # One case, the hardest combination (~30 s, most of it compiling): LoRA adapters inside
    # checkpointed, compiled blocks. Dropout off: compiled code draws its random numbers from
    # another generator than eager code does, so masks would differ.
    overrides = [*LORA, "lora.dropout=0", "save_merged=false", "activation_checkpointing=true"]
    run = lora_recipe.run
    plain = losses(run, params(small_checkpoint, tmp_path / "plain", *overrides))
    compiled = losses(
        run, params(small_checkpoint, tmp_path / "compiled", *overrides, "compile=true")
    )
    assert compiled == pytest.approx(plain, abs=1e-4)


def saved_bytes(model: Llama, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one loss."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.hidden_states(tokens)
        loss = chunked_cross_entropy(hidden, model.output_weight(), tokens)
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_keeps_far_fewer_activations(lora: bool) -> None:
    torch.manual_seed(0)
    model = Llama(SMALL_MODEL)
    model.init_weights()
    if lora:
        apply_lora(model, LoraConfig(targets=["q_proj", "v_proj", "down_proj"]))
    tokens = torch.randint(0, SMALL_MODEL.vocab_size, (4, 128))
    plain = saved_bytes(model, tokens)
    apply_activation_checkpointing(model)
    # The checkpoint's own saves (each block's input) pass through the hooks too: this counts
    # what stays alive until backward, not just what the ops inside the blocks would have saved.
    checkpointed = saved_bytes(model, tokens)
    assert checkpointed < plain / 3, (checkpointed, plain)
