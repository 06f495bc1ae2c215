"""Generation speed: finetune's `generate` against transformers' `generate` on the same weights.

    python bench/generate.py                             # tiny and medium, fp32 and bf16
    python bench/generate.py --models medium --dtypes bf16 --repeats 9

Batch 1, greedy, on the CPU, in one process: each model is loaded from one Hugging Face
checkpoint by both libraries (finetune's `load_checkpoint`, transformers'
`LlamaForCausalLM.from_pretrained`, its default attention and cache), in the same dtype. A run
feeds a prompt of `--prompt-tokens` random ids and generates `--new-tokens` more, with no EOS:
  prefill tokens/s   prompt tokens / (call -> first new token), set-up included
  decode tokens/s    new tokens after the first / (first new token -> last one)
Runs alternate between the libraries, after one warm-up run each; the table shows the medians
and whether the two produced the same ids. Models as in bench.py: `tiny` is the shipped model,
`medium` a random 6-layer, 512-wide one with a 32,000-token vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import MEDIUM, TINY, TINY_DIR, medium_checkpoint  # bench/bench.py, beside this file
from finetune.checkpoint import load_checkpoint
from finetune.config import ModelConfig
from finetune.decode_layout import lay_out_for_decoding
from finetune.generation import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Timing:
    """One generation: when it was called, when each new token arrived, and the ids."""

    called: float
    arrivals: list[float]
    ids: list[int]

    @property
    def prefill_s(self) -> float:
        return self.arrivals[0] - self.called

    @property
    def decode_s_per_token(self) -> float:
        return (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)


def time_finetune(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Timing:
    timing = Timing(time.perf_counter(), [], [])
    for token in generate(model, prompt, max_new_tokens=new_tokens):
        timing.arrivals.append(time.perf_counter())
        timing.ids.append(token)
    return timing


class ArrivalStreamer:
    """A transformers streamer that notes when each new token arrives. `generate` passes the
    prompt first, before running it, then each token as soon as it is chosen."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.timing.arrivals.append(time.perf_counter())
        self.timing.ids.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def time_transformers(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Timing:
    from transformers import GenerationConfig

    # No EOS: every run generates exactly `new_tokens` tokens, as finetune's does without eos_id.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    timing = Timing(time.perf_counter(), [], [])
    with torch.inference_mode():
        model.generate(
            prompt.unsqueeze(0),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=config,
            streamer=ArrivalStreamer(timing),
        )
    return timing


def load_both(
    cfg: ModelConfig, ckpt: Path, dtype: torch.dtype, lay_out: bool
) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import LlamaForCausalLM

    ours = load_checkpoint(cfg, ckpt, torch.device("cpu"), dtype).eval()
    if lay_out:  # as recipe=generate loads a model
        lay_out_for_decoding(ours)
    theirs = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    # `generate` fills an EOS left unset in its config from the model's own (the checkpoint's).
    theirs.generation_config.eos_token_id = None
    return ours, theirs


@dataclass
class Row:
    prefill: tuple[float, float]  # tokens/s: finetune, transformers
    decode: tuple[float, float]
    same_ids: bool


def measure(runs: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    """`repeats` timings of each run after a warm-up, alternating between runs so that a change
    in the machine's load falls on both."""
    for run in runs.values():
        run()
    timings: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timings[name].append(run())
    return timings


def check_lengths(timings: dict[str, list[Timing]], new_tokens: int) -> None:
    """Every run generated all the tokens asked for: a rate over fewer would not compare."""
    for name, runs in timings.items():
        lengths = {len(t.ids) for t in runs}
        if lengths != {new_tokens}:
            raise SystemExit(f"{name} generated {sorted(lengths)} tokens, not {new_tokens}")


def medians(timings: list[Timing], prompt_tokens: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s."""
    prefill = statistics.median(prompt_tokens / t.prefill_s for t in timings)
    decode = statistics.median(1 / t.decode_s_per_token for t in timings)
    return prefill, decode


def bench_model(cfg: ModelConfig, ckpt: Path, dtype: torch.dtype, args: argparse.Namespace) -> Row:
    ours, theirs = load_both(cfg, ckpt, dtype, not args.plain_layout)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_tokens,), generator=generator)
    timings = measure(
        {
            "finetune": lambda: time_finetune(ours, prompt, args.new_tokens),
            "transformers": lambda: time_transformers(theirs, prompt, args.new_tokens),
        },
        args.repeats,
    )
    check_lengths(timings, args.new_tokens)
    ours_prefill, ours_decode = medians(timings["finetune"], args.prompt_tokens)
    hf_prefill, hf_decode = medians(timings["transformers"], args.prompt_tokens)
    return Row(
        (ours_prefill, hf_prefill),
        (ours_decode, hf_decode),
        timings["finetune"][0].ids == timings["transformers"][0].ids,
    )


def table_lines(rows: Iterator[tuple[str, str, Row]]) -> Iterator[str]:
    yield (
        f"{'model':<8}{'dtype':<6}{'prefill tok/s':>14}{'hf':>8}{'ratio':>7}"
        f"{'decode tok/s':>14}{'hf':>8}{'ratio':>7}{'same ids':>10}"
    )
    for name, dtype, row in rows:
        (ours_p, hf_p), (ours_d, hf_d) = row.prefill, row.decode
        yield (
            f"{name:<8}{dtype:<6}{ours_p:>14.0f}{hf_p:>8.0f}{ours_p / hf_p:>7.2f}"
            f"{ours_d:>14.1f}{hf_d:>8.1f}{ours_d / hf_d:>7.2f}{'yes' if row.same_ids else 'no':>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--plain-layout",
        action="store_true",
        help="finetune's model as training holds it, without recipe=generate's decode layout",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; batch 1, greedy, {args.prompt_tokens} prompt tokens, "
        f"{args.new_tokens} new tokens; medians of {args.repeats} runs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {"tiny": (TINY, TINY_DIR)}
        if "medium" in args.models.split(","):
            checkpoints["medium"] = (MEDIUM, medium_checkpoint(Path(tmp)))

        def rows() -> Iterator[tuple[str, str, Row]]:
            for name in args.models.split(","):
                cfg, ckpt = checkpoints[name]
                for dtype in args.dtypes.split(","):
                    yield name, dtype, bench_model(cfg, ckpt, DTYPES[dtype], args)

        for line in table_lines(rows()):
            print(line, flush=True)


if __name__ == "__main__":
    main()
