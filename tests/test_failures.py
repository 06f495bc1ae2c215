"""When the machine fails the run: GPU out of memory, a full disk, an unwritable output directory.
Each ends in one clear line, and what was saved before stays as it was."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from finetune import hf_format, outputs, training, training_state
from finetune.errors import UserError
from finetune.lora import apply_lora
from finetune.model import Llama
from finetune.outputs import (
    atomic_directory,
    check_free_space,
    checkpoints_at_once,
    write_error,
)
from finetune.recipes import full, lora
from finetune.training_state import checkpoint_dirs
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


def test_out_of_memory_keeps_an_odd_batch_whole(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_out_of_memory(monkeypatch)
    params = small_params(small_checkpoint, tmp_path, "batch_size=3")
    with pytest.raises(UserError, match="batch_size=1 with gradient_accumulation_steps=3 \\("):
        full.run(params)


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
        f"{(3 * 12 + 4) * n_weights / 1e9:.2f} GB (3 new checkpoint(s) of "
        f"{12 * n_weights / 1e9:.2f} GB and {4 * n_weights / 1e9:.2f} GB of model); free space, "
        "lower keep_last_n, or choose another hydra.run.dir"
    )
    assert not (tmp_path / "params.yaml").exists() and not (tmp_path / "metrics.jsonl").exists()

    # Resuming, the checkpoints already on disk are part of those that exist at once.
    with pytest.raises(UserError, match=r"\(1 new checkpoint\(s\) of"):
        check_free_space(Llama(SMALL_MODEL), params, 10, 2, saved_bytes=4 * n_weights)


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
        ([], 4),  # output_dtype=auto: the checkpoint's fp32
        (["dtype=bf16"], 4),  # bf16 compute saves the checkpoint's dtype still
        (["output_dtype=bf16"], 2),
        (["output_dtype=bf16", "output_format=meta"], 4),  # Hugging Face and Meta copies
        (["recipe=lora", "save_merged=false"], 0),  # the adapter only
        (["recipe=lora", "output_dtype=fp16"], 2),  # the adapter and the merged model
    ],
)
def test_saved_bytes_of_each_recipe(
    overrides: list[str], bytes_per_weight: int, small_checkpoint: Path, tmp_path: Path
) -> None:
    params = small_params(small_checkpoint, tmp_path, *overrides)
    model = Llama(SMALL_MODEL)
    n_weights = sum(p.numel() for p in model.parameters())
    adapter = 0
    if "recipe=lora" in overrides:
        apply_lora(model, params.lora)
        adapter = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    recipe = lora if "recipe=lora" in overrides else full
    assert recipe.saved_bytes(model, params) == bytes_per_weight * n_weights + adapter


class DiskWithRoom(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes fill it, then fail with ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.room == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), self.room)
        self.room -= n
        return n


def torch_save_onto_a_full_disk(obj: object) -> None:
    """What torch.save does when the disk fills: a RuntimeError raised while handling ENOSPC."""
    real_torch_save(obj, io.BufferedWriter(DiskWithRoom(1000)))


real_torch_save = torch.save


def test_write_error_finds_the_os_error_behind_torch_and_safetensors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as torch_error:
        torch_save_onto_a_full_disk({"w": torch.zeros(10_000)})
    found = write_error(torch_error.value)
    assert found is not None and found.errno == errno.ENOSPC

    with pytest.raises(SafetensorError) as safetensors_error:
        save_file({"w": torch.zeros(10)}, tmp_path / "no_such_dir" / "w.safetensors")
    found = write_error(safetensors_error.value)
    assert found is not None and found.strerror == "No such file or directory"

    assert write_error(ValueError("a bug, not a write")) is None


def fail_writes_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int) -> None:
    """Let `module.name` (a function that writes a file) work `n` times, then fail as it does
    when the disk is full."""
    real = getattr(module, name)
    calls = []

    def write(obj: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) <= n:
            return real(obj, *args, **kwargs)
        if name == "save_file":  # safetensors' own report of the failed write
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return torch_save_onto_a_full_disk(obj)

    monkeypatch.setattr(module, name, write)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every tensor of the second checkpoint fails to write, as DCP reports it.
    real_write = training_state.dcp.FileSystemWriter.write_data
    saves = []

    def write_data(self: object, plan: object, planner: object) -> object:
        saves.append(1)
        if len(saves) == 2:
            torch_save_onto_a_full_disk({"w": torch.zeros(10_000)})
        return real_write(self, plan, planner)

    monkeypatch.setattr(training_state.dcp.FileSystemWriter, "write_data", write_data)
    params = small_params(small_checkpoint, tmp_path, "max_steps=6", "save_every_n_steps=2")
    with pytest.raises(UserError) as error:
        full.run(params)
    checkpoints = tmp_path / "checkpoints"
    assert str(error.value) == (
        f"{checkpoints / 'step_000004'}: could not write it (No space left on device); "
        f"nothing was written; the latest complete checkpoint is {checkpoints / 'step_000002'}"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002"]
    saved = json.loads((checkpoints / "step_000002" / "training.json").read_text())
    assert saved["training"]["step"] == 2


def test_a_full_disk_while_saving_the_model_keeps_the_earlier_model(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = ("max_steps=1", "save_every_n_steps=1")
    full.run(small_params(small_checkpoint, tmp_path, *run))
    model_dir = tmp_path / "model"
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    # Resumed, as only a resumed run may replace a finished run's model.
    fail_writes_after(monkeypatch, hf_format, "save_file", 0)
    with pytest.raises(UserError) as error:
        full.run(small_params(small_checkpoint, tmp_path, *run, "resume=true"))
    assert str(error.value) == (
        f"{model_dir}: could not write it (No space left on device); its previous contents are kept"
    )
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model")) == ["model"]


def test_an_interrupted_replacement_keeps_the_old_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src: Path, dst: Path) -> None:
        calls.append(1)
        if len(calls) == 2:  # the old directory is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (target / "weights").read_text() == "old"

    # A kill -9 at that instant leaves the old contents under model.old: the next write, and
    # the next listing of checkpoints, put them back first.
    os.replace(target, tmp_path / "model.old")
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("the new write fails too")
    assert (target / "weights").read_text() == "old"
    step = tmp_path / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    (step / "training.json").write_text("")
    os.replace(step, step.with_name("step_000003.old"))
    assert checkpoint_dirs(tmp_path) == [step]


def test_written_files_get_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "model") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


def test_a_new_run_refuses_a_directory_with_another_runs_checkpoints(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    full.run(small_params(small_checkpoint, tmp_path, "max_steps=4", "save_every_n_steps=2"))
    # As a run stopped before its end leaves it: checkpoints, no model (a finished run's model
    # refuses a new run first).
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(UserError) as error:
        full.run(small_params(small_checkpoint, tmp_path, "max_steps=4"))
    assert str(error.value) == (
        f"{tmp_path / 'checkpoints'}: holds checkpoints of an earlier run (up to step_000004); "
        "resume=true continues that run, or run in another hydra.run.dir"
    )
    older = tmp_path / "checkpoints" / "step_000002"
    with pytest.raises(UserError, match="checkpoints of steps after 2, which this run would redo"):
        full.run(small_params(small_checkpoint, tmp_path, "max_steps=4", f"resume={older}"))


def test_an_output_directory_hydra_cannot_create_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    result = run_cli(f"hydra.run.dir={tmp_path}/a_file/run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path}/a_file/run: Not a directory\n"
