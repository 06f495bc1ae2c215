"""Benchmark the fine-tuning recipes on a fixed workload, the way a user runs them.

    python bench/bench.py           # tiny and medium models, fp32 and bf16, full and lora recipes
    python bench/bench.py --models medium --dtypes bf16 --recipes lora,qlora --steps 8
    python bench/bench.py --models medium --recipes full --procs 1,2   # 1 x 2 threads, 2 x 1
    python bench/bench.py --workload alpaca --models medium --steps 12  # variable-length batches
    python bench/bench.py --workload alpaca --models medium --packed false,true --steps 30
    python bench/bench.py --models medium --recipes full --optimizers adamw,adamw8bit,in_backward \
        --no-clipping --steps 30   # memory of each optimizer, and its loss after 30 steps
    python bench/bench.py --recipes dpo,dpo_lora      # preference tuning, full and LoRA

Each configuration is one `python -m finetune` process. From the times at which its progress
lines arrive the script derives:
  start-up       launch -> the first optimizer step done (imports, loading, data, first step)
  step           median time of the steady-state steps (the first two are left out)
  tokens/s       tokens computed per second in the steady state, padding included
  real tok/s     tokens of the data per second (padding left out): the useful rate
  GFLOP/s        model FLOPs per second (see `flops_per_token`), and as a share of this machine's
                 measured `torch.mm` rate in the same dtype
  peak RSS       the process's maximum resident memory
  loss           the training loss of the last step (to compare optimizers on the same batches)
Workloads: `tiny` is the shipped model; `medium` is a random 6-layer, 512-wide model with a
32,000-token vocabulary (Llama-2's), so that the output layer weighs as it does at 7B.
Data (`--workload`): `long` (the default) truncates every sequence to 256 tokens, so nothing is
padding; `alpaca` draws each record's length uniformly from 100-400 tokens (seeded), and batches
are padded to their longest sequence as real data are: every step has a new sequence length.
There the transformer's FLOPs count the padded tokens (they are computed), the output layer's
only the labelled ones (the chunked loss skips the rest), from the steps actually timed.
`--packed true` trains with `dataset.packed=true`: rows of max_seq_len (400) tokens, each holding
several records, so that little is padding; the alpaca workload then prints, for each setting,
the real and computed (padded) tokens of the run's first `--steps` steps, from the batches the
run makes (finetune's own tokenizing, packing and collate).
`lora` runs with the config's default adapters (`LoraConfig`: rank 8 on q/k/v/o_proj).
`dpo` and `dpo_lora` (recipe=dpo, dpo.lora=false/true) train on pairs of such sequences, batch/2
pairs a step so that a step holds as many sequences as the others; their FLOPs are full's and
LoRA's, plus, for dpo_lora, the reference's forward pass (a third of full's FLOPs). Full DPO's
pass over the data for the reference log-probabilities falls in its start-up (`long` only).
`--procs 2` runs each configuration sharded over 2 processes (`nproc_per_node=2`, FSDP2) of
cores/2 threads each, batch_size halved so that a step trains on the same sequences; its peak RSS
is the largest process's (wait4 counts the launcher's reaped workers too).
`--optimizers` runs each configuration with each optimizer of OPTIMIZERS; `in_backward` cannot
clip the gradient, and `--no-clipping` sets max_grad_norm=0 in every run, so that the rows differ
by the optimizer alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import ASSETS_DIR, DatasetConfig, LoraConfig, ModelConfig, model_preset
from finetune.data import Batch, collate, load_dataset, tokenize_alpaca
from finetune.hf_format import save_hf
from finetune.lora import apply_lora
from finetune.model import Llama
from finetune.packing import packed_rows
from finetune.tokenizer import Tokenizer

TINY_DIR = ASSETS_DIR / "tiny"
TINY = model_preset("tiny")
MEDIUM = ModelConfig(
    vocab_size=32000,
    dim=512,
    n_layers=6,
    n_heads=8,
    n_kv_heads=8,
    ffn_dim=1408,
    norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=1024,
)
BATCH_SIZE = 4
SEQ_LEN = 256
# The alpaca workload's record lengths in tokens (BOS, prompt, output, EOS), drawn uniformly.
ALPACA_LENGTHS = (100, 400)


@dataclass
class Result:
    startup_s: float
    step_s: float
    peak_rss_mb: float
    steady_s: float  # the timed steps' total
    last_loss: float


def padded_tokenizer(vocab_size: int, out: Path) -> Path:
    """The shipped tokenizer with unused pieces appended up to `vocab_size`.

    It tokenizes text exactly as the shipped one does; only the vocabulary, and so the model's
    embedding and output layer, grows to the size being measured.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString((TINY_DIR / "tokenizer.model").read_bytes())
    for i in range(len(proto.pieces), vocab_size):
        proto.pieces.add(
            piece=f"<unused{i}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.UNUSED
        )
    out.write_bytes(proto.SerializeToString())
    return out


def medium_checkpoint(work: Path) -> Path:
    ckpt = work / "medium"
    tokenizer = padded_tokenizer(MEDIUM.vocab_size, work / "tokenizer.model")
    model = Llama(MEDIUM)
    model.init_weights(torch.Generator().manual_seed(0))
    save_hf(model, ckpt, tokenizer=tokenizer, bos_id=1, eos_id=2, dtype=torch.bfloat16)
    return ckpt


def long_records(path: Path, n: int) -> Path:
    """Records longer than SEQ_LEN tokens: every sequence is truncated, so nothing is padding."""
    text = (TINY_DIR.parent / "sample.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in text]
    with path.open("w") as f:
        for i in range(n):
            chunk = rows[(i * 8) % len(rows) : (i * 8) % len(rows) + 8]
            output = " ".join(r["output"] for r in chunk) * 4
            f.write(json.dumps({"instruction": chunk[0]["instruction"], "output": output}) + "\n")
    return path


def alpaca_records(path: Path, n: int, tokenizer_path: Path) -> list[int]:
    """`n` Alpaca records whose token counts are drawn from ALPACA_LENGTHS; their lengths.

    Each record is a sample prompt shorter than the drawn length, its output the sample answers
    that follow it joined until the record is long enough, less the words past the drawn length.
    """
    tokenizer = Tokenizer(tokenizer_path)
    rows = [
        json.loads(line)
        for line in (TINY_DIR.parent / "sample.jsonl").read_text().split("\n")
        if line
    ]
    rng = random.Random(0)
    lengths = []
    with path.open("w") as f:
        for i in range(n):
            want = rng.randint(*ALPACA_LENGTHS)
            j = i
            while alpaca_length(rows[j % len(rows)], [], tokenizer) >= want:  # a long prompt
                j += 1
            row = rows[j % len(rows)]
            words: list[str] = []
            while alpaca_length(row, words, tokenizer) < want:
                j += 1
                words += rows[j % len(rows)]["output"].split()
            while alpaca_length(row, words, tokenizer) > want:
                words.pop()
            record = {"instruction": row["instruction"], "input": row["input"]}
            f.write(json.dumps({**record, "output": " ".join(words)}) + "\n")
            lengths.append(alpaca_length(row, words, tokenizer))
    return lengths


def alpaca_length(row: dict, words: list[str], tokenizer: Tokenizer) -> int:
    record = {"instruction": row["instruction"], "input": row["input"], "output": " ".join(words)}
    return len(tokenize_alpaca(record, tokenizer, 10**6, train_on_input=True).tokens)


def long_pairs(path: Path, n: int) -> Path:
    """Preference pairs of `long_records`' texts: the output chosen, its words reversed
    rejected; both longer than SEQ_LEN tokens after the prompt, so nothing is padding."""
    with path.open("w") as f:
        for line in long_records(path.with_suffix(".records.jsonl"), n).read_text().splitlines():
            row = json.loads(line)
            rejected = " ".join(reversed(row["output"].split()))
            f.write(
                json.dumps(
                    {"prompt": row["instruction"], "chosen": row["output"], "rejected": rejected}
                )
                + "\n"
            )
    return path


def run_recipe(
    overrides: list[str],
    steps: int,
    run_dir: Path,
    procs: int = 1,
    seq_len: int = SEQ_LEN,
    batch_size: int = BATCH_SIZE,
) -> Result:
    command = [
        sys.executable,
        "-m",
        "finetune",
        *overrides,
        f"max_steps={steps}",
        f"batch_size={batch_size // procs}",
        f"nproc_per_node={procs}",
        f"max_seq_len={seq_len}",
        "shuffle=false",
        f"hydra.run.dir={run_dir}",
    ]
    launched = time.perf_counter()
    threads = str(max(1, (os.cpu_count() or 1) // procs))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    step_times = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step "):
            step_times.append(time.perf_counter())
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(
            f"{' '.join(command)} failed:\n{proc.stderr.read() if proc.stderr else ''}"
        )
    steady = [b - a for a, b in itertools.pairwise(step_times[2:])]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return Result(
        startup_s=step_times[0] - launched,
        step_s=statistics.median(steady),
        peak_rss_mb=usage.ru_maxrss / 1024,
        steady_s=sum(steady),
        last_loss=json.loads(rows[-1])["loss"],
    )


def timed_steps(steps: int) -> range:
    """The steps (1-based) whose durations `run_recipe` measures: from the end of step 3 on."""
    return range(4, steps + 1)


# Bench name -> the overrides that select it.
RECIPES = {
    "full": ["recipe=full"],
    "lora": ["recipe=lora"],
    "qlora": ["recipe=lora", "lora.quantize_base=true"],
    "dpo": ["recipe=dpo"],
    "dpo_lora": ["recipe=dpo", "dpo.lora=true"],
}
# Preference recipes: a step of BATCH_SIZE / 2 pairs is BATCH_SIZE sequences; no validation.
DPO_RECIPES = {"dpo": "full", "dpo_lora": "lora"}  # -> the recipe whose training FLOPs it has
DPO_DATA = ["dataset.val_split=0", "eval_every_n_steps=0"]


# Bench name -> the overrides that select the optimizer (see `finetune.optimizers`).
OPTIMIZERS = {
    "adamw": [],
    "adamw8bit": ["optimizer=adamw8bit"],
    "adamw_offload": ["optimizer=adamw_offload"],
    "in_backward": ["optimizer_in_backward=true", "max_grad_norm=0"],
    "adamw8bit_in_backward": [
        "optimizer=adamw8bit",
        "optimizer_in_backward=true",
        "max_grad_norm=0",
    ],
}


def flops_per_token(cfg: ModelConfig, seq_len: int, recipe: str) -> float:
    """Training FLOPs per token, attention and output layer included."""
    if recipe in DPO_RECIPES:
        trained = flops_per_token(cfg, seq_len, DPO_RECIPES[recipe])
        # LoRA's reference is the base model's forward pass: 2 FLOPs a weight, of full's 6.
        reference = flops_per_token(cfg, seq_len, "full") / 3 if recipe == "dpo_lora" else 0
        return trained + reference
    body, head = flops_per_token_parts(cfg, seq_len, recipe)
    return body + head


def flops_per_token_parts(cfg: ModelConfig, seq_len: int, recipe: str) -> tuple[float, float]:
    """Training FLOPs per token of the transformer (attention included) and of the output layer.

    A trained matmul weight costs 6 (forward, and the input and weight gradients in backward); a
    frozen one 4, since its weight gradient is never computed. So full fine-tuning is 6 per
    weight, and LoRA 4 per base weight plus 6 per adapter weight (slightly high: nothing needs
    the input gradient of the first layer's frozen projections).
    """
    model = meta_model(cfg)
    if recipe != "full":  # a QLoRA step does LoRA's matmuls, plus the dequantization
        apply_lora(model, LoraConfig())
    body = head = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name == "embed_tokens.weight":  # norms; the embedding is a lookup
            continue
        flops = 6 * p.numel() if p.requires_grad else 4 * p.numel()
        if name.startswith("lm_head."):
            head += flops
        else:
            body += flops
    attention = 12 * cfg.n_layers * cfg.dim * seq_len
    return body + attention, head


def alpaca_step_flops(cfg: ModelConfig, recipe: str, batches: list[Batch], steps: range) -> float:
    """FLOPs of the given optimizer `steps` (1-based) of `batches`: the transformer on every
    padded position, the output layer on the labelled ones."""
    total = 0.0
    for step in steps:
        rows, length = batches[step - 1].inputs.shape
        body, head = flops_per_token_parts(cfg, length, recipe)
        total += body * rows * length + head * batches[step - 1].n_targets
    return total


def run_batches(data: Path, tokenizer: Path, seq_len: int, packed: bool, steps: int) -> list[Batch]:
    """The first `steps` batches a run of `run_recipe` trains on (file order, BATCH_SIZE rows),
    made as it makes them."""
    cfg = DatasetConfig(path=str(data), train_on_input=True, cache=False)
    tokens = Tokenizer(tokenizer)
    examples = load_dataset(cfg, tokens, seq_len)
    if packed:
        examples = packed_rows(examples, seq_len, shuffle=False, seed=0)
    starts = range(0, min(steps * BATCH_SIZE, len(examples)), BATCH_SIZE)
    return [collate(examples[i : i + BATCH_SIZE], tokens.pad_id) for i in starts]


def padding_line(batches: list[Batch], packed: bool) -> str:
    real = sum(b.n_tokens for b in batches)
    computed = sum(b.inputs.numel() for b in batches)
    return (
        f"packed={str(packed).lower()}: steps 1-{len(batches)} compute {computed:,} tokens for "
        f"{real:,} real ones: {1 - real / computed:.1%} padding"
    )


def meta_model(cfg: ModelConfig) -> Llama:
    with torch.device("meta"):
        return Llama(cfg)


def mm_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    """Best-of-5 rate of one n x n x n matmul in this process (same threads as the runs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--recipes", default="full,lora", help=f"any of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--procs", default="1", help="processes per run, e.g. 1,2")
    parser.add_argument("--workload", default="long", choices=["long", "alpaca"])
    parser.add_argument("--packed", default="false", help="dataset.packed: false, true or both")
    parser.add_argument("--optimizers", default="adamw", help=f"any of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--no-clipping", action="store_true", help="max_grad_norm=0 in every run")
    args = parser.parse_args()
    for option, known in (("recipes", RECIPES), ("optimizers", OPTIMIZERS)):
        unknown = set(getattr(args, option).split(",")) - set(known)
        if unknown:
            parser.error(
                f"--{option}: unknown {', '.join(sorted(unknown))}; expected {', '.join(known)}"
            )
    if args.workload == "alpaca" and set(args.recipes.split(",")) & set(DPO_RECIPES):
        parser.error("--recipes: dpo and dpo_lora run on the long workload only")

    mm = {"fp32": mm_gflops(torch.float32), "bf16": mm_gflops(torch.bfloat16)}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; torch.mm 2048^3: "
        f"fp32 {mm['fp32']:.0f} GFLOP/s, bf16 {mm['bf16']:.0f} GFLOP/s"
    )
    lora = LoraConfig()
    shape = f"{SEQ_LEN} tokens"
    if args.workload == "alpaca":
        shape = f"{ALPACA_LENGTHS[0]}-{ALPACA_LENGTHS[1]} tokens padded to the longest"
    print(
        f"workload: batch {BATCH_SIZE} x {shape}, {args.steps} steps; "
        f"lora: rank {lora.rank} on {','.join(lora.targets)}"
    )
    header = f"{'model':<8}{'recipe':<9}{'optimizer':<22}{'dtype':<6}{'packed':>7}{'procs':>6}"
    header += f"{'start-up s':>11}{'step s':>9}{'tokens/s':>10}{'real tok/s':>11}"
    print(header + f"{'GFLOP/s':>9}{'of mm':>7}{'peak RSS MB':>13}{'loss':>9}")
    packings = [value == "true" for value in args.packed.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # A packed row of the alpaca workload holds ~1.5 records: enough for every step.
        n_records = BATCH_SIZE * (args.steps + 1) * (2 if any(packings) else 1)
        checkpoints = {"tiny": (TINY, TINY_DIR)}
        if "medium" in args.models:
            checkpoints["medium"] = (MEDIUM, medium_checkpoint(work))
        for name in args.models.split(","):
            cfg, ckpt = checkpoints[name]
            seq_len, batches = SEQ_LEN, {}
            if args.workload == "alpaca":
                data = work / f"alpaca-{name}.jsonl"
                tokenizer = ckpt / "tokenizer.model"
                alpaca_records(data, n_records, tokenizer)
                seq_len = ALPACA_LENGTHS[1]
                for packed in packings:
                    batches[packed] = run_batches(data, tokenizer, seq_len, packed, args.steps)
                    print(padding_line(batches[packed], packed))
            else:
                data = long_records(work / "long.jsonl", n_records)
            model_args = [f"model.{f}={getattr(cfg, f)}" for f in cfg.__dataclass_fields__]
            runs = itertools.product(
                args.recipes.split(","),
                args.optimizers.split(","),
                args.dtypes.split(","),
                packings,
                map(int, args.procs.split(",")),
            )
            for recipe, optimizer, dtype, packed, procs in runs:
                overrides = [
                    *RECIPES[recipe],
                    *OPTIMIZERS[optimizer],
                    *(["max_grad_norm=0"] if args.no_clipping else []),
                    *model_args,
                    f"checkpoint={ckpt}",
                    f"dtype={dtype}",
                ]
                batch_size = BATCH_SIZE
                if recipe in DPO_RECIPES:  # preference pairs: never packed
                    pairs = long_pairs(work / "pairs.jsonl", n_records // 2)
                    overrides += [f"dataset.path={pairs}", *DPO_DATA]
                    batch_size = BATCH_SIZE // 2
                else:
                    overrides += [
                        f"dataset.path={data}",
                        "dataset.train_on_input=true",
                        f"dataset.packed={str(packed).lower()}",
                    ]
                run_dir = work / f"{name}-{recipe}-{optimizer}-{dtype}-{packed}-{procs}"
                r = run_recipe(overrides, args.steps, run_dir, procs, seq_len, batch_size)
                timed = timed_steps(args.steps)
                if batches:
                    steady = [batches[packed][s - 1] for s in timed]
                    computed = sum(b.inputs.numel() for b in steady) / r.steady_s
                    real = sum(b.n_tokens for b in steady) / r.steady_s
                    flops = alpaca_step_flops(cfg, recipe, batches[packed], timed)
                    gflops = flops / r.steady_s / 1e9
                else:
                    computed = real = BATCH_SIZE * (SEQ_LEN - 1) / r.step_s
                    gflops = flops_per_token(cfg, SEQ_LEN - 1, recipe) * computed / 1e9
                print(
                    f"{name:<8}{recipe:<9}{optimizer:<22}{dtype:<6}{str(packed).lower():>7}"
                    f"{procs:>6}{r.startup_s:>11.2f}{r.step_s:>9.3f}{computed:>10.0f}{real:>11.0f}"
                    f"{gflops:>9.1f}{gflops / mm[dtype]:>7.0%}{r.peak_rss_mb:>13.0f}"
                    f"{r.last_loss:>9.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
