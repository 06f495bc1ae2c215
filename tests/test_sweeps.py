"""Sweeps as a user runs them: numbered job directories, the sweep report, failed jobs, plugins."""

from __future__ import annotations

import csv
import json
import math
import pickle
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from finetune import metrics, sweep
from finetune.config import register_schemas
from finetune.recipes import full
from tests.conftest import (
    CONF_DIR,
    SAMPLE_DATA,
    SMALL_MODEL,
    model_overrides,
    run_cli,
    run_cli_signalled,
    small_params,
)

PLUGINS = [
    "hydra_plugins.hydra_joblib_launcher",
    "hydra_plugins.hydra_optuna_sweeper",
    "hydra_plugins.hydra_submitit_launcher",
]


def small_job(small_checkpoint: Path, sweep_dir: Path) -> list[str]:
    """Overrides that make each job of a sweep train 2 steps of a small model in a second or two."""
    return [
        *model_overrides(SMALL_MODEL),
        f"checkpoint={small_checkpoint}",
        "max_seq_len=128",
        "batch_size=2",
        "max_steps=2",
        "warmup_steps=0",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_jobs_get_numbered_subdirectories() -> None:
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", return_hydra_config=True)
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep_dir["subdir"] == "${hydra.job.num}"
    assert "%f" in sweep_dir["dir"]


def test_job_failure_is_nan_and_survives_pickling() -> None:
    failure = pickle.loads(pickle.dumps(sweep.JobFailure("lr: must be > 0")))
    assert math.isnan(failure) and failure.error == "lr: must be > 0"


def write_job(sweep_dir: Path, num: int, overrides: list[str], rows: list[dict]) -> None:
    job_dir = sweep_dir / str(num)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outcome = {"status": "completed", "error": "", "result": rows[-1].get("val_loss")}
    (job_dir / sweep.JOB_FILE).write_text(json.dumps(outcome))


def train_row(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "tokens_per_s": 100.0, "elapsed_s": step * 1.0}


def val_row(step: int, loss: float) -> dict:
    return {"step": step, "epoch": 0, "val_loss": loss, "val_perplexity": math.exp(loss)}


def test_report_ranks_by_validation_loss_and_plots_training_loss_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_job(tmp_path, 0, ["lr=1", "seed=1"], [train_row(1, 3.0), val_row(1, 2.5)])
    write_job(tmp_path, 1, ["lr=2", "seed=1"], [train_row(1, 4.0), val_row(1, 2.0)])
    write_job(tmp_path, 2, ["lr=3", "seed=1"], [train_row(1, 1.0)])
    sweep.SweepReport().on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    )
    rows = read_summary(tmp_path)
    assert [(r["best_val_loss"], r["final_train_loss"]) for r in rows] == [
        ("2.5", "3.0"),
        ("2.0", "4.0"),
        ("", "1.0"),
    ]
    assert (
        "best job: 1 (lr=2 seed=1): best val_loss 2.0000 (ranked by validation loss)"
        in capsys.readouterr().out
    )
    _, curves = sweep.read_sweep(tmp_path)
    assert list(curves) == ["lr=1", "lr=2", "lr=3 (train)"]
    assert (tmp_path / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_grid_sweep_runs_every_combination_and_writes_the_report(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    grid = ["recipe=lora", "lora.rank=4,8", "lr=0.0001,0.0003"]
    result = run_cli("-m", *grid, *small_job(small_checkpoint, sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job in range(4):
        for name in ["metrics.jsonl", "loss.png", "adapter/adapter_model.safetensors", "job.json"]:
            assert (sweep_dir / str(job) / name).is_file(), (job, name)
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert {(r["overrides"].split()[1], r["overrides"].split()[2]) for r in rows} == {
        (f"lora.rank={rank}", f"lr={lr}") for rank in (4, 8) for lr in ("0.0001", "0.0003")
    }
    assert all(r["steps"] == "2" and float(r["final_train_loss"]) > 0 for r in rows)
    assert (sweep_dir / "summary.png").stat().st_size > 0
    assert "best job: " in result.stdout


@pytest.mark.slow
def test_failed_job_is_reported_and_the_others_still_run(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", "lr=-1,0.0001", *small_job(small_checkpoint, sweep_dir), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: 1 of 2 jobs failed (jobs 0); see {sweep_dir / 'summary.csv'}"]
    failed, completed = read_summary(sweep_dir)
    assert (failed["status"], failed["error"]) == ("failed", "lr: must be > 0, got -1.0")
    assert completed["status"] == "completed" and completed["steps"] == "2"
    assert "best job: 1 (lr=0.0001 " in result.stdout
    assert "[job 1] step 2/2 loss " in result.stdout


@pytest.mark.slow
def test_every_experiment_runs_in_one_sweep(small_checkpoint: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    result = run_cli(
        "-m",
        "experiment=glob(*)",
        f"dataset.path={SAMPLE_DATA}",
        *small_job(small_checkpoint, sweep_dir),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = read_summary(sweep_dir)
    assert [r["overrides"].split()[0] for r in rows] == [f"experiment={e}" for e in experiments]
    assert all(r["status"] == "completed" for r in rows)


@pytest.mark.slow
def test_optuna_sweep_completes_its_trials(small_checkpoint: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    search = ["hparams_search=lora_optuna", "hydra.sweeper.n_trials=3"]
    result = run_cli("-m", *search, *small_job(small_checkpoint, sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed"] * 3
    assert all("lr=" in r["overrides"] and "lora.rank=" in r["overrides"] for r in rows)
    assert "best_value" in (sweep_dir / "optimization_results.yaml").read_text()


@pytest.mark.slow
def test_parallel_launcher_runs_two_jobs(small_checkpoint: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    launcher = ["hydra/launcher=parallel", "lr=0.0001,0.0003"]
    result = run_cli("-m", *launcher, *small_job(small_checkpoint, sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Joblib" in result.stdout
    # The two jobs' progress lines interleave on one console: each names its job.
    assert "[job 0] step 2/2 loss " in result.stdout and "[job 1] step 2/2 loss " in result.stdout
    assert [r["status"] for r in read_summary(sweep_dir)] == ["completed"] * 2


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(small_checkpoint: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    launcher = ["hydra/launcher=submitit_local", "lr=1e-4"]
    result = run_cli("-m", *launcher, *small_job(small_checkpoint, sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / ".submitit").is_dir()
    assert [r["status"] for r in read_summary(sweep_dir)] == ["completed"]


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ("hydra/launcher=joblib", "hydra/launcher=joblib: Hydra plugin not installed; "),
        ("hydra/launcher=parallel", "hydra/launcher=joblib: Hydra plugin not installed; "),
        ("hydra/launcher=slurm", "pip install 'finetune[slurm]'"),
        ("hparams_search=lora_optuna", "hydra/sweeper=optuna: Hydra plugin not installed; "),
    ],
    ids=["joblib", "parallel", "slurm", "optuna"],
)
def test_missing_plugin_names_the_extra_to_install(
    selection: str, message: str, tmp_path: Path
) -> None:
    # Blocking the plugins' modules makes Hydra's plugin discovery skip them, as if uninstalled.
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({PLUGINS!r})); "
        "from finetune.__main__ import main; "
        f"sys.argv = ['finetune', '-m', {selection!r}]; main()"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "pip install 'finetune[" in lines[0]


def test_report_without_validation_ranks_by_the_mean_loss_of_the_last_tenth_of_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 20 steps: the last 10 % are steps 19 and 20. Job 0 ends on a lucky batch.
    early = [train_row(step, 4.0) for step in range(1, 19)]
    write_job(tmp_path, 0, ["lr=1"], [*early, train_row(19, 3.0), train_row(20, 1.0)])
    write_job(tmp_path, 1, ["lr=2"], [*early, train_row(19, 1.5), train_row(20, 1.6)])
    sweep.SweepReport().on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    )
    rows = read_summary(tmp_path)
    assert [(r["final_train_loss"], r["train_loss_last_10pct"]) for r in rows] == [
        ("1.0", "2.0"),
        ("1.6", str((1.5 + 1.6) / 2)),
    ]
    assert (
        "best job: 1 (lr=2): training loss 1.5500, the mean over the last 10 % of steps "
        "(ranked by training loss; set dataset.val_split to compare the jobs on held-out data)"
    ) in capsys.readouterr().out


def test_sampled_values_show_three_significant_figures(tmp_path: Path) -> None:
    write_job(tmp_path, 0, ["lr=0.000123456789", "lora.rank=16"], [train_row(1, 2.0)])
    write_job(tmp_path, 1, ["lr=1e-4", "lora.rank=8"], [train_row(1, 3.0)])
    rows, curves = sweep.read_sweep(tmp_path)
    assert [row.overrides for row in rows] == ["lr=0.000123 lora.rank=16", "lr=1e-4 lora.rank=8"]
    assert list(curves) == ["lr=0.000123 lora.rank=16 (train)", "lr=1e-4 lora.rank=8 (train)"]
    assert sweep.rounded("dataset.path=data.v2.jsonl") == "dataset.path=data.v2.jsonl"


def sweep_steps(sweep_dir: Path, job: int) -> list[int]:
    path = sweep_dir / str(job) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_reports_the_jobs_so_far_and_resumes_the_sweep(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "lr=0.0001,0.0002,0.0003",
        *small_job(small_checkpoint, sweep_dir),
        "max_steps=30",
        "log_every_n_steps=1",
    ]
    returncode, output = run_cli_signalled(args, signal.SIGINT, "[job 1] step 2/30", tmp_path)

    assert returncode == 128 + signal.SIGINT, output
    done, stopped, not_run = read_summary(sweep_dir)
    assert (done["status"], done["steps"]) == ("completed", "30")
    checkpoint = sorted((sweep_dir / "1" / "checkpoints").iterdir())[-1]
    assert stopped["status"] == "interrupted"
    assert stopped["error"] == f"stopped by SIGINT; training state in {checkpoint}"
    assert int(stopped["steps"]) == int(checkpoint.name.removeprefix("step_")) < 30
    assert (not_run["status"], not_run["overrides"].split()[0]) == ("not run", "lr=0.0003")
    assert not (sweep_dir / "2" / "metrics.jsonl").exists()
    assert (sweep_dir / "summary.png").stat().st_size > 0
    assert (
        f"SIGINT: the sweep stopped at job 1 (stopped by SIGINT; training state in {checkpoint}); "
        "jobs not run: 2\n"
    ) in output
    command = next(
        line.removeprefix("resume the sweep with: ")
        for line in output.splitlines()
        if line.startswith("resume the sweep with: ")
    )
    resume_args = shlex.split(command)
    assert resume_args[:4] == ["python", "-m", "finetune", "-m"]
    assert resume_args[4:6] == [
        "lr=0.0001,0.0002,0.0003",
        *small_job(small_checkpoint, sweep_dir)[:1],
    ]
    assert resume_args[-2:] == [f"hydra.sweep.dir={sweep_dir}", "resume=true"]
    assert "Traceback" not in output

    job_0_metrics = (sweep_dir / "0" / "metrics.jsonl").read_bytes()
    resumed = run_cli(*resume_args[3:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["status"] for r in read_summary(sweep_dir)] == ["completed"] * 3
    assert "job 0 completed in an earlier attempt: kept" in resumed.stdout
    assert (sweep_dir / "0" / "metrics.jsonl").read_bytes() == job_0_metrics
    assert f"resuming from {checkpoint} at step " in resumed.stdout
    assert sweep_steps(sweep_dir, 1) == sweep_steps(sweep_dir, 2) == list(range(1, 31))


def test_smoothed_is_a_debiased_moving_average_that_skips_nan() -> None:
    assert metrics.smoothed([1.0, 3.0], weight=0.5) == [1.0, pytest.approx((0.5 * 1 + 3) / 1.5)]
    assert metrics.smoothed([2.0, math.nan, 2.0]) == [2.0, 2.0, pytest.approx(2.0)]


def test_loss_plot_draws_the_smoothed_curve_over_the_raw_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    losses = [5.0, 3.0, 4.0, 2.0]
    rows = [{**train_row(step, loss), "lr": 1e-3} for step, loss in enumerate(losses, 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}

    def savefig(figure: Figure, *args: object, **kwargs: object) -> None:
        for line in figure.axes[0].get_lines():
            drawn[line.get_label()] = list(line.get_ydata())

    monkeypatch.setattr(Figure, "savefig", savefig)
    metrics.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert drawn == {"training loss": losses, "training loss (EMA 0.9)": metrics.smoothed(losses)}


def test_a_run_returns_its_mean_loss_over_the_last_tenth_of_steps(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = small_params(small_checkpoint, tmp_path, f"dataset.path={SAMPLE_DATA}", "max_steps=20")
    returned = full.run(params)
    rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    # What a sweeper minimises: steps 19 and 20, not step 20 alone.
    assert returned == (rows[18]["loss"] + rows[19]["loss"]) / 2


# Run as `python -c CTRL_C_WHILE_LOADING ARGS...`: a sweep whose second job gets Ctrl-C while its
# model loads, before training (and its signal handler) starts.
CTRL_C_WHILE_LOADING = """
import sys
from finetune import runs
real_load, calls = runs.load_checkpoint, []

def load(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return real_load(*args, **kwargs)

runs.load_checkpoint = load
sys.argv = ["finetune", *sys.argv[1:]]
from finetune.__main__ import main
main()
"""


@pytest.mark.slow
def test_ctrl_c_while_a_job_loads_stops_the_sweep_with_its_report(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "lr=0.0001,0.0002,0.0003", *small_job(small_checkpoint, sweep_dir)]
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_LOADING, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    rows = read_summary(sweep_dir)
    assert [(r["status"], r["error"]) for r in rows] == [
        ("completed", ""),
        ("interrupted", "stopped by SIGINT; no checkpoint saved"),
        ("not run", "the sweep was interrupted before this job"),
    ]
    assert "SIGINT: the sweep stopped at job 1 (stopped by SIGINT; no checkpoint saved); " in (
        result.stdout
    )
    assert "Traceback" not in result.stderr
