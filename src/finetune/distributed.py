"""A run over several processes, one per device: the process group, and the model sharded
across it with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Processes are started by `torch.distributed.run` (finetune's own launcher, see launch.py, or a
user's `torchrun`/`srun`), which sets RANK, WORLD_SIZE and the rendezvous in the environment.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from finetune.config import DType, FullFinetuneParams
from finetune.model import Llama


def started_by_launcher() -> bool:
    """Whether this process is one of several that torchrun (or SLURM, or finetune's launcher)
    started: they find each other through the environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> None:
    """Join the other processes: NCCL for GPU tensors, gloo for CPU ones (the counts and flags of
    `ranks`, and everything on a machine without GPUs)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    # Long enough for the slowest collective: rank 0 reading a 70B checkpoint while the others
    # wait for its first tensor.
    dist.init_process_group(backend, timeout=timedelta(minutes=60))


def local_device() -> torch.device:
    """This process's device: its GPU on a machine with GPUs (one process per GPU), else the
    CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: Llama, params: FullFinetuneParams) -> None:
    """Shard `model`, built on the meta device, across every process (FSDP2): each decoder block
    is one unit, whose weights are gathered for its forward and backward and freed after; the
    root holds the rest (embedding, final norm, output layer).

    Called after activation checkpointing and compile are applied (parallel.prepare_model), as
    torchtitan orders them. The weights stay fp32 shards, as the optimizer state does: bf16 runs
    gather them in bf16 and reduce gradients in fp32, the numerics of one process's autocast.
    """
    mesh = init_device_mesh(local_device().type, (dist.get_world_size(),))
    mixed = MixedPrecisionPolicy()
    if params.dtype is DType.bf16:
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Pinned memory needs an accelerator: a CPU-only torch refuses the default pin_memory=True.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if params.cpu_offload else None
    options = {"mesh": mesh, "mp_policy": mixed, "offload_policy": offload or OffloadPolicy()}
    for block in model.layers:
        fully_shard(block, **options)
    # The root's weights are needed again first thing in the backward pass (the output layer):
    # keeping them gathered after the forward saves an all-gather per step.
    fully_shard(model, **options, reshard_after_forward=False)
    for unit in fsdp_units(model):
        # Each process's loss is divided by the labelled tokens of the whole step (all processes),
        # so the gradients add up to the step's: summed, not averaged.
        unit.set_gradient_divide_factor(1.0)
        # A plain sum: the pre-multiplied one is NCCL's only, and gloo refuses it.
        unit.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu" if params.cpu_offload else local_device())


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_rows(param: torch.Tensor) -> slice:
    """The rows of the full tensor that this process holds of `param` (all of them unless it is
    sharded): FSDP2 splits dim 0 as `torch.chunk` does, the last shards smaller or empty."""
    if not isinstance(param, DTensor):
        return slice(None)
    rows = param.shape[0]
    per_rank = -(-rows // dist.get_world_size())
    start = min(rows, dist.get_rank() * per_rank)
    return slice(start, min(rows, start + per_rank))


def local_part(param: torch.Tensor) -> torch.Tensor:
    """The tensor this process stores for `param`: its shard, or `param` itself."""
    return param.to_local() if isinstance(param, DTensor) else param


def like_sharded(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A tensor of `param`'s global shape, sharded as it is, whose part on this process is
    `local`: `local` itself when `param` is not sharded."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """`param` whole on every process: an all-gather of a sharded one, so every process must
    call it, in the same order."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def set_requires_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Gradient accumulation: reduce gradients across processes only on the step's last
    micro-batch, not once per micro-batch (the sum is the same)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
