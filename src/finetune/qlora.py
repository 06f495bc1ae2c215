"""QLoRA (Dettmers et al., 2023; `lora.quantize_base`): the frozen linear weights of the
transformer blocks kept in 4-bit NormalFloat (torchao's `NF4Tensor`), dequantized one layer at a
time in the forward and backward passes. The adapters on top are lora.py's, unchanged, so the
adapter files are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import UserError
from finetune.model import Llama

# torchao's NF4 defaults, the QLoRA paper's: one absmax scale per 64 weights, and those scales
# quantized again to int8 in groups of 256 ("double quantization"): ~4.13 bits per weight.
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
QLORA_EXTRA = "pip install 'finetune[qlora]'"


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer whose weight is an `NF4Tensor` (QLoRA's 4-bit base).

    `weight` keeps the shape and dtype of the dense weight it replaced; dequantizing gives that
    dtype back. Only one layer's dense weight exists at a time: the forward dequantizes it for its
    matmul and drops it, and the backward dequantizes it again (see `_NF4Matmul`).
    """

    bias = None  # as nn.Linear's, for code that checks it

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dtype nn.Linear would compute in: autocast's, else the input's.
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = x.dtype
        return _NF4Matmul.apply(x.to(dtype), self.weight)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight, in the original dtype unless `dtype` is given."""
        weight = self.weight.get_original_weight()
        return weight if dtype is None else weight.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4"


class _NF4Matmul(torch.autograd.Function):
    """x @ dequantize(W).T with W kept in NF4 for the backward pass.

    F.linear on the dequantized weight would save that dense copy for backward, so by the end of
    the forward pass every layer's would be alive at once, undoing the 4-bit saving. This saves the
    NF4 weight instead and dequantizes it again in backward: one more dequantization per layer.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,  # (..., in), already in the compute dtype
        weight: torch.Tensor,  # NF4 (out, in)
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.get_original_weight().to(x.dtype))

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (weight,) = ctx.saved_tensors
        # The base is frozen: only the input's gradient, (..., out) @ (out, in).
        return grad_out @ weight.get_original_weight().to(grad_out.dtype), None


def quantize_base_weights(model: Llama) -> None:
    """Replace every linear layer of the transformer blocks by an `NF4Linear`, in place, one at a
    time so that the dense weight is freed as its NF4 copy takes its place.

    The embedding and lm_head stay dense, as in QLoRA (and transformers' bitsandbytes loading):
    they are a few percent of a Llama's weights, quantization hurts the output layer most, and the
    chunked loss multiplies by lm_head's weight directly (`Llama.output_weight`), which would
    otherwise need dequantizing whole for every micro-batch.
    """
    to_nf4 = _import_to_nf4()
    # Names, not modules: a list of the modules would keep every dense weight alive to the end.
    names = [n for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
    for name in names:
        quantized = _quantize(model.get_submodule(name), name, to_nf4)
        model.set_submodule(name, NF4Linear(quantized))


def _quantize(linear: nn.Linear, name: str, to_nf4: Callable) -> torch.Tensor:
    if linear.bias is not None:
        raise ValueError(f"{name}: NF4Linear supports bias-free linear layers only (as in Llama)")
    # Whole blocks, and whole groups of block scales, are all torchao's NF4 takes. Every Llama's
    # sizes are multiples; only toy models' may not be.
    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    if linear.weight.numel() % group:
        raise UserError(
            f"lora.quantize_base: {name} has {linear.weight.numel()} weights "
            f"({linear.out_features}x{linear.in_features}), not a multiple of {group} "
            f"(NF4 blocks of {NF4_BLOCK_SIZE}, their scales in groups of {NF4_SCALER_BLOCK_SIZE})"
        )
    return to_nf4(linear.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


def _import_to_nf4() -> Callable:
    """torchao's `to_nf4`, imported only when asked for: it is an optional dependency, and
    importing it takes a second or two."""
    try:
        # A CPU build of torch makes torchao's import log warnings about CUDA kernels it could not
        # load and a deprecation meant for torchao's developers; NF4 needs neither.
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.quantization import to_nf4
    except ImportError as e:
        raise UserError(f"lora.quantize_base needs torchao ({e}): {QLORA_EXTRA}") from None
    return to_nf4


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Drop the named loggers' messages below ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
