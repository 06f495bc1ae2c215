"""What is applied to a built model before training: activation checkpointing, then compile.

The order is fixed (as in torchtitan's `parallelize_llama`): checkpointing first, so that each
compiled block contains its checkpoint region and the compiler sees which activations are
recomputed in the backward pass; compiling first and checkpointing the compiled call would hide
that from the compiler, and it could save the very activations checkpointing means to drop.
"""

from __future__ import annotations

from finetune.config import FullFinetuneParams
from finetune.model import Llama


def prepare_model(model: Llama, params: FullFinetuneParams) -> None:
    """Apply `params.activation_checkpointing` and `params.compile` to `model` in place, after
    its weights are loaded and its adapters applied (the compiled code must see the final
    modules)."""
    if params.activation_checkpointing:
        apply_activation_checkpointing(model)
    if params.compile:
        apply_compile(model)


def apply_activation_checkpointing(model: Llama) -> None:
    """Keep only each block's input for the backward pass and recompute the rest there: the
    saved activations shrink from every intermediate of every block to one tensor per block,
    for about one more forward pass of compute."""
    for block in model.layers:
        block.checkpoint_activations = True


def apply_compile(model: Llama) -> None:
    """Compile each block in place (`Module.compile`, so parameter names do not change).

    Block by block rather than the whole model: the blocks are identical, so one compiled graph
    serves them all and compile time does not grow with the depth; the embedding and the chunked
    loss stay eager.
    """
    for block in model.layers:
        block.compile()
