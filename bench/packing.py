"""Real tokens per second with and without packing, paired within one process.

    python bench/packing.py --steps 12

Trains bench.py's medium model (fp32, full fine-tuning) on its alpaca workload, alternating a step
on the unpacked batches (4 records padded to the longest) with a step on the packed ones
(`dataset.packed=true`: 4 rows of up to 400 tokens), the order of each pair swapped every other
pair, so that a machine whose load changes during the run slows both alike. Each step is the
loop's work (forward and loss, backward, fused AdamW) on batches made as a run makes them
(bench.run_batches); the first pair is left out as warm-up. Prints, for each, the median real
(non-padding) and computed tokens per second, and the median of the pairs' real-rate ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import ALPACA_LENGTHS, BATCH_SIZE, MEDIUM, TINY_DIR, alpaca_records, run_batches
from finetune.data import Batch
from finetune.model import Llama
from finetune.training import build_optimizer, next_token_loss


def timed_step(model: Llama, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    start = time.perf_counter()
    (next_token_loss(model, batch) / batch.n_targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed pairs of steps")
    args = parser.parse_args()
    n_steps = args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer = Path(tmp) / "alpaca.jsonl", TINY_DIR / "tokenizer.model"
        # A packed row holds ~1.5 records: twice the unpacked run's records are enough.
        alpaca_records(data, 2 * BATCH_SIZE * n_steps, tokenizer)
        batches = {
            packed: run_batches(data, tokenizer, ALPACA_LENGTHS[1], packed, n_steps)
            for packed in (False, True)
        }
    model = Llama(MEDIUM)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.0)
    real: dict[bool, list[float]] = {False: [], True: []}
    computed: dict[bool, list[float]] = {False: [], True: []}
    for step in range(n_steps):
        for packed in (False, True) if step % 2 == 0 else (True, False):
            batch = batches[packed][step]
            seconds = timed_step(model, optimizer, batch)
            if step > 0:
                real[packed].append(batch.n_tokens / seconds)
                computed[packed].append(batch.inputs.numel() / seconds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} pairs")
    for packed in (False, True):
        print(
            f"packed={str(packed).lower()}: real {statistics.median(real[packed]):.0f} tokens/s, "
            f"computed {statistics.median(computed[packed]):.0f} tokens/s"
        )
    ratios = [p / u for p, u in zip(real[True], real[False], strict=True)]
    print(f"packed / unpacked real tokens/s: median {statistics.median(ratios):.2f} over pairs")


if __name__ == "__main__":
    main()
