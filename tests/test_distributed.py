"""A run sharded over two processes (FSDP2 on gloo, one thread each) trains exactly what one
process trains on the same global batch: the same losses step by step, the same weights, the same
adapters, QLoRA's on a sharded 4-bit base too; its checkpoints resume at another process count;
its model loads in transformers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from finetune.checkpoint import load_hf
from finetune.recipes import full, lora
from tests.conftest import (
    SMALL_MODEL,
    logged_losses,
    max_abs_diff,
    metrics_rows,
    model_overrides,
    random_tokens,
    run_on_two,
    small_params,
    write_checkpoint,
)

pytestmark = pytest.mark.slow

# Four steps of four sequences; checkpoints after steps 2 and 4, all kept. (At a larger lr,
# Adam's division by the root of tiny second moments amplifies the rounding of summing the
# gradients in another order past 1e-5.)
RUN = ("max_steps=4", "lr=1e-4", "warmup_steps=0", "save_every_n_steps=2", "keep_last_n=0")
MODEL = "model/model.safetensors"
# LoRA without dropout: its masks are drawn per process, from different batches.
LORA = ("recipe=lora", "lora.dropout=0", "lora.use_dora=true")
# QLoRA shards each NF4 layer in equal parts of whole groups of 64 x 256 weights, one per process:
# every linear of the blocks here holds a multiple of 2 x 16384 (SMALL_MODEL's hold 4096).
QLORA_MODEL = dataclasses.replace(SMALL_MODEL, dim=256, ffn_dim=512)
QLORA = (*LORA, "lora.quantize_base=true", *model_overrides(QLORA_MODEL))
ADAPTER = "adapter/adapter_model.safetensors"


def one_process(checkpoint: Path, out: Path, *overrides: str) -> Path:
    """The run in this process, batch 4: `small_params` as the CLI reads `checkpoint=`."""
    params = small_params(checkpoint, out, "model=auto", "batch_size=4", *RUN, *overrides)
    recipe = lora if "recipe=lora" in overrides else full
    recipe.run(params)
    return out


def two_processes(checkpoint: Path, out: Path, *overrides: str) -> Path:
    """`python -m finetune ... nproc_per_node=2`, batch 2 on each (the same global batch)."""
    result = run_on_two(checkpoint, out.parent, *RUN, f"hydra.run.dir={out}", *overrides)
    assert result.returncode == 0, result.stderr
    return out


def assert_same_losses(run: Path, reference: Path, first_step: int = 1) -> None:
    ours, theirs = logged_losses(run), logged_losses(reference)[first_step - 1 :]
    assert [step for step, _ in ours] == [step for step, _ in theirs]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs, strict=True)) <= 1e-5


def assert_same_tensors(file: Path, reference: Path) -> None:
    ours, theirs = load_file(file), load_file(reference)
    assert ours.keys() == theirs.keys()
    assert max(max_abs_diff(ours[key], theirs[key]) for key in ours) <= 1e-5


@pytest.fixture(scope="module")
def runs(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return {
        "one": one_process(small_checkpoint, root / "one"),
        # Its checkpoints written in the background, each process its shard.
        "two": two_processes(small_checkpoint, root / "two", "async_save=true"),
    }


def test_two_processes_train_as_one_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    assert_same_losses(runs["two"], runs["one"])
    assert_same_tensors(
        runs["two"] / "model/model.safetensors", runs["one"] / "model/model.safetensors"
    )


def test_a_sharded_run_writes_one_set_of_files(runs: dict[str, Path]) -> None:
    files = {p.name for p in runs["two"].iterdir()}
    assert {"metrics.jsonl", "params.yaml", "loss.png", "model", "checkpoints", ".hydra"} <= files
    step = runs["two"] / "checkpoints" / "step_000002"
    # Each process wrote its own shard of the training state.
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (step / "training.json").is_file() and (step / "rng.pt").is_file()


def test_the_sharded_runs_model_loads_in_transformers(runs: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = runs["two"] / "model"
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = load_hf(SMALL_MODEL, runs["one"] / "model", torch.device("cpu"), torch.float32)
    tokens = random_tokens((2, 33))
    with torch.no_grad():
        assert max_abs_diff(reference(tokens).logits, ours(tokens)) <= 1e-4


def test_a_checkpoint_of_two_processes_resumes_on_one(
    runs: dict[str, Path], small_checkpoint: Path, tmp_path: Path
) -> None:
    saved = runs["two"] / "checkpoints" / "step_000002"
    resumed = one_process(small_checkpoint, tmp_path / "resumed", f"resume={saved}")
    assert_same_losses(resumed, runs["one"], first_step=3)
    assert_same_tensors(resumed / MODEL, runs["one"] / MODEL)


def test_a_checkpoint_of_one_process_resumes_on_two_with_offloaded_shards(
    runs: dict[str, Path], small_checkpoint: Path, tmp_path: Path
) -> None:
    saved = runs["one"] / "checkpoints" / "step_000002"
    resumed = two_processes(
        small_checkpoint, tmp_path / "resumed", f"resume={saved}", "cpu_offload=true"
    )
    assert_same_losses(resumed, runs["one"], first_step=3)
    assert_same_tensors(resumed / MODEL, runs["one"] / MODEL)


def test_a_checkpoint_of_two_processes_resumes_on_two_with_activation_checkpointing(
    runs: dict[str, Path], small_checkpoint: Path, tmp_path: Path
) -> None:
    saved = runs["two"] / "checkpoints" / "step_000002"
    overrides = (f"resume={saved}", "activation_checkpointing=true")
    resumed = two_processes(small_checkpoint, tmp_path / "resumed", *overrides)
    assert_same_losses(resumed, runs["two"], first_step=3)
    assert_same_tensors(resumed / MODEL, runs["two"] / MODEL)


def test_bf16_on_two_processes_follows_one(small_checkpoint: Path, tmp_path: Path) -> None:
    """bf16 weights gathered and fp32 gradients reduced (FSDP's mixed precision) against one
    process's bf16 autocast: the same steps, to bf16's rounding."""
    one = one_process(small_checkpoint, tmp_path / "one", "dtype=bf16")
    two = two_processes(small_checkpoint, tmp_path / "two", "dtype=bf16")
    ours, theirs = logged_losses(two), logged_losses(one)
    assert [step for step, _ in ours] == [1, 2, 3, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs, strict=True)) <= 1e-2


def test_lora_on_two_processes_with_accumulation_trains_as_one(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    """DoRA adapters on a sharded frozen base, one sequence per micro-batch, two micro-batches
    a step: the adapters, their checkpoint and the merged model are one process's; so is the
    validation loss, each process evaluating its share."""
    validation = ("dataset.val_split=0.01", "eval_every_n_steps=2")
    one = one_process(small_checkpoint, tmp_path / "one", *LORA, *validation)
    two = two_processes(
        small_checkpoint,
        tmp_path / "two",
        *LORA,
        *validation,
        "batch_size=1",
        "gradient_accumulation_steps=2",
    )
    assert_same_losses(two, one)
    val_losses = [
        [row["val_loss"] for row in metrics_rows(run) if "val_loss" in row] for run in (one, two)
    ]
    assert len(val_losses[0]) == 2
    assert max(abs(a - b) for a, b in zip(*val_losses, strict=True)) <= 1e-5
    for file in (ADAPTER, MODEL):
        assert_same_tensors(two / file, one / file)
    assert_only_adapters_in(two / "checkpoints" / "step_000002")
    resumed = one_process(
        small_checkpoint,
        tmp_path / "resumed",
        *LORA,
        *validation,
        f"resume={two}/checkpoints/step_000002",
    )
    assert_same_losses(resumed, one, first_step=3)
    assert_same_tensors(resumed / ADAPTER, one / ADAPTER)


def assert_only_adapters_in(step: Path) -> None:
    """The checkpoint holds the adapters and their optimizer state, not the frozen base."""
    saved = dcp.FileSystemReader(step).read_metadata().state_dict_metadata
    weights = [key for key in saved if key.startswith("model.")]
    assert weights and all(".lora_" in key for key in weights)


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torchao")
    root = tmp_path_factory.mktemp("qlora")
    checkpoint = write_checkpoint(root / "base", QLORA_MODEL)
    return {
        "base": checkpoint,
        "one": one_process(checkpoint, root / "one", *QLORA),
        "two": two_processes(checkpoint, root / "two", *QLORA),
    }


def test_qlora_on_two_processes_trains_as_one(qlora_runs: dict[str, Path]) -> None:
    """The NF4 base sharded, each process holding its rows of the weight quantized whole: the
    losses, the DoRA adapters, their checkpoint and the merged model are one process's."""
    one, two = qlora_runs["one"], qlora_runs["two"]
    assert_same_losses(two, one)
    for file in (ADAPTER, MODEL):
        assert_same_tensors(two / file, one / file)
    assert_only_adapters_in(two / "checkpoints" / "step_000002")


def test_a_qlora_checkpoint_resumes_at_the_other_process_count(
    qlora_runs: dict[str, Path], tmp_path: Path
) -> None:
    """2 -> 1, and 1 -> 2 with the shards (the 4-bit base among them) offloaded to the CPU."""
    base, one, two = qlora_runs["base"], qlora_runs["one"], qlora_runs["two"]
    step = "checkpoints/step_000002"
    on_one = one_process(base, tmp_path / "on_one", *QLORA, f"resume={two / step}")
    on_two = two_processes(
        base, tmp_path / "on_two", *QLORA, f"resume={one / step}", "cpu_offload=true"
    )
    for resumed in (on_one, on_two):
        assert_same_losses(resumed, one, first_step=3)
        for file in (ADAPTER, MODEL):
            assert_same_tensors(resumed / file, one / file)
