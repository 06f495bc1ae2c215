"""Stopping on SIGINT/SIGTERM (Ctrl-C, SLURM preemption) at a step boundary, with a checkpoint."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from finetune import sweep
from finetune.ranks import writes_files
from finetune.training_state import latest_checkpoint_note

# In a worker of finetune's launcher (launch.py): the directory where a worker that fails leaves
# its error, for the launcher to report, before its peers notice it is gone.
FAILURES_ENV = "FINETUNE_FAILURES"
FAILED_PREFIX = "failed-rank-"


class StopRequest:
    """SIGINT/SIGTERM (Ctrl-C, SLURM preemption) ask the loop to stop after the current step.

    Stopping mid-step would leave a half-accumulated gradient that no checkpoint can hold; a
    second signal is a user who will not wait, and exits at once, saving nothing.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.signum: int | None = None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, in place only inside the block: later a Ctrl-C interrupts as usual."""
        # Python only lets the main thread install handlers (not so e.g. under some launchers).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if another_process_failed():
            # The launcher ends the run's other processes with SIGTERM: not a request to save.
            raise SystemExit(1)
        name = signal.Signals(signum).name
        if self.signum is not None:
            if writes_files():  # each process gets the signal; one says so
                print(
                    f"{name}, a second signal: stopped at once; "
                    f"{latest_checkpoint_note(self.output_dir)}",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(128 + signum)
        self.signum = signum
        sweep.stop_signal = sweep.stop_signal or signum  # a sweep runs no further jobs
        if not writes_files():
            return
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
        print(
            f"{name}: stopping after this step to save a checkpoint; {again} to stop at once",
            file=sys.stderr,
            flush=True,
        )


def record_failure(rank: int, message: str, user_error: bool) -> None:
    record = {"rank": rank, "message": message, "user_error": user_error}
    path = Path(os.environ[FAILURES_ENV]) / f"{FAILED_PREFIX}{rank:05d}.json"
    path.write_text(json.dumps(record))


def another_process_failed() -> bool:
    """Whether a process of this run has failed already, in a run that finetune launched."""
    directory = os.environ.get(FAILURES_ENV)
    return bool(directory) and any(Path(directory).glob(f"{FAILED_PREFIX}*"))


def stopped_by_signal(
    signum: int, step: int, steps: int, saved: Path | None, output_dir: Path
) -> int:
    """Say where the run stopped and how to go on; returns the exit status (128 + signal)."""
    if not writes_files():
        return 128 + signum
    name = signal.Signals(signum).name
    print(f"{name} after step {step}/{steps}: training state saved to {saved}", flush=True)
    if not in_sweep():  # a sweep says how to resume all of it when it ends
        print(f"resume with: {resume_command(output_dir)}", flush=True)
    return 128 + signum


def in_sweep() -> bool:
    try:
        return HydraConfig.get().mode is RunMode.MULTIRUN
    except ValueError:  # not started by Hydra (called from Python)
        return False


def resume_command(output_dir: Path) -> str:
    """The command line that continues this run: its own overrides, in its own directory."""
    try:
        task = HydraConfig.get().overrides.task
        replaced = ("hydra.run.dir=", "resume=")
        overrides = [shlex.quote(o) for o in task if not o.startswith(replaced)]
    except ValueError:  # not started by Hydra (called from Python)
        overrides = ["<the same overrides>"]
    run_dir = shlex.quote(f"hydra.run.dir={output_dir}")
    return " ".join(["python -m finetune", *overrides, run_dir, "resume=true"])
