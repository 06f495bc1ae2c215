"""A model's weights laid out once for the products a decode step computes, on the CPU.

A decode step multiplies one token's activations by every weight matrix of the model, a
(1 x in) @ (in x out) product that reads the whole weight for little arithmetic. How the weights
are laid out decides how fast PyTorch's CPU kernels read them (bench/generate.py, README
Generation speed):
- q, k and v become one matrix, as do gate and up: fewer, larger products, each of which reads
  its weight faster (`fuse_projections`).
- bf16: oneDNN's kernel on a weight reordered ahead of time into oneDNN's own blocked layout ran
  about twice as fast as on the plain (out, in) weight, with the same values bit for bit (both are
  oneDNN's kernel).
- fp32: MKL's kernel on the transposed, (in, out)-contiguous weight ran 1.3-1.8x as fast for the
  matrices with at least as many outputs as inputs (q/k/v/o, gate, up, the output layer) and
  slower for the others (down), which stay as they are. The sums run in another order, so the
  products may differ in the last bits, as those of any two fp32 kernels do.
Generation lays the weights out once, when it loads the model (`lay_out_for_decoding`), and
keeps only the new copies: no extra memory. Longer inputs (a prompt) use the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.model import Attention, FeedForward


def lay_out_for_decoding(model: nn.Module) -> int:
    """Fuse `model`'s projections and lay out its linear layers, in place, for generation only
    (training needs the Parameters as they were); returns how many layers were laid out."""
    fuse_projections(model)
    return pack_linears(model)


def fuse_projections(model: nn.Module) -> int:
    """Replace each attention's q, k and v layers by one `qkv_proj`, and each feed-forward's gate
    and up by one `gate_up_proj`, where all of them are plain bias-free linear layers (not LoRA
    layers, whose adapters act on each alone); returns how many were fused."""
    fused = 0
    for module in model.modules():
        if isinstance(module, Attention):
            parts = ("q_proj", "k_proj", "v_proj")
            if all(is_plain(getattr(module, name)) for name in parts):
                module.qkv_proj = concatenated(module, parts)
                fused += 1
        elif isinstance(module, FeedForward):
            parts = ("gate_proj", "up_proj")
            if all(is_plain(getattr(module, name)) for name in parts):
                module.gate_up_proj = concatenated(module, parts)
                fused += 1
    return fused


def is_plain(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is None


def concatenated(module: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    """One linear layer whose outputs are those of `module`'s layers `names`, in that order,
    which are removed from `module`."""
    weights = [getattr(module, name).weight for name in names]
    out_features = sum(w.shape[0] for w in weights)
    layer = nn.Linear(weights[0].shape[1], out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
    for name in names:
        setattr(module, name, None)
    return layer


class PackedLinear(nn.Module):
    """The product of a bf16 `nn.Linear` without bias, its weight held in oneDNN's layout. For
    inference only: the weight is no longer a Parameter and gets no gradient."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Laid out for one row of input, a decode step.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TransposedLinear(nn.Module):
    """The product of an fp32 `nn.Linear` without bias, its weight held transposed, (in, out)
    contiguous. For inference only, as `PackedLinear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = linear.weight.detach().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight_t)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def decode_layout(linear: nn.Linear) -> type[nn.Module] | None:
    """The layer that computes `linear`'s product faster at batch 1, or None to keep it."""
    weight = linear.weight
    if type(linear) is not nn.Linear or linear.bias is not None or weight.device.type != "cpu":
        return None
    if weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        return PackedLinear
    if weight.dtype == torch.float32 and linear.out_features >= linear.in_features:
        return TransposedLinear
    return None


def pack_linears(model: nn.Module) -> int:
    """Replace the linear layers of `model` that `decode_layout` picks a layout for, in place,
    and return how many were replaced. Left as they are besides: a weight shared with another
    module (lm_head tied to the embedding: a new layout would hold the matrix twice), the base of
    a DoRA layer (DoRA reads the base weight's row norms) and a LoRA layer's adapters (rank-wide,
    so cheap whatever their layout, and fp32 beside a bf16 base)."""
    shared = shared_weights(model)
    replaced = 0
    for parent in list(model.modules()):
        if hasattr(parent, "lora_A"):  # a LoRALinear: only its base, and not DoRA's
            children = [] if parent.use_dora else [("base", parent.base)]
        else:
            children = list(parent.named_children())
        for name, child in children:
            layout = decode_layout(child) if isinstance(child, nn.Linear) else None
            if layout is not None and id(child.weight) not in shared:
                setattr(parent, name, layout(child))
                replaced += 1
    return replaced


def shared_weights(model: nn.Module) -> set[int]:
    """ids of the Parameters that more than one module holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}
