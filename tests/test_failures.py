"""When the machine fails the run: GPU out of memory, a full disk, an unwritable output directory.
Each ends in one clear line, and what was saved before stays as it was."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from finetune import checkpoint, outputs, state, training
from finetune.errors import UserError
from finetune.lora import apply_lora
from finetune.model import Llama
from finetune.outputs import checkpoints_at_once, final_model_bytes
from finetune.recipes import full, lora
from tests.conftest import SMALL_MODEL, run_cli, small_params

TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity of 79.19 GiB "
    "of which 1.02 GiB is free. Of the allocated memory 75.1 GiB is allocated by PyTorch"
)


def run_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def step(*args: object, **kwargs: object) -> training.StepResult:
        raise torch.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(training, "train_step", step)


def test_out_of_memory_names_every_setting_that_lowers_memory(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_out_of_memory(monkeypatch)
    params = small_params(small_checkpoint, tmp_path, "batch_size=8", "max_seq_len=128")
    with pytest.raises(UserError) as error:
        full.run(params)
    assert str(error.value) == (
        "out of GPU memory (Tried to allocate 1.95 GiB); settings that lower memory: "
        "batch_size=4 with gradient_accumulation_steps=2 (the same effective batch), "
        "activation_checkpointing=true, dtype=bf16, recipe=lora, a max_seq_len below 128"
    )


def test_out_of_memory_leaves_out_settings_already_in_use(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_out_of_memory(monkeypatch)
    params = small_params(
        small_checkpoint,
        tmp_path,
        "recipe=lora",
        "batch_size=1",
        "activation_checkpointing=true",
        "dtype=bf16",
    )
    with pytest.raises(UserError) as error:
        lora.run(params)
    assert str(error.value) == (
        "out of GPU memory (Tried to allocate 1.95 GiB); settings that lower memory: "
        "lora.quantize_base=true, a max_seq_len below 128"
    )


def test_a_run_that_cannot_fit_on_the_disk_stops_before_training(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _: usage._replace(free=10**6))
    # 3 checkpoints at once (keep_last_n=2 and the one being written), each the fp32 weights
    # and AdamW's two moments; then the model in fp32.
    n_weights = sum(p.numel() for p in Llama(SMALL_MODEL).parameters())
    params = small_params(small_checkpoint, tmp_path, "max_steps=10", "save_every_n_steps=2")
    with pytest.raises(UserError) as error:
        full.run(params)
    assert str(error.value) == (
        f"output_dir={tmp_path}: 0.00 GB free on its disk, but the run writes about "
        f"{(3 * 12 + 4) * n_weights / 1e9:.2f} GB (3 checkpoints of "
        f"{12 * n_weights / 1e9:.2f} GB and {4 * n_weights / 1e9:.2f} GB of model); free space, "
        "lower keep_last_n, or choose another hydra.run.dir"
    )
    assert not (tmp_path / "params.yaml").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], 0),  # no step checkpoints
        (["save_every_n_steps=10"], 3),  # keep_last_n=2, and the one being written
        (["save_every_n_steps=10", "keep_last_n=0"], 10 + 1),  # every 10 of 100, 1 epoch end
        (["save_every_n_steps=50", "keep_last_n=5"], 2 + 1),  # fewer saves than kept
    ],
)
def test_checkpoints_at_once(
    overrides: list[str], expected: int, small_checkpoint: Path, tmp_path: Path
) -> None:
    params = small_params(small_checkpoint, tmp_path, "max_steps=100", *overrides)
    assert checkpoints_at_once(params, 100) == expected


@pytest.mark.parametrize(
    ("overrides", "bytes_per_weight"),
    [
        ([], 4),
        (["dtype=bf16"], 2),
        (["dtype=bf16", "output_format=meta"], 4),  # Hugging Face and Meta copies
        (["recipe=lora", "save_merged=false"], 0),  # the adapter only
        (["recipe=lora", "dtype=bf16"], 2),  # the adapter and the merged model
    ],
)
def test_final_model_bytes(
    overrides: list[str], bytes_per_weight: int, small_checkpoint: Path, tmp_path: Path
) -> None:
    params = small_params(small_checkpoint, tmp_path, *overrides)
    model = Llama(SMALL_MODEL)
    n_weights = sum(p.numel() for p in model.parameters())
    adapter = 0
    if "recipe=lora" in overrides:
        apply_lora(model, params.lora)
        adapter = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert final_model_bytes(model, params) == bytes_per_weight * n_weights + adapter


def fail_writes_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int) -> None:
    """Make `module.name` (a function that writes a file) fail with ENOSPC after `n` calls."""
    real = getattr(module, name)
    calls = []

    def write(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, write)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_writes_after(monkeypatch, state.torch, "save", 1)
    params = small_params(small_checkpoint, tmp_path, "max_steps=6", "save_every_n_steps=2")
    with pytest.raises(UserError) as error:
        full.run(params)
    checkpoints = tmp_path / "checkpoints"
    assert str(error.value) == (
        f"{checkpoints / 'step_000004'}: could not write it (No space left on device); "
        f"nothing was written; the latest complete checkpoint is {checkpoints / 'step_000002'}"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002"]
    saved = torch.load(checkpoints / "step_000002" / "state.pt", weights_only=True)
    assert saved["training"]["step"] == 2


def test_a_full_disk_while_saving_the_model_keeps_the_earlier_model(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full.run(small_params(small_checkpoint, tmp_path, "max_steps=1"))
    model_dir = tmp_path / "model"
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    fail_writes_after(monkeypatch, checkpoint, "save_file", 0)
    with pytest.raises(UserError) as error:
        full.run(small_params(small_checkpoint, tmp_path, "max_steps=2"))
    assert str(error.value) == (
        f"{model_dir}: could not write it (No space left on device); its previous contents are kept"
    )
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model")) == ["model"]


def test_an_output_directory_hydra_cannot_create_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    result = run_cli(f"hydra.run.dir={tmp_path}/a_file/run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path}/a_file/run: Not a directory\n"
