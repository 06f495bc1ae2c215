"""What provenance.json's SHA-256 of a checkpoint costs against loading it.

    python bench/provenance_hash.py [--rounds 9]

Writes a random 1.6 GB fp32 checkpoint (26 layers x 1024 wide, 32k vocabulary) to a temporary
directory, deleted afterwards. Each round, in turn: the load alone (`checkpoint.load_checkpoint`),
the hash alone (`data_cache.file_digest`, as provenance.py computes it), and the load with the hash
in a thread beside it (what a run does). Prints each round and the medians of hash / load and of
(load with hash - load) / load: paired per round, so that other work on the machine cancels out.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from finetune.checkpoint import load_checkpoint
from finetune.config import ASSETS_DIR, ModelConfig
from finetune.data_cache import file_digest
from finetune.hf_format import save_hf
from finetune.model import Llama

MODEL = ModelConfig(
    vocab_size=32000,
    dim=1024,
    n_layers=26,
    n_heads=16,
    n_kv_heads=16,
    ffn_dim=2816,
    norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=512,
)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory(prefix="provenance-bench-") as tmp:
        checkpoint = Path(tmp)
        model = Llama(MODEL)
        model.init_weights(torch.Generator().manual_seed(0))
        tokenizer = ASSETS_DIR / "tiny" / "tokenizer.model"
        save_hf(model, checkpoint, tokenizer=tokenizer, bos_id=1, eos_id=2, dtype=torch.float32)
        del model
        weights = checkpoint / "model.safetensors"

        def load() -> Llama:
            return load_checkpoint(MODEL, checkpoint, torch.device("cpu"), torch.float32)

        def load_while_hashing(pool: ThreadPoolExecutor) -> None:
            digest = pool.submit(file_digest, weights)
            load()
            digest.result()

        hash_share, thread_cost = [], []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for _ in range(rounds):
                alone = timed(load)
                hashing = timed(lambda: file_digest(weights))
                together = timed(lambda: load_while_hashing(pool))
                hash_share.append(hashing / alone)
                thread_cost.append((together - alone) / alone)
                print(
                    f"load {alone:.2f} s, sha256 {hashing:.2f} s, load with sha256 in a thread "
                    f"{together:.2f} s",
                    flush=True,
                )
        print(f"{weights.stat().st_size:,} bytes, {torch.get_num_threads()} threads")
        print(f"sha256 after the load: {100 * statistics.median(hash_share):.1f} % of the load")
        print(f"sha256 in a thread during it: {100 * statistics.median(thread_cost):+.1f} %")


if __name__ == "__main__":
    main()
