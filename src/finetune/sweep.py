"""The sweep report: when a multirun ends, `summary.csv` and `summary.png` in the sweep directory.

`SweepReport` is a Hydra callback (registered under `hydra.callbacks` in conf/config.yaml). Each job
records how it ended in `job.json` in its own directory, because with the joblib or submitit
launchers `on_job_end` runs in another process than `on_multirun_end`; the report is then built
from the job directories alone. Only Hydra is imported here: this module loads on every start.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from finetune.metrics import late_loss

JOB_FILE = "job.json"

# Plugin configs that Hydra cannot find when their package is missing -> the extra that installs it.
PLUGIN_EXTRAS = {
    "hydra/sweeper/optuna": "sweep",
    "hydra/sweeper/sampler": "sweep",
    "hydra/launcher/joblib": "sweep",
    "hydra/launcher/submitit_local": "slurm",
    "hydra/launcher/submitit_slurm": "slurm",
}

# Set by `on_multirun_end` in the process that started the sweep, read by `main()` to choose the
# exit status: Hydra turns an exception raised in a callback into a warning.
failure_message: str | None = None
# The first SIGINT/SIGTERM of the sweep (set by interrupts.StopRequest, or by the job that a Ctrl-C
# interrupted outside training): the jobs after it are not run, and the sweep ends after its report.
stop_signal: int | None = None


class JobFailure(float):
    """What a job that did not complete returns in a sweep: NaN that carries why.

    Hydra's sweepers re-raise a failed job's exception once its batch is done, which ends the
    sweep; a float lets the sweep go on (or end with its report), and Optuna records a NaN trial
    as failed. `status` is "failed", "interrupted" (Ctrl-C or SIGTERM) or "not run" (after one).
    """

    error: str
    status: str

    def __new__(cls, error: str, status: str = "failed") -> JobFailure:
        failure = super().__new__(cls, math.nan)
        failure.error, failure.status = error, status
        return failure

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # joblib and submitit send the return value back from the worker by pickling it.
        return JobFailure, (self.error, self.status)


@dataclass
class JobRow:
    """One job of a sweep as `summary.csv` shows it."""

    job: int
    overrides: str
    status: str
    final_train_loss: float | None = None
    train_loss_last_10pct: float | None = None  # the mean over the last 10 % of steps
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    steps: int | None = None
    tokens_per_s: float | None = None
    wall_s: float | None = None
    error: str = ""


class SweepReport(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        record = job_outcome(job_return)
        job_dir = Path(config.hydra.runtime.output_dir)
        (job_dir / JOB_FILE).write_text(json.dumps(record) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global failure_message
        sweep_dir = Path(config.hydra.sweep.dir)
        rows, curves = read_sweep(sweep_dir)
        if not rows:
            return
        write_csv(rows, sweep_dir / "summary.csv")
        plot_curves(curves, sweep_dir / "summary.png")
        print(f"sweep summary: {sweep_dir / 'summary.csv'}")
        best = best_job(rows)
        if best is not None:
            print(f"best job: {best.job} ({best.overrides}): {best_metric(best)}")
        if stop_signal is not None and any(row.status != "completed" for row in rows):
            # Raised, not returned: Hydra lets a SystemExit through its callbacks, and so the
            # sweep ends with the signal's status, as an interrupted single run does.
            print(interrupted_sweep_message(rows, config), flush=True)
            raise SystemExit(128 + stop_signal)
        failed = [row for row in rows if row.status != "completed"]
        failure_message = (
            f"{len(failed)} of {len(rows)} jobs failed (jobs "
            f"{', '.join(str(row.job) for row in failed)}); see {sweep_dir / 'summary.csv'}"
            if failed
            else None
        )


def job_outcome(job_return: JobReturn) -> dict[str, Any]:
    """Status, error and return value of a finished job, as written to its `job.json`."""
    try:
        value = job_return.return_value
    except Exception as error:  # Hydra re-raises the job's own exception here.
        return {"status": "failed", "error": " ".join(str(error).split()), "result": None}
    if isinstance(value, JobFailure):
        return {"status": value.status, "error": value.error, "result": None}
    result = float(value) if isinstance(value, (int, float)) else None
    return {"status": "completed", "error": "", "result": result}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The numbered job directories (`hydra.sweep.subdir` is the job number), in job order."""
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def read_sweep(sweep_dir: Path) -> tuple[list[JobRow], dict[str, list[tuple[int, float]]]]:
    """A row per job, and each job's loss curve labelled by the overrides that vary in the sweep."""
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    overrides = [row.overrides.split() for row in rows]
    for row in rows:
        row.overrides = " ".join(map(rounded, row.overrides.split()))
    # Overrides every job shares (a model shrink, a checkpoint) would only make labels unreadable.
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    curves = {}
    for job_dir, row, job_overrides in zip(job_dirs(sweep_dir), rows, overrides, strict=True):
        label = " ".join(rounded(o) for o in job_overrides if o not in shared) or f"job {row.job}"
        curve, is_val = loss_curve(job_dir)
        if curve:
            curves[label if is_val else f"{label} (train)"] = curve
    return rows, curves


def read_job(job_dir: Path) -> JobRow:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
    row = JobRow(job=int(job_dir.name), overrides=" ".join(map(str, overrides)), status="unknown")
    outcome_file = job_dir / JOB_FILE
    if outcome_file.is_file():
        outcome = json.loads(outcome_file.read_text())
        row.status, row.error = outcome["status"], outcome["error"]
    else:
        row.error = "the job did not report an end (killed?)"
    train, val = split_metrics(job_dir)
    if train:
        row.final_train_loss = train[-1]["loss"]
        row.train_loss_last_10pct = late_loss(train)
        row.steps = train[-1]["step"]
        speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
        row.tokens_per_s = round(sum(speeds) / len(speeds), 1) if speeds else None
    if val:
        row.best_val_loss = min(r["val_loss"] for r in val)
        row.final_val_loss = val[-1]["val_loss"]
    elapsed = [r["elapsed_s"] for r in train + val if "elapsed_s" in r]
    row.wall_s = max(elapsed) if elapsed else None
    return row


def split_metrics(job_dir: Path) -> tuple[list[dict], list[dict]]:
    """The training rows and the validation rows of a job's metrics.jsonl (none if it has none)."""
    path = job_dir / "metrics.jsonl"
    if not path.is_file():
        return [], []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def loss_curve(job_dir: Path) -> tuple[list[tuple[int, float]], bool]:
    """Validation loss per step, or training loss when the job has no validation rows."""
    train, val = split_metrics(job_dir)
    if val:
        return [(r["step"], r["val_loss"]) for r in val], True
    return [(r["step"], r["loss"]) for r in train], False


def rounded(override: str) -> str:
    """`lr=0.000123456` as `lr=0.000123`: a sampled value (Optuna's) to 3 significant figures.
    A value already that short keeps its spelling (`lr=1e-4`)."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    short = f"{number:.3g}"
    return override if float(short) == number or math.isnan(number) else f"{key}={short}"


def best_job(rows: list[JobRow]) -> JobRow | None:
    """The completed job with the lowest validation loss; if none validated, the lowest mean
    training loss over the last 10 % of steps."""
    done = [row for row in rows if row.status == "completed"]
    with_val = [row for row in done if row.best_val_loss is not None]
    if with_val:
        return min(with_val, key=lambda row: row.best_val_loss)
    with_train = [row for row in done if row.train_loss_last_10pct is not None]
    return min(with_train, key=lambda row: row.train_loss_last_10pct) if with_train else None


def best_metric(row: JobRow) -> str:
    """The value the best job was ranked by, and which it is."""
    if row.best_val_loss is not None:
        return f"best val_loss {row.best_val_loss:.4f} (ranked by validation loss)"
    # Loss on data the model trains on is blind to overfitting.
    return (
        f"training loss {row.train_loss_last_10pct:.4f}, the mean over the last 10 % of steps "
        "(ranked by training loss; set dataset.val_split to compare the jobs on held-out data)"
    )


def job_prefix() -> str:
    """ "[job N] " in a sweep, where parallel jobs' progress lines share one console."""
    try:
        hydra = HydraConfig.get()
    except ValueError:  # not started by Hydra (called from Python)
        return ""
    return f"[job {hydra.job.num}] " if hydra.mode is RunMode.MULTIRUN else ""


def interrupted_sweep_message(rows: list[JobRow], config: DictConfig) -> str:
    """Which job stopped where, which did not run, and the command that resumes the sweep."""
    assert stop_signal is not None
    stopped = [f"job {row.job} ({row.error})" for row in rows if row.status == "interrupted"]
    not_run = [str(row.job) for row in rows if row.status == "not run"]
    lines = [f"{signal.Signals(stop_signal).name}: the sweep stopped"]
    if stopped:
        lines[0] += f" at {', '.join(stopped)}"
    if not_run:
        lines[0] += f"; jobs not run: {', '.join(not_run)}"
    lines.append(f"resume the sweep with: {sweep_resume_command(config)}")
    return "\n".join(lines)


def sweep_resume_command(config: DictConfig) -> str:
    """The sweep's own command line in its own directory, with resume=true: completed jobs are
    kept, interrupted ones continue from their checkpoint, the others start (see __main__._task)."""
    overrides = config.hydra.overrides
    given = [*overrides.hydra, *overrides.task]
    replaced = ("hydra.sweep.dir=", "hydra.mode=", "resume=")  # -m stands for hydra.mode
    kept = [o for o in given if not o.startswith(replaced)]
    sweep_dir = f"hydra.sweep.dir={config.hydra.sweep.dir}"
    return shlex.join(["python", "-m", "finetune", "-m", *kept, sweep_dir, "resume=true"])


def interrupted_job(job_dir: Path) -> JobFailure:
    """The outcome of a job that a signal stopped: where its training state was saved."""
    assert stop_signal is not None
    checkpoints = sorted((job_dir / "checkpoints").glob("step_*[0-9]"))
    saved = f"training state in {checkpoints[-1]}" if checkpoints else "no checkpoint saved"
    return JobFailure(f"stopped by {signal.Signals(stop_signal).name}; {saved}", "interrupted")


def earlier_outcome(job_dir: Path) -> dict[str, Any] | None:
    """How this job ended in an earlier attempt of the sweep (its job.json), if it ran."""
    path = job_dir / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def has_checkpoint(job_dir: Path) -> bool:
    # training_state.STATE_FILE, which only a complete checkpoint has (that module imports torch).
    return any((job_dir / "checkpoints").glob("step_*[0-9]/training.json"))


def write_csv(rows: list[JobRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Every job's loss curve on one plot."""
    # Imported here: matplotlib is slow to import and only the end of a sweep needs it.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 1.5
    for label, curve in curves.items():
        steps, losses = [step for step, _ in curve], [loss for _, loss in curve]
        ax.plot(steps, losses, marker="." if len(curve) < 20 else None, label=label)
    ax.set_xlabel("step")
    trained = [label for label in curves if label.endswith(" (train)")]
    if not trained:
        ax.set_ylabel("validation loss")
    elif len(trained) == len(curves):
        ax.set_ylabel("training loss")
    else:
        ax.set_ylabel("validation loss; training loss where marked (train)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
