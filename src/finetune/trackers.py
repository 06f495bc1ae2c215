"""Experiment trackers: every row metrics.jsonl gets, sent to TensorBoard, Weights & Biases
(offline) or MLflow (`logger=tensorboard`, `logger=[tensorboard,mlflow]`), with the run's
parameters as hyperparameters.

Each tracker is reached through its own library, imported only when chosen (installed by
`pip install 'finetune[<name>]'`; config.LoggerConfig refuses a missing one before the run).
A sweep's jobs are one tracker run each, grouped by the sweep: TensorBoard's runs are the jobs'
directories under the sweep's, W&B's `group` and MLflow's `sweep` tag are the sweep's directory,
and MLflow's default store is the sweep's `mlruns/`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from finetune.config import FullFinetuneParams

# What a row holds besides numbers to plot: the x axis.
STEP = "step"


class Tracker(Protocol):
    def log(self, row: dict[str, float]) -> None:
        """Record a metrics.jsonl row (`step` and its values)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunIdentity:
    """Where a tracker run belongs: its name, and the sweep it is a job of (None for a run)."""

    name: str
    sweep: str | None


def run_identity(output_dir: Path) -> RunIdentity:
    """A sweep job is named by its number within the sweep's directory; a run by its directory."""
    if HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        return RunIdentity(name=f"job {hydra.job.num}", sweep=str(hydra.sweep.dir))
    return RunIdentity(name=output_dir.name, sweep=None)


def hyperparameters(params: FullFinetuneParams) -> dict[str, Any]:
    """Every field of `params`, flattened with dotted names (`lora.rank`), as numbers, booleans
    and strings: what all three trackers take as hyperparameters."""
    tree = OmegaConf.to_container(OmegaConf.structured(params), enum_to_str=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{prefix}{key}.")
            return
        name = prefix.rstrip(".")
        flat[name] = node if isinstance(node, (int, float, bool, str)) else str(node)

    walk(tree, "")
    return flat


def values_of(row: dict[str, float]) -> dict[str, float]:
    """The numbers of a row, its step left out (it is the x axis)."""
    return {key: float(value) for key, value in row.items() if key != STEP}


class TensorBoardTracker:
    """Event files in `<run dir>/tensorboard`; the hyperparameters in TensorBoard's HParams tab."""

    def __init__(self, params: FullFinetuneParams, identity: RunIdentity) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(Path(params.output_dir) / "tensorboard"))
        # Written first, so that a run stopped early shows its parameters too; the metrics named
        # are the scalars the rows add under the same tags.
        metrics = {"loss": 0.0, "val_loss": 0.0}
        for summary in hparams(hyperparameters(params), metrics):
            self.writer.file_writer.add_summary(summary)

    def log(self, row: dict[str, float]) -> None:
        for key, value in values_of(row).items():
            self.writer.add_scalar(key, value, global_step=int(row[STEP]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in offline mode (WANDB_MODE, when set, wins), in `<run dir>/wandb`."""

    def __init__(self, params: FullFinetuneParams, identity: RunIdentity) -> None:
        import wandb

        self.run = wandb.init(
            project=params.logger.project,
            dir=params.output_dir,
            mode=os.environ.get("WANDB_MODE", "offline"),
            name=identity.name,
            group=identity.sweep,
            config=hyperparameters(params),
            reinit="create_new",  # a sweep's jobs run one after another in one process
            # Its console capture would wrap stdout, which the progress lines already go to.
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, row: dict[str, float]) -> None:
        self.run.log(values_of(row), step=int(row[STEP]))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """A run of the `logger.project` experiment in `logger.mlflow_uri`'s store (default: a file
    store in the sweep's, else the run's, `mlruns/`), through MLflow's client, which keeps no
    global active run."""

    def __init__(self, params: FullFinetuneParams, identity: RunIdentity) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = params.logger.mlflow_uri
        if not uri:
            uri = (Path(identity.sweep or params.output_dir).absolute() / "mlruns").as_uri()
            # MLflow 3 refuses its file store unless asked for it: a file store needs no server
            # and no database, and `mlflow ui --backend-store-uri` reads it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        experiment_id = self.experiment_id(params.logger.project)
        tags = {"sweep": identity.sweep} if identity.sweep else {}
        run = self.client.create_run(experiment_id, run_name=identity.name, tags=tags)
        self.run_id = run.info.run_id
        hparams = [Param(key, str(value)) for key, value in hyperparameters(params).items()]
        self.client.log_batch(self.run_id, params=hparams)

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # a sweep job running in parallel created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        step, now = int(row[STEP]), int(1000 * time.time())
        metrics = [Metric(key, value, now, step) for key, value in values_of(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(params: FullFinetuneParams) -> list[Tracker]:
    """A tracker for each one `params.logger` switches on, started (in that order)."""
    identity = run_identity(Path(params.output_dir))
    return [TRACKERS[name](params, identity) for name in params.logger.chosen]
