"""bf16 linear layers with their weights laid out once for oneDNN, for generating on the CPU.

A decode step multiplies one token's activations by every weight matrix of the model. For such a
(1 x in) @ (in x out) product in bf16, oneDNN's kernel on a plain row-major weight leaves much of
the machine unused; on a weight reordered ahead of time into oneDNN's own blocked layout the same
product ran about twice as fast, and gives the same values bit for bit (README, Generation
speed). Generation reorders each weight once, when it loads the model, and keeps only the
reordered copy: no extra memory. fp32 weights stay as they are: their products (MKL's) were no
faster on a reordered weight.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """The product of an `nn.Linear` without bias, its weight held in oneDNN's layout. For
    inference only: the weight is no longer a Parameter and gets no gradient."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The layout is chosen for one row of input, a decode step; longer inputs (a prompt) use
        # the same reordered weight.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def can_pack(linear: nn.Linear) -> bool:
    weight = linear.weight
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
    )


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 CPU linear layer of `model` by its `PackedLinear`, in place, and return
    how many were replaced. Left as they are: a weight shared with another module (lm_head tied
    to the embedding: packing it would hold the matrix twice) and the base of a DoRA layer (DoRA
    reads the base weight's row norms). A LoRA layer's fp32 adapters stay fp32, so unpacked."""
    shared = shared_weights(model)
    replaced = 0
    for parent in list(model.modules()):
        if getattr(parent, "use_dora", False):  # a DoRA LoRALinear
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and can_pack(child) and id(child.weight) not in shared:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced


def shared_weights(model: nn.Module) -> set[int]:
    """ids of the Parameters that more than one module holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}
