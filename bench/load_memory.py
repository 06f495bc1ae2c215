"""Peak memory of `load_checkpoint`, per checkpoint format and dtype, against the weights' size.

    python bench/load_memory.py                  # a 1.66 GB (fp32) model, every format and dtype
    python bench/load_memory.py --layers 2       # a smaller one (0.90 GB)
    python bench/load_memory.py --ranks 2        # sharded over 2 processes: each one's peak

A random model of known size (Llama-2's 32,000-token vocabulary, 2048 wide) is written once in
each format: Hugging Face safetensors and .bin, Meta's consolidated.00.pth, and Meta's format in
two model-parallel shards. Then, for each format and dtype, a fresh Python process imports torch
and finetune, takes its peak resident memory as the baseline, loads the checkpoint into that
dtype, and reports how far its peak rose. The goal: at most 1.3x the weights in the loaded dtype.
With `--ranks N`, N processes (torchrun, gloo) each build the model on the meta device, shard it
(FSDP2) and read their own rows of every weight (`checkpoint.load_sharded_weights`): each
process's peak should follow its shard, about 1/N of the model, not the whole.
Peak RSS is `ru_maxrss`, which counts the pages of memory-mapped files the process has read, too.
Linux carries a parent's resident size at fork over into its child's `ru_maxrss`, so this script's
own process imports neither torch nor finetune: writing the checkpoints is a subprocess as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("safetensors", "bin", "meta-1-shard", "meta-2-shards")
DTYPES = ("fp32", "bf16")


def model_config(n_layers: int) -> dict[str, int | float]:
    """ModelConfig fields; ffn_dim 5632 is Meta's formula for dim 2048 with multiple_of 256."""
    return {
        "vocab_size": 32000,
        "dim": 2048,
        "n_layers": n_layers,
        "n_heads": 16,
        "n_kv_heads": 8,
        "ffn_dim": 5632,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "context_length": 4096,
    }


def write_checkpoints(fields: dict[str, int], root: Path) -> None:
    """One random model (a single copy in memory), written in every format."""
    import torch

    from finetune.config import ASSETS_DIR, ModelConfig
    from finetune.hf_format import hf_config, hf_key, save_hf
    from finetune.meta_format import save_meta
    from finetune.model import Llama, count_parameters

    cfg = ModelConfig(**fields)
    tokenizer = ASSETS_DIR / "tiny" / "tokenizer.model"
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    print(f"{count_parameters(model) / 1e6:.1f}M parameters: {cfg}")
    save_hf(
        model, root / "safetensors", tokenizer=tokenizer, bos_id=1, eos_id=2, dtype=torch.float32
    )
    # The .bin layout transformers 4 wrote (transformers 5 writes safetensors only).
    (root / "bin").mkdir()
    torch.save(
        {hf_key(name): t for name, t in model.state_dict().items()},
        root / "bin" / "pytorch_model.bin",
    )
    config = hf_config(cfg, torch.float32, bos_id=1, eos_id=2)
    (root / "bin" / "config.json").write_text(json.dumps(config))
    save_meta(model, root / "meta-1-shard", tokenizer, torch.float32)
    save_meta(model, root / "meta-2-shards", tokenizer, torch.float32, n_shards=2)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(fields: dict[str, int], ckpt_dir: Path, dtype: str) -> dict[str, float]:
    """In this fresh process: the peak RSS after the imports, and after loading `ckpt_dir`."""
    import torch

    from finetune.checkpoint import load_checkpoint
    from finetune.config import ModelConfig

    cfg = ModelConfig(**fields)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    model = load_checkpoint(cfg, ckpt_dir, torch.device("cpu"), torch_dtype)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"baseline": baseline, "peak": peak_rss_bytes(), "weights": weights, "s": seconds}


def measure_sharded(fields: dict[str, int], ckpt_dir: Path, dtype: str) -> dict[str, float]:
    """In this process, one of several that torchrun started: the peak RSS after the imports and
    after loading this process's shard of `ckpt_dir`."""
    from types import SimpleNamespace

    import torch

    from finetune import distributed, ranks
    from finetune.checkpoint import load_sharded_weights
    from finetune.config import DType, ModelConfig
    from finetune.model import Llama

    cfg = ModelConfig(**fields)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    distributed.init_process_group()
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    with torch.device("meta"):
        model = Llama(cfg).to(torch_dtype)
    # The two settings of a run's params that sharding reads.
    distributed.shard_model(model, SimpleNamespace(dtype=DType.fp32, cpu_offload=False))
    load_sharded_weights(model, ckpt_dir)
    seconds = time.perf_counter() - start
    weights = sum(distributed.local_part(p).numel() * p.element_size() for p in model.parameters())
    result = {"rank": ranks.rank(), "baseline": baseline, "peak": peak_rss_bytes()}
    distributed.close()
    return result | {"weights": weights, "s": seconds}


def in_subprocess(fields: dict[str, int], *args: str) -> str:
    """This script's last output line when run with `args`, in a fresh Python."""
    command = [sys.executable, __file__, "--config", json.dumps(fields), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def report(fields: dict[str, int], root: Path) -> None:
    print(
        f"{'format':<15}{'dtype':<7}{'weights':>10}{'peak RSS above baseline':>26}"
        f"{'ratio':>8}{'baseline':>11}{'load':>8}"
    )
    for name in FORMATS:
        for dtype in DTYPES:
            r = json.loads(in_subprocess(fields, "--measure", str(root / name), "--dtype", dtype))
            above = r["peak"] - r["baseline"]
            print(
                f"{name:<15}{dtype:<7}{r['weights'] / 1e9:>8.3f}GB{above / 1e9:>24.3f}GB"
                f"{above / r['weights']:>8.2f}{r['baseline'] / 1e6:>9.0f}MB{r['s']:>7.1f}s",
                flush=True,
            )


def report_sharded(fields: dict[str, int], root: Path, n_ranks: int) -> None:
    print(
        f"{'format':<15}{'dtype':<7}{'rank':>5}{'its shard':>11}{'peak RSS above baseline':>26}"
        f"{'ratio':>8}{'baseline':>11}{'load':>8}"
    )
    for name in ("safetensors", "meta-2-shards"):
        for dtype in DTYPES:
            command = [
                *(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n_ranks}"),
                *(__file__, "--config", json.dumps(fields)),
                *("--measure-sharded", str(root / name), "--dtype", dtype),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            rows = [json.loads(line) for line in output.stdout.splitlines() if line[:1] == "{"]
            for r in sorted(rows, key=lambda r: r["rank"]):
                above = r["peak"] - r["baseline"]
                print(
                    f"{name:<15}{dtype:<7}{r['rank']:>5}{r['weights'] / 1e9:>9.3f}GB"
                    f"{above / 1e9:>24.3f}GB{above / r['weights']:>8.2f}"
                    f"{r['baseline'] / 1e6:>9.0f}MB{r['s']:>7.1f}s",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (size knob)")
    parser.add_argument("--dir", type=Path, help="parent of the temporary checkpoints")
    parser.add_argument("--ranks", type=int, default=1, help="processes sharing the model")
    parser.add_argument("--measure-sharded", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_checkpoints(json.loads(args.config), args.write)
        return
    if args.measure:
        print(json.dumps(measure(json.loads(args.config), args.measure, args.dtype)))
        return
    if args.measure_sharded:
        fields = json.loads(args.config)
        print(json.dumps(measure_sharded(fields, args.measure_sharded, args.dtype)), flush=True)
        return

    fields = model_config(args.layers)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(in_subprocess(fields, "--write", tmp))
        if args.ranks > 1:
            report_sharded(fields, Path(tmp), args.ranks)
        else:
            report(fields, Path(tmp))


if __name__ == "__main__":
    main()
