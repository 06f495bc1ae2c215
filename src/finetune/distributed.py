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
