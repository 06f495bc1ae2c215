"""Writing a run's outputs without losing earlier ones: atomic directories and up-front checks
that the output directory is writable and has room for what the run will write."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune import ranks
from finetune.checkpoint import output_dtype
from finetune.config import FullFinetuneParams, OutputFormat
from finetune.errors import UserError
from finetune.model import Llama, count_parameters


@contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `directory` that replaces it once the block succeeds.

    A kill at any moment leaves the complete new directory or the old one, possibly under
    `<name>.old` for the instant between two renames, which `restore_interrupted` puts back. A
    write that fails, e.g. on a full disk, removes its partial files and raises a `UserError`;
    what `directory` held is kept.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    restore_interrupted(directory)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed write
    try:
        tmp.mkdir(parents=True)
        yield tmp
        share_like_other_files(tmp)
        if directory.exists():
            # Directories cannot be renamed over one another, so the old one steps aside first.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        restore_interrupted(directory)
        cause = write_error(error) if isinstance(error, Exception) else None
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        if cause.filename and not str(cause.filename).startswith(str(tmp)):
            reason = f"{cause.filename}: {reason}"  # e.g. a file copied in went missing
        kept = "its previous contents are kept" if directory.exists() else "nothing was written"
        raise UserError(f"{directory}: could not write it ({reason}); {kept}") from None


@contextmanager
def written_by_rank_zero(directory: Path) -> Iterator[Path]:
    """`atomic_directory(directory)` on the process that writes the run's files; the others,
    which take part in gathering what is written (a sharded model), write nothing and get
    `directory` itself."""
    if not ranks.writes_files():
        yield directory
        return
    with atomic_directory(directory) as tmp:
        yield tmp


def share_like_other_files(directory: Path) -> None:
    """Give the files in `directory` the permissions the umask gives any new file.

    safetensors writes through a private temporary file (mode 600), so a model would otherwise
    be unreadable to a server or a colleague running as another user.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def restore_interrupted(directory: Path) -> None:
    """Put back `directory` if a write was stopped between moving it aside and renaming the new
    one in: the old contents are then complete under `<name>.old`."""
    old = directory.with_name(directory.name + ".old")
    if old.is_dir() and not directory.exists():
        os.replace(old, directory)


def write_error(error: Exception) -> OSError | None:
    """The operating system's error behind a failed write, if that is what `error` is.

    torch.save reports a failed write to a file object as a RuntimeError raised while handling
    the OSError; safetensors puts it in its message as "(os error N)".
    """
    seen: Exception | BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if found := re.search(r"\(os error (\d+)\)", str(error)):
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def check_writable(directory: Path, key: str = "output_dir") -> None:
    """Create `directory` if needed and prove a file can be written in it, before any work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UserError(
            f"{key}={directory}: not a writable directory ({error.strerror or error})"
        ) from None


# What a finished run leaves in its directory, by the option that trains it further: the adapter
# of recipe=lora (looked at first, as such a run also leaves model/), and the model.
FINISHED_RUN_DIRS = {"adapter": "adapter", "model": "checkpoint"}


def check_no_finished_run(output_dir: Path) -> None:
    """Refuse to start a new run where a finished one left its adapter or model, which the new
    run would replace when it ends."""
    for name, option in FINISHED_RUN_DIRS.items():
        found = output_dir / name
        if found.is_dir():
            # Its step checkpoints (save_every_n_steps) let it go on in place, optimizer and all.
            go_on = (
                ", or resume=true with a larger max_steps"
                if any(output_dir.glob("checkpoints/step_*"))
                else ""
            )
            raise UserError(
                f"{found}: holds the {name} of a finished run; choose another hydra.run.dir "
                f"(with {option}={found} to train it further){go_on}"
            )


def check_free_space(
    model: Llama,
    params: FullFinetuneParams,
    steps: int,
    checkpoints_on_disk: int,
    saved_bytes: int,
) -> None:
    """Refuse to start a run whose checkpoints and final outputs (`saved_bytes`, which the recipe
    gives) would not fit on the disk.

    An estimate from the parameter counts, erring high: it counts the checkpoint being written
    while `keep_last_n` others still exist (less the `checkpoints_on_disk` a resumed run already
    has, which those replace), and the final outputs in full, as earlier ones stay until the new
    ones are complete.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Each trainable weight is saved with AdamW's two fp32 moments.
    checkpoint = sum(p.numel() * (p.element_size() + 8) for p in trainable)
    n_checkpoints = max(0, checkpoints_at_once(params, steps) - checkpoints_on_disk)
    needed = n_checkpoints * checkpoint + saved_bytes
    output_dir = Path(params.output_dir)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(
            f"output_dir={output_dir}: {gigabytes(free)} free on its disk, but the run writes "
            f"about {gigabytes(needed)} ({n_checkpoints} new checkpoint(s) of "
            f"{gigabytes(checkpoint)} and {gigabytes(saved_bytes)} of model); free space, lower "
            "keep_last_n, or choose another hydra.run.dir"
        )


def checkpoints_at_once(params: FullFinetuneParams, steps: int) -> int:
    """The most training-state checkpoints on disk at one time during the run."""
    every = params.save_every_n_steps
    if not every:
        return 0
    # Every n steps, at each epoch's end, and at the last step.
    saves = steps // every + params.epochs + (1 if steps % every else 0)
    # Pruning happens after a save, so keep_last_n + 1 exist for a moment.
    return min(saves, params.keep_last_n + 1) if params.keep_last_n else saves


def model_bytes(model: Llama, params: FullFinetuneParams) -> int:
    """The size of the model directories `runs.save_model` writes: model/, and model_meta/ with
    output_format=meta."""
    with torch.device("meta"):  # the unquantized, unadapted model's size, without memory
        n_weights = count_parameters(Llama(model.cfg))
    size = n_weights * output_dtype(params.output_dtype, Path(params.checkpoint)).itemsize
    return 2 * size if params.output_format is OutputFormat.meta else size


def gigabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB"
