"""Runs over several processes, as a user starts them: `nproc_per_node=2`, their own `torchrun`,
SLURM's tasks; a rank that fails, a signal, a sweep. Two gloo processes of one thread each."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from finetune import interrupts, launch
from finetune.errors import UserError
from tests.conftest import (
    CONF_DIR,
    ONE_THREAD,
    compose_config,
    logged_losses,
    run_cli,
    run_cli_signalled,
    run_on_two,
    small_params,
    small_run,
)


def torchrun(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m finetune ARGS`, as a user would type it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "finetune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD, **(env or {})},
        timeout=600,
    )


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


@pytest.mark.slow
def test_nproc_per_node_and_torchrun_write_the_same_one_run_directory(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    launched = tmp_path / "launched"
    result = run_on_two(small_checkpoint, tmp_path, f"hydra.run.dir={launched}")
    assert result.returncode == 0, result.stderr
    # No hydra.run.dir: every rank would get its own timestamped directory if it ran Hydra.
    direct_cwd = tmp_path / "direct"
    direct_cwd.mkdir()
    result = torchrun(*small_run(small_checkpoint), cwd=direct_cwd)
    assert result.returncode == 0, result.stderr
    [direct] = [p.parent for p in direct_cwd.glob("outputs/*/*/.hydra")]

    assert run_files(direct) == run_files(launched)
    assert {"metrics.jsonl", ".hydra/config.yaml", "model/model.safetensors"} <= run_files(direct)
    assert logged_losses(direct) == logged_losses(launched)
    assert [step for step, _ in logged_losses(direct)] == [1, 2, 3, 4]
    # Rank 0 alone prints progress; the other rank only warnings, marked as its own.
    assert result.stdout.count("step 4/4 loss") == 1
    assert all(line.startswith("[rank 1]") for line in result.stderr.splitlines() if line)


@pytest.mark.slow
def test_two_tasks_of_the_slurm_launcher_are_two_ranks_of_one_run(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    """submitit's local executor stands in for SLURM: the same tasks, the same environment."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launched = tmp_path / "launched"
    assert run_on_two(small_checkpoint, tmp_path, f"hydra.run.dir={launched}").returncode == 0
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *small_run(small_checkpoint, f"hydra.sweep.dir={sweep_dir}"),
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    assert logged_losses(sweep_dir / "0") == logged_losses(launched)
    assert (sweep_dir / "0" / "model" / "model.safetensors").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_nnodes_2_is_one_run_over_the_launchers_of_both_nodes(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    """Two "nodes" on this machine, one process each, meeting at MASTER_ADDR:MASTER_PORT."""
    launched = tmp_path / "launched"
    assert run_on_two(small_checkpoint, tmp_path, f"hydra.run.dir={launched}").returncode == 0
    run_dir = tmp_path / "run"
    args = small_run(small_checkpoint, "nnodes=2", f"hydra.run.dir={run_dir}")
    env = {**os.environ, **ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "finetune", *args]
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=env, text=True) for _ in range(2)]
    assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    assert logged_losses(run_dir) == logged_losses(launched)


def fail_in_rank_1(
    tmp_path: Path, failure: str = "raise errors.UserError('rank 1 cannot go on')"
) -> dict[str, str]:
    """Environment whose `sitecustomize` makes rank 1's second optimizer step run `failure` (by
    default raise a UserError with a message only that rank can give): a failure that hits one
    rank only."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from finetune import errors, training\n"
        "    real_step, calls = training.train_step, []\n"
        "    def train_step(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        f"            {failure}\n"
        "        return real_step(*args, **kwargs)\n"
        "    training.train_step = train_step\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_run_with_its_one_line_error(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = fail_in_rank_1(tmp_path)
    result = run_on_two(small_checkpoint, tmp_path, f"hydra.run.dir={run_dir}", env=env)

    assert result.returncode == 2, result.stderr
    # Rank 0 lost its peer in a collective, and says nothing of it; nor does torch's agent.
    # (Rank 1's own warnings about the data are rank 0's too.)
    said = [line for line in result.stderr.splitlines() if not line.startswith("[rank 1] WARN")]
    assert said == ["error: rank 1 cannot go on"]
    assert not (run_dir / "model").exists()


@pytest.mark.slow
def test_a_rank_killed_by_a_signal_ends_the_run_in_one_line(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    """No traceback of the launcher, which only saw the worker go: it names the rank and signal."""
    env = fail_in_rank_1(tmp_path, failure="os.kill(os.getpid(), 9)")
    result = run_on_two(small_checkpoint, tmp_path, f"hydra.run.dir={tmp_path / 'run'}", env=env)

    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith("[rank 1] WARN")]
    assert said == ["error: rank 1 was killed by SIGKILL (out of memory?)"]


@pytest.mark.slow
def test_under_torchrun_a_failing_rank_alone_says_why(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    result = torchrun(*small_run(small_checkpoint), cwd=tmp_path, env=fail_in_rank_1(tmp_path))

    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    # torchrun's own report of the failure follows, as for any script it runs.
    assert said[0] == "[rank 1] error: rank 1 cannot go on", result.stderr
    assert "Error executing job" not in result.stderr  # rank 0 ended quietly
    assert "Connection closed by peer" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_saves_and_stops_as_one_process_does(
    signum: int, small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    args = small_run(
        small_checkpoint, "nproc_per_node=2", "max_steps=200", f"hydra.run.dir={run_dir}"
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run_cli_signalled passes on this environment
    returncode, output = run_cli_signalled(args, signum, "step 2/", cwd=tmp_path)

    assert returncode == 128 + signum, output
    name = signal.Signals(signum).name
    assert output.count(f"{name}: stopping after this step to save a checkpoint") == 1
    assert output.count("resume with: python -m finetune") == 1
    [saved] = run_dir.glob("checkpoints/step_*")
    assert int(saved.name.removeprefix("step_")) < 200
    assert "Traceback" not in output and "death signal" not in output  # torch's agent is quiet


@pytest.mark.slow
def test_a_sweep_starts_workers_for_each_job_and_reports_a_row_each(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_on_two(
        small_checkpoint, tmp_path, "-m", "lr=1e-3,3e-3", f"hydra.sweep.dir={sweep_dir}"
    )

    assert result.returncode == 0, result.stderr
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["completed", "completed"]
    assert all(float(row["final_train_loss"]) > 0 for row in rows)
    # Each job's rank 0 printed its progress with the job's prefix.
    assert "[job 1] step 4/4" in result.stdout


@pytest.fixture
def fresh_hydra_config() -> Iterator[None]:
    """HydraConfig as a process has it before Hydra starts a job, and again after the test."""
    HydraConfig.instance().cfg = None
    yield
    HydraConfig.instance().cfg = None


def test_workers_rebuild_the_launchers_params_and_hydra_config(
    small_checkpoint: Path, tmp_path: Path, fresh_hydra_config: None
) -> None:
    cfg = compose_config([f"hydra.run.dir={tmp_path}"], with_hydra=True)
    HydraConfig.instance().set_config(cfg)
    params = small_params(small_checkpoint, tmp_path, "recipe=lora", "lora.rank=4")
    payload = launch.payload_of(params)
    HydraConfig.instance().cfg = None  # as in a fresh worker

    launch.restore_hydra(payload)
    assert launch.params_of(payload) == params
    hydra = HydraConfig.get()
    assert hydra.run.dir == str(tmp_path)
    assert OmegaConf.select(hydra, "job.num", default="missing") == "missing"  # a single run


def test_a_failed_worker_names_itself_only_until_another_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(interrupts.FAILURES_ENV, str(tmp_path))
    assert not interrupts.another_process_failed()
    interrupts.record_failure(1, "rank 1 cannot go on", user_error=True)
    assert interrupts.another_process_failed()


def test_several_nodes_need_the_first_nodes_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="nnodes=2: set MASTER_ADDR and MASTER_PORT"):
        launch.rendezvous_endpoint(2)
    monkeypatch.setenv("MASTER_ADDR", "node01")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch.rendezvous_endpoint(2) == "node01:29500"
    assert launch.rendezvous_endpoint(1) == "localhost:0"


def test_slurm_tasks_become_torch_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 5 of 8, the second on its node, in a job on two nodes with 4 GPUs each."""
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    }
    # A copy, which the export changes and the other tests never see.
    monkeypatch.setattr(os, "environ", slurm)

    launch.export_slurm_environment()

    torch_env = {k: os.environ[k] for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"]}
    assert torch_env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"
    assert int(os.environ["MASTER_PORT"]) > 0
    # The rank picks its GPU by LOCAL_RANK among all of the node's.
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_one_slurm_task_is_no_distributed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "1"})
    launch.export_slurm_environment()
    assert "WORLD_SIZE" not in os.environ


def test_slurm_launcher_runs_a_task_per_gpu() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose_config(["hydra/launcher=slurm"], with_hydra=True).hydra.launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == 1
    # The line that the file's comment gives for 16 ranks composes.
    comment = (CONF_DIR / "hydra" / "launcher" / "slurm.yaml").read_text()
    sixteen = next(line for line in comment.splitlines() if "tasks_per_node=8" in line)
    launcher = compose_config(
        ["hydra/launcher=slurm", *sixteen.lstrip("# ").split()], with_hydra=True
    ).hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)


def test_several_nodes_without_an_address_is_one_line(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *small_run(small_checkpoint, "nnodes=2")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: nnodes=2: set MASTER_ADDR and MASTER_PORT")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nproc_per_node=4"], "error: nproc_per_node=4, nnodes=1: this is one of 2 processes"),
        (["-m", "lr=1e-3,2e-3"], "error: -m under torchrun: run `python -m finetune -m"),
        (["lr=abc"], "error: lr: Value 'abc' of type 'str' could not be converted to Float"),
    ],
)
def test_torchrun_refuses_in_one_line_and_every_rank_ends(
    args: list[str], message: str, small_checkpoint: Path, tmp_path: Path
) -> None:
    result = torchrun(*small_run(small_checkpoint), *args, cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not list(tmp_path.glob("outputs/*/*/metrics.jsonl"))


def test_a_rank_ends_with_its_status_and_output_but_without_finalization(tmp_path: Path) -> None:
    """Torch's threads may free Python objects while the interpreter finalizes, which aborts the
    process: a rank ends before that (no atexit handler runs), its output written."""
    code = (
        "import atexit, logging, sys\n"
        "from finetune import launch\n"
        "atexit.register(lambda: print('finalized'))\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
        "logging.info('logged')\n"
        "print('printed', end='')\n"
        "launch.end_process(launch.status_of(lambda: sys.exit(3)))\n"
    )
    log_file = tmp_path / "rank.log"
    result = subprocess.run(
        [sys.executable, "-c", code, str(log_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3
    assert result.stdout == "printed"
    assert "logged" in log_file.read_text()


def test_the_rank_a_signal_killed_is_named_before_the_one_that_lost_it(tmp_path: Path) -> None:
    """The agent stamps both failures with the same second; the killed rank is the cause."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    lost = ProcessFailure(local_rank=0, pid=10, exitcode=1, error_file=str(tmp_path / "none"))
    killed = ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file=str(tmp_path / "none"))
    killed.timestamp = lost.timestamp
    failure = ChildFailedError("finetune.launch", {0: lost, 1: killed})

    assert launch.first_to_end(failure) == (1, -9)
    error = launch.worker_error(tmp_path, failure)
    assert str(error) == "rank 1 was killed by SIGKILL (out of memory?)"
