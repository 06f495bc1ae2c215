"""Shared test helpers: composing the real config, small random models and checkpoints, random
tokens, reading a run's metrics.jsonl, running the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from finetune.config import (
    ASSETS_DIR,
    FullFinetuneParams,
    LoraConfig,
    ModelConfig,
    build_params,
    config_dir,
    register_schemas,
)
from finetune.hf_format import save_hf
from finetune.lora import apply_lora, lora_modules
from finetune.model import Llama
from finetune.peft_format import save_adapter
from finetune.tokenizer import Tokenizer

# Nothing in the tests may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Tokenized data is cached (data_cache.py): in a directory of this session, not the user's.
os.environ.setdefault("FINETUNE_CACHE", tempfile.mkdtemp(prefix="finetune-cache-"))

CONF_DIR = config_dir()
TINY_CHECKPOINT = ASSETS_DIR / "tiny"
TINY_TOKENIZER = TINY_CHECKPOINT / "tokenizer.model"
SAMPLE_DATA = ASSETS_DIR / "sample.jsonl"

# A model small enough to train in well under a second a step, with grouped-query attention.
SMALL_MODEL = ModelConfig(
    vocab_size=4096,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=160,
    norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=256,
)


def model_overrides(cfg: ModelConfig) -> list[str]:
    """`model.<field>=<value>` for every architecture field of `cfg`."""
    return [f"model.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)]


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The config a run with `overrides` gets; `with_hydra` keeps Hydra's own node (`hydra.*`:
    launcher, sweeper, run directories)."""
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=overrides, return_hydra_config=with_hydra)


def small_params(checkpoint: Path, out: Path, *overrides: str) -> FullFinetuneParams:
    """The params of a short run of SMALL_MODEL from `checkpoint` into `out`: sequences of 128
    tokens, batches of 2. `overrides` come last and win; a `recipe=...` among them picks the
    schema."""
    recipe = [o for o in overrides if o.startswith("recipe=")]
    rest = [o for o in overrides if not o.startswith("recipe=")]
    return build_params(
        compose_config(
            [
                *recipe,
                *model_overrides(SMALL_MODEL),
                f"checkpoint={checkpoint}",
                f"output_dir={out}",
                "max_seq_len=128",
                "batch_size=2",
                *rest,
            ]
        )
    )


def small_model(seed: int = 0, cfg: ModelConfig = SMALL_MODEL) -> Llama:
    """A model of `cfg` with finetune's random initialisation, the same for the same seed."""
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def random_tokens(
    shape: tuple[int, ...] = (2, 16), seed: int = 1, cfg: ModelConfig = SMALL_MODEL
) -> torch.Tensor:
    """Token ids drawn uniformly from `cfg`'s vocabulary, the same for the same seed."""
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def write_checkpoint(directory: Path, cfg: ModelConfig = SMALL_MODEL, seed: int = 0) -> Path:
    """A randomly initialised model in finetune's output format, with the shipped tokenizer."""
    model = small_model(seed, cfg)
    save_hf(model, directory, tokenizer=TINY_TOKENIZER, bos_id=1, eos_id=2, dtype=torch.float32)
    return directory


def write_adapter(
    directory: Path, base: Path, cfg: ModelConfig = SMALL_MODEL, seed: int = 0, rank: int = 4
) -> Path:
    """A LoRA adapter on q_proj and v_proj for a model of `cfg`, with random (non-zero) tensors, in
    PEFT's layout, naming `base` as its base model."""
    model = small_model(seed, cfg)
    lora_cfg = LoraConfig(rank=rank, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    apply_lora(model, lora_cfg)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in lora_modules(model).values():
            weight = module.lora_B.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    save_adapter(model, directory, str(base), lora_cfg)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metrics_rows(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl, training and validation rows alike, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row of a run's metrics.jsonl."""
    return [(row["step"], row["loss"]) for row in metrics_rows(run_dir) if "loss" in row]


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, stdin: str = ""
) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` in a subprocess, as a user would type it, with `stdin` piped
    in (never the terminal the tests run from: recipe=generate would chat on it)."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


# Two processes of one thread each: the machine's two cores, whatever the default would pick.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def small_run(small_checkpoint: Path, *overrides: str) -> list[str]:
    """Overrides of a short run of the small model: 4 steps of 2 x 2 sequences."""
    return [
        *model_overrides(SMALL_MODEL),
        f"checkpoint={small_checkpoint}",
        "max_seq_len=128",
        "batch_size=2",
        "max_steps=4",
        "lr=1e-3",
        "warmup_steps=0",
        *overrides,
    ]


def run_on_two(
    small_checkpoint: Path, tmp_path: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m finetune ... nproc_per_node=2` on the small run, from `tmp_path`."""
    args = small_run(small_checkpoint, "nproc_per_node=2", *overrides)
    return run_cli(*args, cwd=tmp_path, env={**ONE_THREAD, **(env or {})})


def run_cli_signalled(
    args: list[str], signum: int, when: str, cwd: Path | None = None
) -> tuple[int, str]:
    """`python -m finetune ARGS`, sent `signum` as soon as it prints a line starting with
    `when`; (its exit status, everything it printed)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(when):
            process.send_signal(signum)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    return process.returncode, output


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("small_checkpoint"))


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(TINY_TOKENIZER)
