"""The matrix products of one decode step, on plain weights and in the decode layout.

    python bench/decode_products.py                      # tiny and medium, fp32 and bf16
    python bench/decode_products.py --models medium --repeats 9

For each model and dtype, a random model's every weight matrix multiplies one token's activations
(batch 1), back to back as a decode step does, three ways: the plain (out, in) weights, the same
with q/k/v and gate/up fused (`decode_layout.fuse_projections`), and the whole decode layout that
`recipe=generate` applies (`decode_layout.lay_out_for_decoding`: fused, bf16 reordered for oneDNN,
fp32 transposed where that is faster). Prints the median milliseconds per step of each; the
products alone, without the attention and elementwise work around them. One thread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bench import MEDIUM, TINY  # bench/bench.py, beside this file
from finetune.config import ModelConfig
from finetune.decode_layout import fuse_projections, lay_out_for_decoding
from finetune.model import Llama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def products(model: Llama) -> Callable[[], None]:
    """One decode step's matrix products: each layer that multiplies the hidden state (or, for
    down_proj, the feed-forward's inner activations) by its weight, in the model's order."""
    cfg, dtype = model.cfg, model.embed_tokens.weight.dtype
    hidden = torch.randn(1, 1, cfg.dim, dtype=dtype)
    inner = torch.randn(1, 1, cfg.ffn_dim, dtype=dtype)
    layers: list[tuple[nn.Module, torch.Tensor]] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_proj") and module is not None and leaf != "down_proj":
            layers.append((module, hidden))
        elif leaf == "down_proj":
            layers.append((module, inner))
    layers.append((model.lm_head, hidden))

    def step() -> None:
        for layer, x in layers:
            layer(x)

    return step


def median_ms(step: Callable[[], None], repeats: int, steps: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def bench(cfg: ModelConfig, dtype: torch.dtype, repeats: int) -> tuple[float, float, float]:
    plain = Llama(cfg)
    plain.init_weights(torch.Generator().manual_seed(0))
    plain = plain.to(dtype).eval()
    fused, laid_out = copy.deepcopy(plain), copy.deepcopy(plain)
    fuse_projections(fused)
    lay_out_for_decoding(laid_out)
    steps = [products(plain), products(fused), products(laid_out)]
    for step in steps:
        step()
    # Interleaved, so that a change in the machine's load falls on all three.
    times: list[list[float]] = [[], [], []]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            times[i].append(median_ms(step, 1))
    plain_ms, fused_ms, laid_out_ms = (statistics.median(t) for t in times)
    return plain_ms, fused_ms, laid_out_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {"tiny": TINY, "medium": MEDIUM}
    print(f"{'model':<8}{'dtype':<6}{'plain ms':>10}{'fused ms':>10}{'decode layout ms':>18}")
    with torch.inference_mode():
        for name in args.models.split(","):
            for dtype in args.dtypes.split(","):
                plain, fused, laid_out = bench(models[name], DTYPES[dtype], args.repeats)
                print(f"{name:<8}{dtype:<6}{plain:>10.2f}{fused:>10.2f}{laid_out:>18.2f}")


if __name__ == "__main__":
    main()
