"""Which share of the work is this process's, and where processes must agree.

A run is one process, or one per device under torchrun/SLURM (see distributed.py); the loop calls
these wherever processes differ, and on one process each is the identity.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist

N = TypeVar("N", int, float)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def this_rank(order: list[int], batch_size: int) -> list[list[int]]:
    """This process's micro-batches of an epoch whose examples come in `order`: the epoch is cut
    into global micro-batches of `batch_size` x world size examples, and each process takes its
    own `batch_size` of each, so an optimizer step trains on the same examples however many
    processes share it. Every process gets the same number of micro-batches; at the end of an
    epoch some may be empty, and the process still runs them (see `training.train_step`), since
    the others wait for it at each step."""
    size, me = world_size(), rank()
    step = batch_size * size
    return [
        order[start + me * batch_size : start + (me + 1) * batch_size]
        for start in range(0, len(order), step)
    ]


def sum_over_ranks(value: N) -> N:
    """`value` summed over every process: e.g. the labelled tokens of an optimizer step, by
    whose total every process divides its loss. A CPU tensor, which the `cuda:nccl,cpu:gloo`
    backend sends through gloo."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(total)
    return type(value)(total.item())


def any_rank(flag: bool) -> bool:
    """True when it is true on any process: a decision to stop must be taken by all of them at
    the same step."""
    return bool(sum_over_ranks(float(flag)))


def writes_files() -> bool:
    """Whether this process writes the run's files (params.yaml, metrics, the model): rank 0,
    the one place that decides it."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here."""
    if dist.is_initialized():
        dist.barrier()


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of every process for checkpoint writes: a background write (async_save)
    exchanges its results while training uses the default group, and two threads must not share
    one group's sequence of collectives. Made on first use, which every process reaches together
    (a checkpoint), once per process group; None on one process."""
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if world not in _checkpoint_groups:
        _checkpoint_groups[world] = dist.new_group(backend="gloo")
    return _checkpoint_groups[world]


_checkpoint_groups: dict[object, dist.ProcessGroup] = {}
