"""Start-up of `python -m finetune`, launch -> first optimizer step done, against `import torch`.

    python bench/startup.py            # tiny default and medium + 2,000 records, 5 runs each
    python bench/startup.py --runs 9 --workloads medium

Workloads:
  tiny     the shipped default, `python -m finetune max_steps=1`
  medium   bench.py's medium model (35M parameters, 32k vocabulary) loaded from a bf16 Hugging
           Face checkpoint, full fine-tuning in fp32 on 2,000 long Alpaca records (bench.py's
           `long_records`), max_seq_len 256, batch 4, 1 step
Each workload runs with the tokenized-data cache cold (a fresh cache directory each run: the
data is tokenized) and warm (the cache written by a run before), alternating with `python -c
"import torch"` so that a drift in the machine's speed moves both. Times are launch to the first
progress line ("step 1 ..."), printed as median (min-max) over the runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import BATCH_SIZE, MEDIUM, SEQ_LEN, long_records, medium_checkpoint

N_RECORDS = 2000


def first_step_s(command: list[str], env: dict[str, str]) -> float:
    """Seconds from launching `command` to its first "step " line (or to its exit, if it prints
    none: `import torch`)."""
    launched = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step "):
            elapsed = time.perf_counter() - launched
            break
    else:
        elapsed = time.perf_counter() - launched
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return elapsed


def finetune_command(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "finetune", *overrides, "max_steps=1", f"hydra.run.dir={run_dir}"]


def medium_overrides(work: Path) -> list[str]:
    checkpoint = medium_checkpoint(work)
    data = long_records(work / "long.jsonl", N_RECORDS)
    model_args = [f"model.{f}={getattr(MEDIUM, f)}" for f in MEDIUM.__dataclass_fields__]
    return [
        "recipe=full",
        *model_args,
        f"checkpoint={checkpoint}",
        f"dataset.path={data}",
        f"batch_size={BATCH_SIZE}",
        f"max_seq_len={SEQ_LEN}",
        "dataset.train_on_input=true",
        "shuffle=false",
    ]


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):6.2f} ({min(times):.2f}-{max(times):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="tiny,medium")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--caches", default="cold,warm", help="cold, warm or both")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    import_torch = [sys.executable, "-c", "import torch"]
    print(f"{'workload':<10}{'cache':<7}{'start-up s':>20}{'import torch s':>20}{'difference':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        workloads = {"tiny": lambda: [], "medium": lambda: medium_overrides(work)}
        for name in args.workloads.split(","):
            overrides = workloads[name]()
            for cache in args.caches.split(","):
                starts, imports = [], []
                for run in range(args.runs):
                    cache_dir = work / f"cache-{name}-{cache}-{run if cache == 'cold' else 0}"
                    run_env = {**env, "FINETUNE_CACHE": str(cache_dir)}
                    command = finetune_command(overrides, work / f"run-{name}-{cache}-{run}")
                    if cache == "warm" and run == 0:  # writes the cache the runs then read
                        first_step_s(finetune_command(overrides, work / f"fill-{name}"), run_env)
                    starts.append(first_step_s(command, run_env))
                    imports.append(first_step_s(import_torch, env))
                difference = statistics.median(s - i for s, i in zip(starts, imports, strict=True))
                print(
                    f"{name:<10}{cache:<7}{summary(starts):>20}{summary(imports):>20}"
                    f"{difference:>12.2f}"
                )


if __name__ == "__main__":
    main()
