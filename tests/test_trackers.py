"""Experiment trackers (`logger=`): the rows of metrics.jsonl and the parameters, read back with
each tracker's own reader; one tracker run per sweep job, grouped by the sweep; a missing package
is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune.recipes import full
from tests.conftest import (
    SMALL_MODEL,
    compose_config,
    metrics_rows,
    model_overrides,
    run_cli,
    small_params,
)

# 4 steps with a validation pass at steps 2 and 4: training rows and validation rows.
RUN = ("max_steps=4", "lr=1e-3", "dataset.val_split=0.1", "eval_every_n_steps=2")


def test_logger_options_switch_on_one_tracker_or_several() -> None:
    def chosen(*overrides: str) -> tuple[bool, bool, bool]:
        logger = compose_config(list(overrides)).logger
        return logger.tensorboard, logger.wandb, logger.mlflow

    assert chosen() == (False, False, False)
    assert chosen("logger=tensorboard") == (True, False, False)
    assert chosen("logger=[tensorboard,mlflow]") == (True, False, True)
    assert chosen("logger=[wandb,mlflow]", "logger.project=demo") == (False, True, True)
    assert chosen("logger=none") == (False, False, False)


def test_a_missing_tracker_package_is_one_line_naming_the_key_and_the_pip_command(
    tmp_path: Path,
) -> None:
    # A site hook that makes `wandb` unimportable, as if it were not installed.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    result = run_cli(
        "logger=[tensorboard,wandb]",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env={"PYTHONPATH": str(hook)},
    )
    assert result.returncode == 2
    assert (
        result.stderr == "error: logger: wandb needs its package: pip install 'finetune[wandb]'\n"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in metrics_rows(run_dir) if key in row]


def test_tensorboard_gets_every_metrics_row_and_the_parameters(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard", reason="pip install 'finetune[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    full.run(small_params(small_checkpoint, tmp_path, *RUN, "logger=tensorboard"))

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_perplexity"):
        scalars = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in scalars] == [step for step, _ in logged(tmp_path, key)]
        # Event files hold float32.
        assert [value for _, value in scalars] == pytest.approx(
            [value for _, value in logged(tmp_path, key)], rel=1e-6
        )
    assert [step for step, _ in logged(tmp_path, "val_loss")] == [2, 4]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 1e-3
    assert hparams["max_steps"].number_value == 4
    assert hparams["dtype"].string_value == "fp32"
    assert hparams["dataset.val_split"].number_value == pytest.approx(0.1)


def mlflow_runs(store: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list]:
    """(MLflow's client on the file store `store`, its `finetune` experiment's runs by name)."""
    mlflow = pytest.importorskip("mlflow", reason="pip install 'finetune[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads one only if told
    client = mlflow.tracking.MlflowClient(store.absolute().as_uri())
    experiment = client.get_experiment_by_name("finetune")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])


def test_mlflow_gets_every_metrics_row_and_the_parameters(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="pip install 'finetune[mlflow]'")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the tracker allows its own
    full.run(small_params(small_checkpoint, tmp_path, *RUN, "logger=mlflow"))

    client, runs = mlflow_runs(tmp_path / "mlruns", monkeypatch)
    (run,) = runs
    assert run.info.run_name == tmp_path.name
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001"
    assert run.data.params["lr_schedule"] == "cosine"
    assert run.data.params["dataset.val_split"] == "0.1"
    for key in ("loss", "lr", "val_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == logged(tmp_path, key)


def wandb_records(path: Path) -> list[bytes]:
    """The records of an offline run's `.wandb` file. wandb 0.31 ships no Python reader of it
    (its Go core reads it), so the framing is read here: a 7-byte file header, then 32 KiB blocks
    of records, each with a 7-byte header (CRC, length, type: 1 whole, 2-4 first/middle/last
    part); the records themselves are decoded by wandb's own protobuf classes."""
    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    return records


def wandb_items(items: Any) -> dict[str, Any]:
    """{key: value} of a history or config record's items (a key is `key` or `nested_key`)."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_gets_every_metrics_row_and_the_parameters(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("wandb", reason="pip install 'finetune[wandb]'")
    from wandb.proto import wandb_internal_pb2

    full.run(small_params(small_checkpoint, tmp_path, *RUN, "logger=wandb"))

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history: list[dict] = []
    config: dict = {}
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("history"):
            history.append(wandb_items(record.history.item))
        elif record.HasField("run"):
            config |= wandb_items(record.run.config.update)
    for key in ("loss", "lr", "val_loss"):
        rows = [(row["_step"], row[key]) for row in history if key in row]
        assert rows == logged(tmp_path, key)
    assert config["lr"] == 1e-3 and config["lr_schedule"] == "cosine"
    assert config["dataset.val_split"] == 0.1


def test_a_sweep_is_one_tracker_run_per_job_grouped_by_the_sweep(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard", reason="pip install 'finetune[tensorboard]'")
    pytest.importorskip("mlflow", reason="pip install 'finetune[mlflow]'")
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "lr=1e-3,2e-3",
        "logger=[tensorboard,mlflow]",
        *model_overrides(SMALL_MODEL),
        f"checkpoint={small_checkpoint}",
        "max_seq_len=128",
        "batch_size=2",
        "max_steps=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    _, runs = mlflow_runs(sweep_dir / "mlruns", monkeypatch)
    assert [run.info.run_name for run in runs] == ["job 0", "job 1"]
    assert {run.data.tags["sweep"] for run in runs} == {str(sweep_dir)}
    assert [run.data.params["lr"] for run in runs] == ["0.001", "0.002"]
    for job in ("0", "1"):
        assert list((sweep_dir / job / "tensorboard").glob("events.out.tfevents.*"))
