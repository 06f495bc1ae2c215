"""`provenance.json`: what a run ran. The code (finetune's version, and its git commit when run
from a checkout), the libraries, the device, the command line, and the bytes of every input file
(the data, the tokenizer, the checkpoint's files, a starting adapter): their size and SHA-256.

A rerun (`rerun=DIR`, or `--config-path DIR/.hydra`) compares its inputs' hashes with the ones
DIR's run recorded and warns, one line per file, of each that differs, before it trains.

The files are hashed in a thread started with the run, while the data is tokenized and the model
loads: hashed after the load, a 1.6 GB checkpoint adds 12.8 % to its load time on a 2-core CPU,
in the thread +0.5 % (medians, bench/provenance_hash.py; see the README's Provenance).
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import subprocess
import sys
import threading
from concurrent.futures import Future
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from finetune.checkpoint_files import find_checkpoint
from finetune.config import CheckpointParams
from finetune.data_cache import file_digest

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
# The libraries whose versions change a run's numbers or its config; transformers when present
# (it reads the tokenizer.json of some checkpoints' tokenizers through `tokenizers`, and the
# tests compare with it).
LIBRARIES = ("torch", "hydra-core", "omegaconf", "safetensors", "tokenizers", "transformers")
PACKAGE_DIR = Path(__file__).resolve().parent

# Hashes started by `start_hashing`, by run directory, until `record_provenance` collects them.
_pending: dict[str, Future[dict[str, dict]]] = {}


def input_files(params: CheckpointParams) -> dict[str, Path]:
    """Every file a run reads its model and data from, by what it is: `dataset.path`,
    `tokenizer`, `checkpoint/<file name>`, `adapter/<file name>`."""
    files: dict[str, Path] = {}
    dataset = getattr(params, "dataset", None)
    if dataset is not None:
        files["dataset.path"] = Path(dataset.path)
        if dataset.val_path:
            files["dataset.val_path"] = Path(dataset.val_path)
    files["tokenizer"] = Path(params.tokenizer)
    found = find_checkpoint(Path(params.checkpoint))
    for path in dict.fromkeys([found.config, found.listing, *found.weights]):
        files[f"checkpoint/{path.name}"] = path
    adapter = getattr(params, "adapter", "")
    if adapter:
        for path in sorted(Path(adapter).iterdir()):
            if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
                files[f"adapter/{path.name}"] = path
    return files


def file_records(files: dict[str, Path]) -> dict[str, dict]:
    """{what: {"path", "bytes", "sha256"}} for each of `files`."""
    return {
        what: {"path": str(path), "bytes": path.stat().st_size, "sha256": file_digest(path).hex()}
        for what, path in files.items()
    }


def start_hashing(params: CheckpointParams) -> None:
    """Hash the run's input files in a thread, while the run reads them anyway; the hashes are
    collected by `record_provenance`. hashlib lets go of the GIL on large buffers, so on a
    machine with a core to spare the thread costs the loading little."""
    files = input_files(params)
    hashed: Future[dict[str, dict]] = Future()

    def work() -> None:
        try:
            hashed.set_result(file_records(files))
        except Exception as error:  # raised where the result is collected
            hashed.set_exception(error)

    # A daemon: a run that stops on bad input exits at once, not after hashing a 13 GB checkpoint.
    threading.Thread(target=work, name="provenance", daemon=True).start()
    _pending[params.output_dir] = hashed


def hashed_inputs(params: CheckpointParams) -> dict[str, dict]:
    """The records `start_hashing` computed for this run, or computed now if it was not called."""
    pending = _pending.pop(params.output_dir, None)
    return pending.result() if pending else file_records(input_files(params))


def record_provenance(params: CheckpointParams, device_name: str) -> dict[str, Any]:
    """Write `provenance.json` to the run directory, after warning of each input file that
    differs from the one recorded by the run this one reruns (if it is a rerun)."""
    provenance = {
        "finetune": code_version(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "device": device_name,
        "command": shlex.join(sys.orig_argv),
        "overrides": hydra_overrides(),
        "files": hashed_inputs(params),
    }
    earlier = rerun_of()
    if earlier is not None:
        for line in changed_inputs(earlier, provenance["files"]):
            log.warning(line)
    path = Path(params.output_dir) / PROVENANCE_FILE
    path.write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def code_version() -> dict[str, Any]:
    """finetune's version, with the commit and whether tracked files differ from it when this
    package is a git checkout's `src/finetune` (not when installed from a wheel)."""
    version = {"version": metadata.version("finetune")}
    return version | git_state(PACKAGE_DIR)


def git_state(package_dir: Path) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the checkout `package_dir` is in; {} when it is in none,
    or git is not installed."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        # A package installed into a virtual environment inside some other repository is in that
        # repository's tree but not its code.
        if top / "src" / "finetune" != package_dir:
            return {}
        commit = git("rev-parse", "HEAD")
        # Tracked files only: run directories (outputs/) and caches are not the code.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def library_versions() -> dict[str, str]:
    """The installed version of each of LIBRARIES, those not installed left out."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hydra_overrides() -> list[str]:
    """The job's overrides as Hydra recorded them (a sweep job's own values), if Hydra ran."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def rerun_of() -> Path | None:
    """The directory of the run this one reruns: the one whose saved config (`DIR/.hydra`) Hydra
    composed, when it holds a provenance.json; None for a run composed from conf/."""
    if not HydraConfig.initialized():
        return None
    for source in HydraConfig.get().runtime.config_sources:
        if source.provider != "main" or source.schema != "file":
            continue
        saved = Path(source.path)
        if saved.name == ".hydra" and (saved.parent / PROVENANCE_FILE).is_file():
            return saved.parent
    return None


def changed_inputs(earlier_run: Path, files: dict[str, dict]) -> list[str]:
    """One line for each input file whose SHA-256 differs from the one `earlier_run` recorded."""
    try:
        recorded = json.loads((earlier_run / PROVENANCE_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{earlier_run / PROVENANCE_FILE}: not readable ({error!r}); inputs not compared"]
    lines = []
    for what, now in files.items():
        then = recorded.get(what)
        if then is None or then.get("sha256") == now["sha256"]:
            continue
        lines.append(
            f"{what}: {now['path']} (sha256 {now['sha256'][:12]}…) differs from the file the run "
            f"in {earlier_run} read, {then.get('path')} (sha256 {then.get('sha256', '')[:12]}…)"
        )
    return lines


def device_name(device: Any) -> str:
    """`cuda: <GPU name>`, or `cpu: <processor model>` from /proc/cpuinfo (where it exists)."""
    if device.type == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model() or platform.machine()}"


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()
