"""Which checkpoint format a directory holds, and its files, told without torch.

Hugging Face's: config.json with model.safetensors or pytorch_model.bin, either one file or shards
listed by an index. Meta's: params.json with consolidated.NN.pth model-parallel shards. config.py
reaches this through architecture.py while validating the params, so it imports no torch;
checkpoint.py reads the weights of the files found here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from finetune.errors import ConfigError, UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
PARAMS_FILE = "params.json"
SHARD_GLOB = "consolidated.*.pth"


class CheckpointFormat(Enum):
    hf_safetensors = "Hugging Face, safetensors"
    hf_bin = "Hugging Face, PyTorch .bin"
    meta = "Meta, consolidated.NN.pth"


@dataclass(frozen=True)
class CheckpointFiles:
    """What `find_checkpoint` found in a checkpoint directory."""

    format: CheckpointFormat
    config: Path  # config.json or params.json: the architecture
    weights: list[Path]  # every file that holds weights, in order
    listing: Path  # the file that should have listed a weight found missing


def shard_name(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


def find_checkpoint(ckpt_dir: Path) -> CheckpointFiles:
    """The format of `ckpt_dir` and its files; a Hugging Face checkpoint in safetensors wins."""
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: not a directory")
    hf_layouts = [
        (CheckpointFormat.hf_safetensors, SAFETENSORS, SAFETENSORS_INDEX),
        (CheckpointFormat.hf_bin, PYTORCH_BIN, PYTORCH_BIN_INDEX),
    ]
    for checkpoint_format, single, index in hf_layouts:
        present = [ckpt_dir / n for n in (index, single) if (ckpt_dir / n).is_file()]
        if present:
            if not (ckpt_dir / "config.json").is_file():
                raise UserError(f"{ckpt_dir}: {present[0].name} but no config.json beside it")
            weights, listing = _hf_weight_files(ckpt_dir, present[0])
            return CheckpointFiles(checkpoint_format, ckpt_dir / "config.json", weights, listing)
    if (ckpt_dir / PARAMS_FILE).is_file() or any(ckpt_dir.glob(SHARD_GLOB)):
        params, shards = meta_files(ckpt_dir)
        return CheckpointFiles(CheckpointFormat.meta, params, shards, shards[0])
    if (ckpt_dir / "config.json").is_file():
        raise UserError(
            f"{ckpt_dir}: config.json but no {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} "
            f"or {PYTORCH_BIN_INDEX}"
        )
    _refuse_a_folder_of_checkpoints(ckpt_dir)
    raise UserError(
        f"{ckpt_dir}: no checkpoint: expected config.json with {SAFETENSORS} or {PYTORCH_BIN} "
        f"(Hugging Face), or {PARAMS_FILE} with {shard_name(0)} (Meta)"
    )


def _refuse_a_folder_of_checkpoints(ckpt_dir: Path) -> None:
    """An empty directory, or one of runs whose checkpoints are a level down, said as such."""
    if not any(ckpt_dir.iterdir()):
        raise ConfigError("checkpoint", f"{ckpt_dir} is an empty directory")
    below = sorted(
        str(sub)
        for sub in ckpt_dir.iterdir()
        if sub.is_dir() and any((sub / name).is_file() for name in ("config.json", PARAMS_FILE))
    )
    if below:
        raise ConfigError(
            "checkpoint",
            f"{ckpt_dir} holds no checkpoint, but its subfolders do: {', '.join(below)}; "
            "point checkpoint= at one",
        )


def _hf_weight_files(ckpt_dir: Path, first: Path) -> tuple[list[Path], Path]:
    """(weight files, the file that lists them) from a single weights file or an index."""
    if not first.name.endswith(".index.json"):
        return [first], first
    files = [ckpt_dir / name for name in sorted(set(_weight_map(first).values()))]
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: missing, but {first.name} lists it")
    return files, first


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index}: not a readable index of weight files ({e!r})") from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index}: weight_map is not a mapping from weight names to files")
    for key, name in weight_map.items():
        # A bare file name: an index must not point outside its checkpoint.
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(f"{index}: {key} is in {name!r}, expected a file name")
    return weight_map


def meta_files(ckpt_dir: Path) -> tuple[Path, list[Path]]:
    """params.json and the shards, checked to be numbered from 00 without gaps."""
    params = ckpt_dir / PARAMS_FILE
    found = sorted(p.name for p in ckpt_dir.glob(SHARD_GLOB))
    if not params.is_file():
        raise UserError(f"{ckpt_dir}: {found[0]} but no {PARAMS_FILE} beside it")
    expected = [shard_name(i) for i in range(max(1, len(found)))]
    if missing := [name for name in expected if name not in found]:
        raise UserError(
            f"{ckpt_dir / missing[0]}: missing; Meta numbers its model-parallel shards from "
            f"{shard_name(0)} without gaps, found: {', '.join(found) or 'none'}"
        )
    return params, [ckpt_dir / name for name in expected]
