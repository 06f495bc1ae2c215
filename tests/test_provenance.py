"""provenance.json: the code, libraries, device, command line and input hashes of a run, and a
rerun's warning about each input file that differs from the ones its earlier run read."""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from finetune import provenance
from finetune.provenance import PROVENANCE_FILE, changed_inputs, git_state
from finetune.recipes import eval as eval_recipe
from finetune.recipes import full, lora
from tests.conftest import (
    SAMPLE_DATA,
    SMALL_MODEL,
    model_overrides,
    run_cli,
    small_params,
    write_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_provenance(run_dir: Path) -> dict:
    return json.loads((run_dir / PROVENANCE_FILE).read_text())


def first_rows(path: Path, n: int) -> Path:
    path.write_text("".join(SAMPLE_DATA.read_text().splitlines(keepends=True)[:n]))
    return path


def test_a_training_run_records_code_libraries_device_command_and_input_hashes(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    data = first_rows(tmp_path / "data.jsonl", 8)
    out = tmp_path / "run"
    full.run(small_params(small_checkpoint, out, f"dataset.path={data}", "max_steps=1"))

    recorded = read_provenance(out)
    assert recorded["finetune"]["version"] == metadata.version("finetune")
    if shutil.which("git") and (REPO / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        assert recorded["finetune"]["git_commit"] == head.stdout.strip()
        assert isinstance(recorded["finetune"]["git_dirty"], bool)
    assert recorded["python"] == platform.python_version()
    assert recorded["libraries"]["torch"] == metadata.version("torch")
    assert recorded["libraries"]["hydra-core"] == metadata.version("hydra-core")
    assert recorded["libraries"]["omegaconf"] == metadata.version("omegaconf")
    assert recorded["libraries"]["transformers"] == metadata.version("transformers")
    assert recorded["device"].startswith("cpu: ")
    assert recorded["command"] == shlex.join(sys.orig_argv)
    files = {
        "dataset.path": data,
        "tokenizer": small_checkpoint / "tokenizer.model",
        "checkpoint/config.json": small_checkpoint / "config.json",
        "checkpoint/model.safetensors": small_checkpoint / "model.safetensors",
    }
    assert recorded["files"] == {
        what: {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256(path)}
        for what, path in files.items()
    }


def test_a_lora_run_from_an_adapter_and_an_eval_record_their_inputs(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    data = first_rows(tmp_path / "data.jsonl", 8)
    first, second = tmp_path / "first", tmp_path / "second"
    args = ("recipe=lora", f"dataset.path={data}", "max_steps=1", "save_merged=false")
    lora.run(small_params(small_checkpoint, first, *args))
    lora.run(small_params(small_checkpoint, second, *args, f"adapter={first / 'adapter'}"))
    adapter_weights = first / "adapter" / "adapter_model.safetensors"
    recorded = read_provenance(second)["files"]
    assert recorded["adapter/adapter_model.safetensors"]["sha256"] == sha256(adapter_weights)
    assert recorded["adapter/adapter_config.json"]["bytes"] > 0

    evaluated = tmp_path / "eval"
    eval_recipe.run(
        small_params(small_checkpoint, evaluated, "recipe=eval", f"dataset.path={data}")
    )
    recorded = read_provenance(evaluated)["files"]
    assert set(recorded) == {
        "dataset.path",
        "tokenizer",
        "checkpoint/config.json",
        "checkpoint/model.safetensors",
    }
    assert recorded["dataset.path"]["sha256"] == sha256(data)


def test_git_state_is_left_out_outside_a_checkout_or_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert git_state(tmp_path) == {}
    if shutil.which("git") and (REPO / ".git").exists():
        assert set(git_state(REPO / "src" / "finetune")) == {"git_commit", "git_dirty"}
    # The package inside some other repository (a virtual environment in it) is not its code.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=False, capture_output=True)
    (tmp_path / "lib" / "finetune").mkdir(parents=True)
    assert git_state(tmp_path / "lib" / "finetune") == {}
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert git_state(REPO / "src" / "finetune") == {}


def test_a_rerun_warns_once_for_each_input_file_that_changed(
    tmp_path: Path,
) -> None:
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    data = first_rows(tmp_path / "data.jsonl", 8)
    first = tmp_path / "first"
    args = [
        *model_overrides(SMALL_MODEL),
        f"checkpoint={checkpoint}",
        f"dataset.path={data}",
        "max_seq_len=128",
        "max_steps=1",
    ]
    result = run_cli(*args, f"hydra.run.dir={first}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    unchanged = run_cli(f"rerun={first}", f"hydra.run.dir={tmp_path / 'same'}", cwd=tmp_path)
    assert unchanged.returncode == 0, unchanged.stderr
    assert "differs from the file" not in unchanged.stdout + unchanged.stderr

    first_rows(data, 6)  # the data file edited, the weights replaced by others
    write_checkpoint(checkpoint, seed=1)
    again = run_cli(f"rerun={first}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    output = again.stdout + again.stderr
    warnings = [line for line in output.splitlines() if "differs from the file" in line]
    recorded = read_provenance(first)["files"]
    weights = checkpoint / "model.safetensors"
    assert [line.split(" - ", 1)[1] for line in warnings] == [
        f"dataset.path: {data} (sha256 {sha256(data)[:12]}…) differs from the file the run in "
        f"{first} read, {data} (sha256 {recorded['dataset.path']['sha256'][:12]}…)",
        f"checkpoint/model.safetensors: {weights} (sha256 {sha256(weights)[:12]}…) differs from "
        f"the file the run in {first} read, {weights} "
        f"(sha256 {recorded['checkpoint/model.safetensors']['sha256'][:12]}…)",
    ]
    # Said before training starts.
    assert output.index("differs from the file") < output.index("training started")
    assert read_provenance(tmp_path / "again")["files"]["dataset.path"]["sha256"] == sha256(data)


def test_an_unreadable_earlier_provenance_is_one_line_not_a_failure(tmp_path: Path) -> None:
    (tmp_path / PROVENANCE_FILE).write_text("{not json")
    (line,) = changed_inputs(tmp_path, {})
    assert line.startswith(f"{tmp_path / PROVENANCE_FILE}: not readable (")
    assert line.endswith("); inputs not compared")


def test_hashes_started_with_the_run_are_the_ones_recorded(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = small_params(small_checkpoint, tmp_path)
    provenance.start_hashing(params)
    assert params.output_dir in provenance._pending
    records = provenance.hashed_inputs(params)
    assert params.output_dir not in provenance._pending
    assert records == provenance.file_records(provenance.input_files(params))
