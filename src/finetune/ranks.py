"""Which share of the work is this process's, and where processes must agree: the seam a
multi-process run (one process per GPU) plugs into. A run is one process today, so each of these
is the identity; the loop calls them wherever processes would differ."""

from __future__ import annotations


def this_rank(order: list[int]) -> list[int]:
    """The training examples, as indices in the epoch's `order`, that this process trains on."""
    return order


def sum_over_ranks(count: int) -> int:
    """`count` summed over every process: the tokens of an optimizer step, whose loss every
    process divides by the same total."""
    return count


def any_rank(flag: bool) -> bool:
    """True when it is true on any process: a decision to stop must be taken by all of them at
    the same step."""
    return flag


def writes_files() -> bool:
    """Whether this process writes the run's files (params.yaml, checkpoints, the model): the
    one place that decides it."""
    return True
