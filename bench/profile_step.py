"""Profile optimizer steps of the bench's medium model on its alpaca workload, in this process.

    python bench/profile_step.py                       # full fine-tuning, bf16, 6 steps
    python bench/profile_step.py --dtype fp32 --steps 8 --rows 30

Runs `training.train_step` (the loop's step: autocast, chunked loss, backward, clipping, fused
AdamW) on batches of 4 alpaca records of 100-400 tokens padded to the longest, as
`bench.py --workload alpaca` does, under `torch.profiler` after two unprofiled steps, and prints
the operators by self CPU time, forward and backward together (backward operators are the ones
autograd's engine runs; `--by-shape` splits them by input shape).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from bench import BATCH_SIZE, MEDIUM, alpaca_records, padded_tokenizer
from finetune.config import DType
from finetune.data import collate, tokenize_alpaca
from finetune.model import Llama
from finetune.tokenizer import Tokenizer
from finetune.training import build_optimizer, train_step


def alpaca_batches(work: Path, n_steps: int) -> list:
    tokenizer_path = padded_tokenizer(MEDIUM.vocab_size, work / "tokenizer.model")
    data = work / "alpaca.jsonl"
    alpaca_records(data, BATCH_SIZE * n_steps, tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    examples = [tokenize_alpaca(r, tokenizer, 400, train_on_input=True) for r in records]
    return [
        collate(examples[i : i + BATCH_SIZE], tokenizer.pad_id)
        for i in range(0, len(examples), BATCH_SIZE)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6, help="profiled steps")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--by-shape", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        batches = alpaca_batches(Path(tmp), args.steps + 2)
    model = Llama(MEDIUM)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, 2e-5, 0.0)
    params = SimpleNamespace(dtype=DType(args.dtype), max_grad_norm=1.0)
    device = torch.device("cpu")
    for batch in batches[:2]:
        train_step(model, [batch], optimizer, params, device)  # type: ignore[arg-type]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for batch in batches[2:]:
            train_step(model, [batch], optimizer, params, device)  # type: ignore[arg-type]
    table = prof.key_averages(group_by_input_shape=args.by_shape)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
