"""Runs over several processes: finetune's own launcher (`nproc_per_node=N`), the workers it
starts (`python -m finetune.launch`), and the ranks of a user's own `torchrun` or `srun`.

Hydra composes and validates the config once, in the launching process (under a user's torchrun:
in rank 0). Every other process gets the result as a `Payload`: the frozen params and Hydra's own
config, which each worker restores, so that the run directory, a sweep's job number and the
overrides of a resume command are the launching process's. Rank 0 sends it to the others over the
process group, so that every node of a multi-node run trains the same params.

The launcher and its workers share a scratch directory (named by FINETUNE_LAUNCH): the payload,
rank 0's result, and the error of a worker that failed, which the launcher reports in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from finetune import distributed, interrupts, ranks, sweep
from finetune.config import RECIPES, recipe_of
from finetune.errors import RunFailed, UserError

SHARED_DIR_ENV = "FINETUNE_LAUNCH"
PAYLOAD_FILE = "payload.json"
RESULT_FILE = "result.json"
PID_PREFIX = "pid-"
# Long enough for every worker to finish its step and save a checkpoint after a Ctrl-C or SLURM's
# SIGTERM: a sharded 70B checkpoint takes minutes. Only then does the launcher kill them; a second
# Ctrl-C stops them at once (see interrupts.StopRequest).
SHUTDOWN_TIMEOUT_S = 600
log = logging.getLogger(__name__)


@dataclass
class Payload:
    """What every process of a run needs from the one where Hydra composed the config. When
    that process ended before training (bad input under torchrun), only `exit_code` is set, and
    the others end quietly with it."""

    recipe: str = ""
    params: str = ""  # the params dataclass as YAML
    hydra: str = ""  # Hydra's config (`hydra.*`), resolved: `${now:}` must not move
    exit_code: int | None = None


def payload_of(params: Any) -> Payload:
    return Payload(
        recipe=recipe_of(params).name,
        params=OmegaConf.to_yaml(OmegaConf.structured(params)),
        hydra=OmegaConf.to_yaml(resolved_where_possible(HydraConfig.get())),
    )


def resolved_where_possible(node: Any) -> Any:
    """`node` as plain data, its interpolations resolved (`${now:}` must not move in another
    process), except those that cannot be yet, kept as written: in a single run, `hydra.job.num`
    is missing and so is the sweep's subdir, which refers to it."""
    if isinstance(node, ListConfig):
        return [_resolved_child(node, index) for index in range(len(node))]
    if isinstance(node, DictConfig):
        return {key: _resolved_child(node, key) for key in node}
    return node


def _resolved_child(parent: DictConfig | ListConfig, key: Any) -> Any:
    try:
        value = parent[key]
    except OmegaConfBaseException:
        return parent._get_node(key)._value()  # type: ignore[union-attr]
    return resolved_where_possible(value)


def params_of(payload: Payload) -> Any:
    """The launching process's params, rebuilt (and so checked again) from their YAML."""
    schema = OmegaConf.structured(RECIPES[payload.recipe].params)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.create(payload.params)))


def restore_hydra(payload: Payload) -> None:
    """Hydra's config as the launching process has it, for the code that asks HydraConfig."""
    schema = OmegaConf.structured(HydraConf)
    sent = OmegaConf.create(payload.hydra)
    # Not `hydra.env`, the option of a config group that Hydra keeps out of its own schema.
    # (`key in schema` would be false for a key whose default is missing, `???`.)
    known = set(schema.keys())
    hydra = OmegaConf.merge(schema, {key: sent[key] for key in sent if key in known})
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra}))


# ---- The launcher: python -m finetune ... nproc_per_node=N ----


def start_workers(params: Any) -> float:
    """Run `params` on nproc_per_node workers (on each of nnodes nodes) and return rank 0's
    result, as `recipe.run` would in this process. A worker's bad input is raised here as the
    same UserError; a signal ends the workers as it ends a single process (a checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="finetune-launch-") as scratch:
        shared = Path(scratch)
        (shared / PAYLOAD_FILE).write_text(json.dumps(asdict(payload_of(params))))
        log.info("starting %d processes", params.nproc_per_node * params.nnodes)
        try:
            with worker_environment(shared, params.nproc_per_node), quiet_elastic_logs():
                elastic_launch(launch_config(params, shared), sys.executable)(
                    "-m", "finetune.launch"
                )
        except SignalException as stop:
            # The agent has sent the signal on to each worker and waited for them to save. A
            # second signal ends that wait, and the agent sends SIGTERM: the workers' own second
            # signal, so they stop at once. Any that a third signal left running stop here.
            stop_now(stop.sigval, shared)
            sweep.stop_signal = sweep.stop_signal or stop.sigval
            raise SystemExit(128 + stop.sigval) from None
        except ChildFailedError as failure:
            raise worker_error(shared, failure) from None
        result = shared / RESULT_FILE
        # On several nodes, only the launcher of rank 0's node has the run's result.
        return json.loads(result.read_text())["result"] if result.is_file() else math.nan


def stop_now(signum: int, shared: Path) -> None:
    """Send `signum` to the workers still running, and wait for them to end. They are in sessions
    of their own, so a terminal's Ctrl-C reaches only this process."""
    for pid_file in shared.glob(f"{PID_PREFIX}*"):
        pid = int(pid_file.read_text())
        # Only a child of this process that has not been waited for yet: never a reused pid.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signum)
                os.waitpid(pid, 0)


def launch_config(params: Any, shared: Path) -> LaunchConfig:
    return LaunchConfig(
        min_nodes=params.nnodes,
        max_nodes=params.nnodes,
        nproc_per_node=params.nproc_per_node,
        run_id="finetune",
        rdzv_backend="c10d",
        rdzv_endpoint=rendezvous_endpoint(params.nnodes),
        max_restarts=0,  # a failed run is resumed by the user, from its checkpoint
        # The workers' output goes to the terminal; the agent's own logs go here, and are lost.
        logs_specs=DefaultLogsSpecs(log_dir=str(shared / "logs")),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )


def rendezvous_endpoint(nnodes: int) -> str:
    """One node: a store on a free port of this machine (port 0, as `torchrun --standalone`).
    Several: the launchers of all nodes meet at MASTER_ADDR:MASTER_PORT, which must be set
    alike on each, as SLURM scripts do for torchrun."""
    if nnodes == 1:
        return "localhost:0"
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (address and port):
        raise UserError(
            f"nnodes={nnodes}: set MASTER_ADDR and MASTER_PORT to the first node's address and a "
            "free port, the same on every node"
        )
    return f"{address}:{port}"


@contextlib.contextmanager
def worker_environment(shared: Path, nproc_per_node: int) -> Iterator[None]:
    """The variables the workers inherit, for the duration of the launch only: a sweep runs
    further jobs in this process."""
    added = {SHARED_DIR_ENV: str(shared)}
    if "OMP_NUM_THREADS" not in os.environ:
        # The cores shared out, as many threads each as fit; torchrun sets 1.
        added["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            del os.environ[name]


@contextlib.contextmanager
def quiet_elastic_logs() -> Iterator[None]:
    """The elastic agent logs each start, signal and failure, with tracebacks: the user gets
    finetune's own line instead. Its modules' loggers set their own levels, so each is raised."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def worker_error(shared: Path, failure: ChildFailedError) -> Exception:
    """The error of the worker that failed first, as this process would have raised it."""
    recorded = sorted(shared.glob(f"{interrupts.FAILED_PREFIX}*"))
    if not recorded:  # killed without a word
        rank, exit_code = first_to_end(failure)
        return RunFailed(f"rank {rank} {ended_how(exit_code)}")
    error = json.loads(recorded[0].read_text())
    if error["user_error"]:
        return UserError(error["message"])
    return RunFailed(f"rank {error['rank']} failed: {error['message']} (its traceback above)")


def first_to_end(failure: ChildFailedError) -> tuple[int, int]:
    """(rank, exit code) of the worker whose end ended the run: one a signal killed, before those
    that exited 1 because they lost it (the agent stamps failures without an error file with the
    second it saw them, so the times tie)."""
    rank, first = min(
        failure.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp)
    )
    return rank, first.exitcode


def ended_how(exit_code: int) -> str:
    """How a worker ended: elastic reports a signal as a negative exit code."""
    if exit_code >= 0:
        return f"ended with exit code {exit_code}"
    name = signal.Signals(-exit_code).name
    # The kernel's out-of-memory killer sends SIGKILL, and says so only in its own log.
    return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")


# ---- One rank of the run: finetune's worker, or a rank of the user's torchrun ----


def worker_main() -> None:
    """`python -m finetune.launch`: a worker that `start_workers` started."""
    shared = Path(os.environ[SHARED_DIR_ENV])
    os.environ[interrupts.FAILURES_ENV] = str(shared)
    (shared / f"{PID_PREFIX}{os.environ['RANK']}").write_text(str(os.getpid()))
    end_process(work(Payload(**json.loads((shared / PAYLOAD_FILE).read_text())), shared))


def follow_rank_zero() -> None:
    """A rank other than 0 of the user's own torchrun: it runs no Hydra (whose run directory
    would be its own) and trains what rank 0 composed."""
    sys.exit(work(None, None))


def work(mine: Payload | None, shared: Path | None) -> int:
    """Train as one rank of the run with rank 0's payload; returns the exit status."""
    try:
        distributed.init_process_group()
        payload = shared_payload(mine)
        if payload.exit_code is not None:  # rank 0 ended before training, and said why
            return payload.exit_code
        result = run_worker(payload)
        if shared is not None and ranks.writes_files():
            (shared / RESULT_FILE).write_text(json.dumps({"result": result}))
        return 0
    except SystemExit as stop:  # stopped by a signal, after saving
        return stop.code if isinstance(stop.code, int) else 1
    except BaseException as error:
        return worker_failed(error, shared)
    finally:
        distributed.close()


def shared_payload(mine: Payload | None) -> Payload:
    """Rank 0's payload, in every process (`mine` is only read on rank 0)."""
    sent = [mine if ranks.rank() == 0 else None]
    dist.broadcast_object_list(sent, src=0)
    assert sent[0] is not None
    return sent[0]


def run_worker(payload: Payload) -> float:
    """Train as one rank of the run: Hydra's config restored, logging as Hydra sets it up."""
    restore_hydra(payload)
    configure_logging()
    params = params_of(payload)
    return recipe_of(params).run(params)


def configure_logging() -> None:
    """Rank 0 logs as Hydra configures a single process (INFO to stdout, appended to the run
    directory's finetune.log); the others only warnings and errors, each line saying whose."""
    if ranks.rank() == 0:
        hydra = HydraConfig.get()
        configure_log(hydra.job_logging, hydra.verbose)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {ranks.rank()}] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def worker_failed(error: BaseException, shared: Path | None) -> int:
    """Report why this rank failed (to the launcher, when there is one) and return its exit
    status. A rank that fails because another did (its collective lost the peer, or the
    launcher's SIGTERM) says nothing: the first failure is the one to read."""
    if interrupts.another_process_failed() or lost_a_peer(error):
        return 1
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C outside training: nothing to save
        if ranks.rank() == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    user_error = isinstance(error, UserError)
    if not user_error:
        traceback.print_exception(error)
    message = " ".join(str(error).split()) if user_error else describe_bug(error)
    if shared is None:
        print(f"[rank {ranks.rank()}] error: {message}", file=sys.stderr, flush=True)
    else:
        interrupts.record_failure(ranks.rank(), message, user_error)
    return 2 if user_error else 1


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process is gone: gloo then says "Connection
    closed by peer" (or reset), NCCL raises a DistError after its watchdog sees the peer fail."""
    text = str(error)
    return isinstance(error, dist.DistError) or "by peer" in text


def describe_bug(error: BaseException) -> str:
    return " ".join(traceback.format_exception_only(error)[-1].split())


# ---- The user's own torchrun (or SLURM's tasks): this process is one rank of several ----

# Under torchrun, rank 0 composes with Hydra (see `leading_other_ranks`); the others wait for
# its payload. Under SLURM's launcher every task composed the same config already.
_others_wait_for_payload = False


@contextlib.contextmanager
def leading_other_ranks() -> Iterator[None]:
    """Rank 0 of the user's torchrun, around Hydra's task: the others wait for its payload, so
    whatever ends it first (bad input, `--cfg job`) ends them too, quietly, with its exit status.
    """
    global _others_wait_for_payload
    _others_wait_for_payload = True
    status = 0
    try:
        yield
    except BaseException as error:
        status = exit_status(error)
        raise
    finally:
        if _others_wait_for_payload:
            send_payload(Payload(exit_code=status))
        distributed.close()


def send_payload(payload: Payload) -> None:
    global _others_wait_for_payload
    distributed.init_process_group()
    shared_payload(payload)
    _others_wait_for_payload = False


def status_of(main: Callable[[], None]) -> int:
    """Run `main` and return the exit status it ends with; a crash's traceback is printed, as
    the interpreter would print it."""
    try:
        main()
    except BaseException as error:
        if not isinstance(error, (SystemExit, KeyboardInterrupt)):
            traceback.print_exception(error)
        return exit_status(error)
    return 0


def end_process(status: int) -> NoReturn:
    """End this rank with `status` now, without the interpreter's finalization.

    Gloo's threads outlive destroy_process_group (DTensor's caches keep the default group's
    backend until the interpreter clears them), and a thread of torch's that frees a tensor with a
    Python object while the interpreter finalizes aborts the process ("terminate called without
    an active exception"): a run that finished would now and then end with SIGABRT. Python's
    multiprocessing ends its child processes the same way, once their output is flushed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def exit_status(error: BaseException) -> int:
    """The status with which `__main__.main` ends for `error`."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else int(error.code is not None)
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 2 if isinstance(error, (UserError, HydraException, OmegaConfBaseException)) else 1


def run_as_rank(params: Any) -> float:
    """Train as one of the processes that torchrun or SLURM started, the others doing the
    same with identical params."""
    world = ranks_started()
    if params.nproc_per_node * params.nnodes not in (1, world):
        raise UserError(
            f"nproc_per_node={params.nproc_per_node}, nnodes={params.nnodes}: this is one of "
            f"{world} processes started by torchrun or SLURM; leave both at 1, or run "
            "`python -m finetune ... nproc_per_node=N` without torchrun"
        )
    if _others_wait_for_payload:
        send_payload(payload_of(params))
    else:
        distributed.init_process_group()
    try:
        return recipe_of(params).run(params)
    finally:
        distributed.close()


def ranks_started() -> int:
    return int(os.environ["WORLD_SIZE"])


def export_slurm_environment() -> None:
    """Under the SLURM launcher (submitit; or its local executor) with several tasks, each task
    is a rank: give it the variables that `init_process_group` reads (RANK, WORLD_SIZE,
    MASTER_ADDR: the first node, ...), unless a torchrun inside the allocation set them.
    CUDA_VISIBLE_DEVICES is left alone: `distributed.local_device` picks the GPU by LOCAL_RANK."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    # Only under submitit, which the `slurm` extra installs.
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# ---- python -m finetune ----


def run(params: Any) -> float:
    """Train with `params` as `python -m finetune` was asked: in this process, in workers that
    this process starts (nproc_per_node or nnodes above 1), or as one rank of several that
    torchrun or SLURM started."""
    export_slurm_environment()
    if distributed.started_by_launcher():
        return run_as_rank(params)
    if params.nproc_per_node * params.nnodes > 1:
        return start_workers(params)
    return recipe_of(params).run(params)


if __name__ == "__main__":
    worker_main()
