"""Packing (`dataset.packed=true`): training examples laid end to end in rows of max_seq_len tokens,
so that a batch computes little padding.

Each sequence of a row is still trained on as if alone: its targets stop at its own end
(data.collate), its positions restart at 0, and it attends only to itself (the model reads the
boundaries from the positions, see model.packed_causal_mask). So a packed row's loss is the sum of
its sequences' unpacked losses.

The rows are packed once, before the first epoch, in a seeded order: every epoch then shuffles
rows, as an unpacked run shuffles examples. The number of rows is fixed, so the run's length, the
data order of each epoch and a resumed run's position (counted in rows) are known from the start.
"""

from __future__ import annotations

import bisect
import logging
import random
from dataclasses import dataclass

from finetune.data import Example

log = logging.getLogger(__name__)


@dataclass
class PackedRow(Example):
    """Examples end to end: their tokens and labels concatenated, `lengths` their token counts."""

    lengths: list[int]

    def sequences(self) -> list[Example]:
        examples, start = [], 0
        for length in self.lengths:
            end = start + length
            examples.append(Example(self.tokens[start:end], self.labels[start:end]))
            start = end
        return examples


def pack(examples: list[Example], max_seq_len: int, order: list[int]) -> list[PackedRow]:
    """Greedy packing, best fit: each example in `order` goes into the row with the least room
    that still holds it, or starts a new row. Every example already fits (tokenizing truncates
    it to max_seq_len), so each is in exactly one row.

    Best rather than next fit: a row is not closed by the first example that overflows it, so
    the gaps that long examples leave are filled by later short ones (on the bench's alpaca
    workload, rows of 400 tokens: 6 % of the tokens computed in the first 30 steps are padding,
    against 21 % packed next fit)."""
    rows: list[list[Example]] = []
    rooms: list[tuple[int, int]] = []  # (tokens left, row index) of the rows with room, sorted
    for index in order:
        example = examples[index]
        n_tokens = len(example.tokens)
        fitting = bisect.bisect_left(rooms, (n_tokens, -1))
        if fitting < len(rooms):
            room, row = rooms.pop(fitting)
        else:
            room, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(example)
        if room > n_tokens:
            bisect.insort(rooms, (room - n_tokens, row))
    return [joined(row) for row in rows]


def joined(examples: list[Example]) -> PackedRow:
    return PackedRow(
        tokens=[t for e in examples for t in e.tokens],
        labels=[label for e in examples for label in e.labels],
        lengths=[len(e.tokens) for e in examples],
    )


def packing_order(n_examples: int, shuffle: bool, seed: int) -> list[int]:
    """File order, or a permutation of the examples that depends only on `seed`: which examples
    share a row is then as random as the epochs' order, and the same in every run of one seed."""
    if not shuffle:
        return list(range(n_examples))
    # A string seed is hashed into the generator's state (see data.split_examples): unrelated to
    # the torch generators that shuffle the epochs.
    return random.Random(f"packing:{seed}").sample(range(n_examples), n_examples)


def packed_rows(
    examples: list[Example], max_seq_len: int, shuffle: bool, seed: int
) -> list[PackedRow]:
    """The training rows of a packed run (see the module's docstring), logged with how full
    they are."""
    rows = pack(examples, max_seq_len, packing_order(len(examples), shuffle, seed))
    n_tokens = sum(len(e.tokens) for e in examples)
    log.info(
        "packed %d examples into %d rows of max_seq_len=%d tokens (%.0f%% filled)",
        len(examples),
        len(rows),
        max_seq_len,
        100 * n_tokens / (len(rows) * max_seq_len),
    )
    return rows
