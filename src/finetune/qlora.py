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

from finetune.distributed import like_sharded, local_part
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

    Sharded across processes (distributed.shard_model), `weight` is a DTensor whose local part is
    this process's rows of the whole weight's NF4Tensor (`load_weight`); FSDP2 gathers the NF4
    parts, not dense rows, through torchao's `fsdp_pre_all_gather`/`fsdp_post_all_gather`.
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
        """The dense (out, in) weight, in the original dtype unless `dtype` is given; sharded as
        `weight` is, each process dequantizing its own rows."""
        weight = like_sharded(self.weight, local_part(self.weight).get_original_weight())
        return weight if dtype is None else weight.to(dtype)

    @torch.no_grad()
    def load_weight(self, dense: torch.Tensor) -> None:
        """Quantize `dense`, the whole (out, in) weight, and keep this process's rows of it as
        the sharded `weight` (distributed.shard_model made it a DTensor).

        Quantizing only this process's rows would give other numbers: the double quantization
        subtracts the mean of the whole tensor's block scales (`scaler_mean`). So every process
        quantizes the whole weight (one at a time, so only one dense weight is held) and keeps
        its split, which equals one process's weight cut along the same rows.
        """
        quantized = _quantize_tensor(dense, _import_to_nf4())
        mesh = self.weight.device_mesh
        # FSDP2's own split (torch.chunk along dim 0), which torchao's NF4Tensor implements for
        # even splits: whole groups of block scales per process (`check_quantizable`).
        part = torch.chunk(quantized, mesh.size(), dim=0)[mesh.get_local_rank()]
        # The part's tensors are views of the whole weight's: a copy lets that be freed.
        own = part.new_zeros(part.shape)
        own.copy_(part)
        own = own.to(local_part(self.weight).device)  # the CPU with cpu_offload
        sharded = nn.Parameter(like_sharded(self.weight, own), requires_grad=False)
        # A new parameter, not a copy into the old one: the NF4Tensor built on the meta device and
        # given memory by to_empty still has its scale mean and code table there (torchao's
        # empty_like makes only the quantized tensors). Assigned through load_state_dict, whose
        # hook tells FSDP2 that the parameter changed.
        self.load_state_dict({"weight": sharded}, assign=True)

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


def quantize_base_weights(model: Llama, processes: int = 1) -> None:
    """Replace every linear layer of the transformer blocks by an `NF4Linear`, in place, one at a
    time so that the dense weight is freed as its NF4 copy takes its place.

    On several `processes` the model is on the meta device and its NF4 layers get their values
    after sharding (`NF4Linear.load_weight`); each must split evenly across them.

    The embedding and lm_head stay dense, as in QLoRA (and transformers' bitsandbytes loading):
    they are a few percent of a Llama's weights, quantization hurts the output layer most, and the
    chunked loss multiplies by lm_head's weight directly (`Llama.output_weight`), which would
    otherwise need dequantizing whole for every micro-batch.
    """
    to_nf4 = _import_to_nf4()
    # Names, not modules: a list of the modules would keep every dense weight alive to the end.
    names = [n for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        check_quantizable(name, linear, processes)
        model.set_submodule(name, NF4Linear(_quantize_tensor(linear.weight.detach(), to_nf4)))


# Whole blocks, and whole groups of block scales, are all torchao's NF4 takes.
NF4_GROUP = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
NF4_GROUPS = f"NF4 blocks of {NF4_BLOCK_SIZE}, their scales in groups of {NF4_SCALER_BLOCK_SIZE}"


def check_quantizable(name: str, linear: nn.Linear, processes: int) -> None:
    """Refuse a layer that NF4 cannot hold, or that cannot be split into equal parts of whole
    groups of block scales, one per process (torchao splits an NF4Tensor evenly or not at all).
    Every Llama's sizes are multiples; only toy models' may not be."""
    if linear.bias is not None:
        raise ValueError(f"{name}: NF4Linear supports bias-free linear layers only (as in Llama)")
    rows, columns = linear.out_features, linear.in_features
    size = f"{name} has {rows * columns} weights ({rows}x{columns})"
    if processes == 1 and (rows * columns) % NF4_GROUP:
        raise UserError(f"lora.quantize_base: {size}, not a multiple of {NF4_GROUP} ({NF4_GROUPS})")
    if rows % processes or (rows * columns) % (NF4_GROUP * processes):
        raise UserError(
            f"lora.quantize_base: {size}, which do not split over {processes} processes into "
            f"equal parts of whole rows, each a multiple of {NF4_GROUP} weights ({NF4_GROUPS}); "
            "run on fewer processes or with lora.quantize_base=false"
        )


def _quantize_tensor(weight: torch.Tensor, to_nf4: Callable) -> torch.Tensor:
    return to_nf4(weight, NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


def _import_to_nf4() -> Callable:
    """torchao's `to_nf4`, imported only when asked for: it is an optional dependency, and
    importing it takes a second or two."""
    try:
        # A CPU build of torch makes torchao's import log warnings about CUDA kernels it could not
        # load and a deprecation meant for torchao's developers; NF4 needs neither.
        with quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.quantization import to_nf4
    except ImportError as e:
        raise UserError(f"lora.quantize_base needs torchao ({e}): {QLORA_EXTRA}") from None
    return to_nf4


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
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
