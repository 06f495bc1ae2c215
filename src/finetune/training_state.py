"""Training-state checkpoints: what a run needs to continue exactly where it stopped.

    <output_dir>/checkpoints/step_000123/
        .metadata, __0_0.distcp, ...   the trainable weights and the optimizer state (DCP)
        rng.pt                         the RNG states, for the next dropout mask
        training.json                  where the run stands (TrainingState); written last

The weights and optimizer state are a torch.distributed.checkpoint (DCP): each process writes its
own shard, and a checkpoint saved by N processes loads into any number of them (2 -> 1, 1 -> 2),
each reading the parts it holds. The optimizer state is keyed by weight name, whichever optimizer
holds it: adamw8bit's 8-bit moments are saved as they are (codes and scales), and
optimizer_in_backward's per-weight optimizers as one. The LR schedule is not saved: it is a
function of the step, which the resumed run rebuilds over its own length. The data position is
(epoch, examples consumed); since an epoch's order depends only on (seed, epoch), that is enough
to replay the same batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from finetune import ranks
from finetune.errors import UserError
from finetune.optimizers import state_holders
from finetune.outputs import atomic_directory, restore_interrupted, write_error

STATE_FILE = "training.json"
RNG_FILE = "rng.pt"
CHECKPOINTS_DIR = "checkpoints"
# Bumped when the layout of a checkpoint changes; an older one is refused rather than misread.
FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"step_(\d+)")
# The trainable weights only: a LoRA checkpoint holds the adapters, not the frozen base.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


@dataclass
class TrainingState:
    """Where a run stands after `step` optimizer steps. Checkpoints are taken between optimizer
    steps, so no gradient accumulation is ever in flight: `examples_done` is also its position,
    whatever the number of processes and the micro-batch size."""

    step: int = 0
    epoch: int = 0  # the epoch the next micro-batch comes from
    examples_done: int = 0  # examples of `epoch` already trained on, by all processes
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps dropped for a NaN/inf loss or gradient
    n_examples: int = 0  # the training set's size, to refuse a checkpoint of other data
    # The settings a resumed run must share with the saved one (see resume.RESUME_SETTINGS).
    settings: dict[str, float | int | bool | str] = field(default_factory=dict)
    elapsed_s: float = 0.0  # training time so far, so metrics' elapsed_s runs on after a resume
    # Validation and early stopping: the last val_loss, the best one, and the evaluations since.
    val_loss: float = math.nan
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def capture_rng() -> dict[str, torch.Tensor]:
    """Every RNG a step draws from (dropout masks), as tensors so `weights_only` loads them."""
    version, internal, gauss = random.getstate()
    rng = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        # NaN stands for Python's "no cached gaussian" (None).
        "python_gauss": torch.tensor(math.nan if gauss is None else gauss, dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    version, *internal = rng["python"].tolist()
    gauss = float(rng["python_gauss"])
    random.setstate((version, tuple(internal), None if math.isnan(gauss) else gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS_DIR / f"step_{step:06d}"


def save_checkpoint(
    directory: Path,
    recipe: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    background: bool = False,
) -> CheckpointWrite:
    """Write `directory` atomically (see `atomic_directory`): a kill at any moment leaves either
    the complete new checkpoint or none, and the previous ones untouched. Every process calls
    it and writes its shard; rank 0 writes the rest and renames the directory into place.

    The write completes (and the directory appears) at the returned write's `wait()`. In the
    `background` (async_save), DCP copies the state and writes it in a thread meanwhile, while
    training goes on.
    """
    holders = state_holders(optimizer)
    weights, optimizer_state = get_state_dict(model, holders, options=_TRAINABLE)
    stack = ExitStack()
    tmp = directory.with_name(directory.name + ".tmp")
    if ranks.writes_files():
        tmp = stack.enter_context(atomic_directory(directory))
    # Taken now: the state moves on while a background write runs.
    training = {"format": FORMAT_VERSION, "recipe": recipe, "training": asdict(state)}
    rng = training["training"].pop("rng")
    with stack.pop_all() as pending:  # on an error here the directory is cleaned up at once
        ranks.barrier()  # rank 0 has made the directory
        with _dcp_on_one_process_quietly(), _raising_this_rank_error():
            saved = {"model": weights, "optimizer": optimizer_state}
            save = dcp.async_save if background else dcp.save
            written = save(saved, checkpoint_id=tmp, process_group=ranks.checkpoint_group())
        return CheckpointWrite(pending.pop_all(), tmp, rng, training, written)


class CheckpointWrite:
    """A checkpoint being written. `wait()` waits for the shards, writes rank 0's files and
    renames the directory into place (or cleans it up and raises, as a failed write does)."""

    def __init__(
        self,
        directory: ExitStack,
        tmp: Path,
        rng: dict[str, torch.Tensor],
        training: dict,
        shards: object,
    ) -> None:
        self.directory, self.tmp, self.rng, self.training = directory, tmp, rng, training
        # DCP's future of a background write (anything else: written already).
        self.shards = shards

    def wait(self) -> None:
        with self.directory:
            if isinstance(self.shards, Future):
                with _raising_this_rank_error():
                    self.shards.result()
            ranks.barrier()  # every process's shard is written
            if ranks.writes_files():
                self._write_own_files()

    def _write_own_files(self) -> None:
        with (self.tmp / RNG_FILE).open("wb") as f:
            torch.save(self.rng, f)
        with (self.tmp / STATE_FILE).open("w") as f:
            json.dump(self.training, f, indent=2)
            f.flush()
            # Renamed before the bytes reach the disk, a power cut could leave it empty.
            os.fsync(f.fileno())


@contextmanager
def _raising_this_rank_error() -> Iterator[None]:
    """DCP reports a failed write (a full disk) as a CheckpointException, a BaseException that
    wraps each rank's error: raise this rank's own, as the OSError behind it when a write failed
    (see `outputs.write_error`)."""
    try:
        yield
    except CheckpointException as error:
        failed = (error.failures.get(ranks.rank()) or next(iter(error.failures.values())))[0]
        raise (write_error(failed) or failed) from None


@contextmanager
def _dcp_on_one_process_quietly() -> Iterator[None]:
    """DCP warns each time it runs without a process group; on one process that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpoints:
    """A run's training-state checkpoints: at most one write in flight, and the oldest deleted
    down to `keep_last_n` once a newer one is complete."""

    def __init__(self, output_dir: Path, recipe: str, keep_last_n: int) -> None:
        self.output_dir, self.recipe, self.keep_last_n = output_dir, recipe, keep_last_n
        self.in_flight: CheckpointWrite | None = None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainingState,
        background: bool,
    ) -> Path:
        """Checkpoint `state` after `step`; returns its directory (complete unless `background`:
        then once `settle` returns)."""
        self.settle()
        directory = step_dir(self.output_dir, step)
        with self._naming_the_latest():
            self.in_flight = save_checkpoint(
                directory, self.recipe, model, optimizer, state, background
            )
        if not background:
            self.settle()
        return directory

    def settle(self) -> None:
        """Wait for the write in flight, if any, to complete."""
        if self.in_flight is None:
            return
        write, self.in_flight = self.in_flight, None
        with self._naming_the_latest():
            write.wait()
        if ranks.writes_files():
            prune_checkpoints(self.output_dir, self.keep_last_n)

    @contextmanager
    def _naming_the_latest(self) -> Iterator[None]:
        """A failed write says which checkpoint the run can be resumed from."""
        try:
            yield
        except UserError as error:
            raise UserError(f"{error}; {latest_checkpoint_note(self.output_dir)}") from None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp` dirs of interrupted saves are not among them."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    for moved in root.glob("step_*.old"):  # a save killed between its two renames
        restore_interrupted(moved.with_suffix(""))
    found = [
        d for d in root.iterdir() if _STEP_DIR.fullmatch(d.name) and (d / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda d: int(d.name.removeprefix("step_")))


def latest_checkpoint_note(output_dir: Path) -> str:
    found = checkpoint_dirs(output_dir)
    if not found:
        return "no checkpoint of this run was saved before"
    return f"the latest complete checkpoint is {found[-1]}"


def prune_checkpoints(output_dir: Path, keep_last_n: int) -> None:
    """Delete all but the newest `keep_last_n` checkpoints; 0 keeps every one."""
    if keep_last_n:
        for old in checkpoint_dirs(output_dir)[:-keep_last_n]:
            shutil.rmtree(old)


def check_no_later_checkpoints(output_dir: Path, step: int) -> None:
    """Refuse to start (step 0) or resume (from `step`) where checkpoints of later steps exist.

    They belong to another run, or to the later part of the one being resumed; keeping them would
    make `keep_last_n` delete this run's newer saves and `resume=true` pick theirs.
    """
    later = [d for d in checkpoint_dirs(output_dir) if int(d.name.removeprefix("step_")) > step]
    if not later:
        return
    what = "an earlier run" if step == 0 else f"steps after {step}, which this run would redo"
    hint = "resume=true continues that run" if step == 0 else "delete them to go back"
    raise UserError(
        f"{output_dir / CHECKPOINTS_DIR}: holds checkpoints of {what} (up to {later[-1].name}); "
        f"{hint}, or run in another hydra.run.dir"
    )


def is_resuming(resume: str) -> bool:
    return resume.lower() not in ("", "false")


def check_resume_before_loading(resume: str, output_dir: Path) -> None:
    """The checks of a resume (or a fresh start) that need no model, done before loading one:
    the checkpoint exists, and no later one in the output directory would be overwritten."""
    step = 0
    if is_resuming(resume):
        directory = find_checkpoint(resume, output_dir)
        if not _STEP_DIR.fullmatch(directory.name):
            return  # a checkpoint moved under another name: checked once loaded
        step = int(directory.name.removeprefix("step_"))
    check_no_later_checkpoints(output_dir, step)


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """The checkpoint `resume` names: "true"/"latest" for the newest in this run's directory, or
    a path to a checkpoint directory or to a run directory (its newest checkpoint)."""
    latest = resume.lower() in ("true", "latest")
    if latest:
        resume = resume.lower()  # Hydra reads `true` as a bool, which comes back as "True"
    path = output_dir if latest else Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        # Hydra gives every run a new directory, so "latest" needs the old one named.
        hint = "; to continue an earlier run, pass hydra.run.dir=<its directory>" if latest else ""
        raise UserError(f"resume={resume}: no checkpoint found in {path / CHECKPOINTS_DIR}{hint}")
    return found[-1]


def load_checkpoint_state(
    directory: Path,
    recipe: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> TrainingState:
    """Load `directory` into the model and optimizer, whatever the number of processes that saved
    it; returns where training stood.

    RNG states are returned, not restored: the caller restores them last, just before the next
    step, so nothing in between draws from them.
    """
    path = directory / STATE_FILE
    try:
        payload = json.loads(path.read_text())
        rng = torch.load(directory / RNG_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: one line, not a traceback
        raise UserError(f"{path}: not a readable training checkpoint ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: not a finetune training checkpoint (format {FORMAT_VERSION})")
    if payload["recipe"] != recipe:
        raise UserError(f"{path}: a checkpoint of recipe={payload['recipe']}, not recipe={recipe}")
    holders = state_holders(optimizer)
    weights, optimizer_state = get_state_dict(model, holders, options=_TRAINABLE)
    _check_same_weights(directory, weights)
    saved = {"model": weights, "optimizer": optimizer_state}
    try:
        with _dcp_on_one_process_quietly():
            dcp.load(saved, checkpoint_id=directory)
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{directory}: not a readable training checkpoint ({reason})") from None
    set_state_dict(
        model,
        holders,
        model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"],
        # Not strict: the frozen weights are not in a checkpoint (`_check_same_weights` has
        # compared the trainable ones).
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    return TrainingState(**payload["training"], rng=rng)


def _check_same_weights(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint's trainable weights must be this model's, by name and shape."""
    try:
        metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{directory}: not a readable training checkpoint ({reason})") from None
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in metadata.items()
        if key.startswith("model.")
    }
    expected = set(weights)
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise UserError(
            f"{directory}: the checkpoint's weights do not match this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, tensor in weights.items():
        if saved[name] != tuple(tensor.shape):
            raise UserError(
                f"{directory}: {name} has shape {saved[name]} in the checkpoint but "
                f"{tuple(tensor.shape)} in this model"
            )


def should_stop_early(state: TrainingState, val_loss: float, patience: int) -> bool:
    """Record a validation pass after `state.step`; True once `patience` passes in a row have not
    improved on the best val_loss (patience 0 never stops). The counters live in the checkpointed
    state, so a resumed run stops where an uninterrupted one would."""
    state.val_loss = val_loss
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.evals_without_improvement = (
            val_loss,
            state.step,
            0,
        )
    else:
        state.evals_without_improvement += 1
    return 0 < patience <= state.evals_without_improvement


def advance(
    state: TrainingState,
    epoch: int,
    n_examples: int,
    n_tokens: int,
    epoch_size: int,
) -> bool:
    """Record one finished optimizer step in `state`; True when it ended an epoch."""
    state.step += 1
    state.tokens_seen += n_tokens
    state.epoch = epoch
    state.examples_done += n_examples
    if state.examples_done >= epoch_size:
        state.epoch, state.examples_done = epoch + 1, 0
    return state.examples_done == 0
