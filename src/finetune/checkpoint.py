"""Loading a checkpoint directory, in Hugging Face's or Meta's format, into a model.

`load_checkpoint` tells the format from the directory's files (checkpoint_files.py), then
streams the weights into a model built on the meta device: each tensor is viewed lazily through a
memory map, copied once into the run's dtype, and its file pages are dropped (lean_loading.py), so
loading holds little more than the model. Nothing on a load path runs code from a file:
safetensors holds only tensors, and `torch.load(weights_only=True)` refuses any pickled object that
is not a tensor.

Hugging Face's key names are in hf_format.py, Meta's in meta_format.py.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from finetune.architecture import check_architecture, hf_architecture
from finetune.checkpoint_files import CheckpointFiles, CheckpointFormat, find_checkpoint
from finetune.config import ModelConfig, OutputDType
from finetune.distributed import local_device, local_part, shard_rows
from finetune.errors import UserError
from finetune.hf_format import TIED_OUTPUT, TORCH_DTYPE_NAMES, hf_key
from finetune.lean_loading import copy_from_file, load_torch_file, tensor_from_file
from finetune.meta_format import (
    NOT_PARAMETERS,
    check_same_keys,
    halves_from_pairs,
    is_rotary,
    meta_key,
    meta_slice_shape,
    split_dim,
)
from finetune.model import Llama
from finetune.qlora import NF4Linear

# (key as the checkpoint names it, tensor in the run's dtype on its device)
Weights = Iterator[tuple[str, torch.Tensor]]


def load_checkpoint(
    cfg: ModelConfig, ckpt_dir: Path, device: torch.device, dtype: torch.dtype
) -> Llama:
    """A model of architecture `cfg` with the weights of `ckpt_dir` (Hugging Face's or Meta's
    format, told by its files), in `dtype` on `device`."""
    with torch.device("meta"):
        model = Llama(cfg)
    state = dict(_checkpoint_weights(cfg, Path(ckpt_dir), device, dtype))
    # Not strict: a tied model's lm_head.weight is not in `state`; every other weight is.
    model.load_state_dict(state, assign=True, strict=False)
    # `assign` put a new embedding Parameter in place: point the output layer at it again.
    model.tie_output_to_embedding()
    return model


@torch.no_grad()
def load_sharded_weights(model: Llama, ckpt_dir: Path) -> None:
    """Copy the weights of `ckpt_dir` into `model`, whose parameters are sharded across processes
    (distributed.shard_model): each process reads only the rows of each tensor that it holds,
    so none ever holds the whole model. An adapted layer's weight goes to its frozen base.

    A QLoRA layer's weight is read whole, one at a time, and quantized whole, so that its NF4
    numbers are one process's (`NF4Linear.load_weight`); the process keeps its rows of it."""
    modules = {name: _base_module(model, name) for name in _plain_names(model.cfg)}
    params = {name: getattr(module, name.rpartition(".")[2]) for name, module in modules.items()}
    rows = {
        name: ALL if isinstance(modules[name], NF4Linear) else shard_rows(param)
        for name, param in params.items()
    }
    dtype = next(iter(params.values())).dtype
    for name, tensor in _checkpoint_weights(model.cfg, Path(ckpt_dir), local_device(), dtype, rows):
        if isinstance(modules[name], NF4Linear):
            modules[name].load_weight(tensor)
        else:
            local_part(params[name]).copy_(tensor)


def _plain_names(cfg: ModelConfig) -> list[str]:
    """The parameter names of a Llama of architecture `cfg`, as its checkpoints store them."""
    with torch.device("meta"):
        return list(Llama(cfg).state_dict())


def _base_module(model: Llama, name: str) -> torch.nn.Module:
    """The module that holds parameter `name`: for an adapted layer, the frozen layer it wraps as
    `base` (lora.LoRALinear)."""
    module = model.get_submodule(name.rpartition(".")[0])
    return getattr(module, "base", module)


def _checkpoint_weights(
    cfg: ModelConfig,
    ckpt_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    rows: dict[str, slice] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, tensor) for every weight of a Llama of architecture `cfg` stored in
    `ckpt_dir`, read one at a time, each cut to `rows[name]` of dim 0 if given; a missing weight
    is an error once the rest are read."""
    found = find_checkpoint(ckpt_dir)
    file_key = meta_key if found.format is CheckpointFormat.meta else hf_key
    names = {file_key(name): name for name in _plain_names(cfg)}
    with torch.device("meta"):
        shapes = {key: Llama(cfg).get_parameter(name).shape for key, name in names.items()}
    file_rows = {key: rows[name] for key, name in names.items()} if rows else {}
    weights = _read_weights(found, cfg, shapes, device, dtype, file_rows)
    seen = set()
    output = embedding = None
    for key, tensor in weights:
        name = names[key]
        if cfg.tie_word_embeddings and name == TIED_OUTPUT:
            output = tensor
            continue
        if name == "embed_tokens.weight":
            embedding = tensor
        seen.add(key)
        yield name, tensor
    if output is not None and embedding is not None:
        _check_tied_output(found, output, embedding)
    if cfg.tie_word_embeddings:
        names = {key: name for key, name in names.items() if name != TIED_OUTPUT}
    missing = [key for key in names if key not in seen]
    if missing:
        raise UserError(
            f"{found.listing}: missing {missing[0]!r} "
            f"({len(missing)} of the model's {len(names)} weights are missing)"
        )


def _check_tied_output(
    found: CheckpointFiles, output: torch.Tensor, embedding: torch.Tensor
) -> None:
    """A tied checkpoint may still hold lm_head.weight: a copy of the embedding is dropped, but a
    different one is refused, since transformers versions disagree on it (5.x then unties the
    two, 4.x overwrote lm_head with the embedding)."""
    if not torch.equal(output, embedding):
        raise UserError(
            f"{found.config}: tie_word_embeddings=true but {found.listing.name} holds an "
            "lm_head.weight that differs from the embedding; set tie_word_embeddings to false "
            "to train both, or remove lm_head.weight to tie them"
        )


# The name before Meta checkpoints were readable; it reads every format.
load_hf = load_checkpoint


def _read_weights(
    found: CheckpointFiles,
    cfg: ModelConfig,
    shapes: dict[str, torch.Size],
    device: torch.device,
    dtype: torch.dtype,
    rows: dict[str, slice],
) -> Weights:
    """Check the architecture, then read the tensors in the format's own way; a key in `rows`
    is read only for those rows of dim 0."""
    check_architecture(cfg, found.config.parent)
    if found.format is CheckpointFormat.meta:
        return _read_meta(found.weights, shapes, cfg.head_dim, device, dtype, rows)
    if found.format is CheckpointFormat.hf_safetensors:
        return _read_hf_safetensors(found.weights, shapes, device, dtype, rows)
    return _read_hf_bin(found.weights, shapes, device, dtype, rows)


ALL = slice(None)


# Checkpoints saved by transformers before 4.31 (Llama-2's on the Hub among them) carry each
# layer's rotary inverse frequencies, a buffer computed from rope_theta, not a weight.
HF_ROTARY_BUFFER = "rotary_emb.inv_freq"


def _read_hf_safetensors(
    files: list[Path],
    shapes: dict[str, torch.Size],
    device: torch.device,
    dtype: torch.dtype,
    rows: dict[str, slice],
) -> Weights:
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.endswith(HF_ROTARY_BUFFER):
                        continue
                    view = f.get_tensor(key)  # memory-mapped: nothing is read yet
                    _check_shape(file, key, view.shape, shapes.get(key))
                    yield key, tensor_from_file(view[rows.get(key, ALL)], device, dtype)
        except SafetensorError as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None


def _read_hf_bin(
    files: list[Path],
    shapes: dict[str, torch.Size],
    device: torch.device,
    dtype: torch.dtype,
    rows: dict[str, slice],
) -> Weights:
    for file in files:
        for key, view in load_torch_file(file).items():
            if key.endswith(HF_ROTARY_BUFFER):
                continue
            _check_shape(file, key, view.shape, shapes.get(key))
            yield key, tensor_from_file(view[rows.get(key, ALL)], device, dtype)


def _read_meta(
    files: list[Path],
    shapes: dict[str, torch.Size],
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    rows: dict[str, slice],
) -> Weights:
    """Meta's shards, merged one key at a time: only that key's slices are read at once (then
    cut to `rows`: model-parallel slices split some weights along dim 1, so every row is read)."""
    shards = [load_torch_file(file) for file in files]
    check_same_keys(files, shards)
    for key in shards[0]:
        if key in NOT_PARAMETERS:
            continue
        if key not in shapes:
            raise UserError(f"{files[0]}: unexpected key {key!r} for a Llama model")
        slices = [shard[key] for shard in shards]
        merged = _merge_slices(files, key, slices, shapes[key], head_dim, device, dtype)
        yield key, merged[rows[key]].clone() if key in rows else merged


def _merge_slices(
    files: list[Path],
    key: str,
    slices: list[torch.Tensor],
    shape: torch.Size,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One weight from its model-parallel slices, in `dtype`, wq/wk rows in our rotary order."""
    dim = split_dim(key)
    if dim is None:  # replicated: every shard has the whole tensor
        files, slices, dim = files[:1], slices[:1], 0
    slice_shape = meta_slice_shape(files[0], key, shape, dim, len(slices), head_dim)
    merged = torch.empty(shape, dtype=dtype, device=device)
    offset = 0
    for file, view in zip(files, slices, strict=True):
        _check_shape(file, key, view.shape, slice_shape)
        region = merged.narrow(dim, offset, slice_shape[dim])
        if is_rotary(key):
            reorder = functools.partial(halves_from_pairs, head_dim=head_dim)
            copy_from_file(region, view, rows_together=head_dim, reorder=reorder)
        else:
            copy_from_file(region, view)
        offset += slice_shape[dim]
    return merged


def _check_shape(file: Path, key: str, found: torch.Size, expected: torch.Size | None) -> None:
    if expected is None:
        raise UserError(f"{file}: unexpected key {key!r} for a Llama model")
    if found != expected:
        raise UserError(f"{file}: {key} has shape {tuple(found)}, expected {tuple(expected)}")


# output_dtype -> the dtype the model is saved in; `auto` is the checkpoint's (`stored_dtype`).
OUTPUT_DTYPES = {
    OutputDType.fp32: torch.float32,
    OutputDType.bf16: torch.bfloat16,
    OutputDType.fp16: torch.float16,
}


def output_dtype(choice: OutputDType, ckpt_dir: Path) -> torch.dtype:
    return OUTPUT_DTYPES.get(choice) or stored_dtype(ckpt_dir)


def stored_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the checkpoint in `ckpt_dir` stores its weights in: config.json's torch_dtype
    (or dtype), else that of the first tensor of its first weight file."""
    found = find_checkpoint(ckpt_dir)
    if found.format is not CheckpointFormat.meta:
        named = hf_architecture(found.config).stored_dtype
        if named:
            return getattr(torch, named)
    first = found.weights[0]
    if found.format is CheckpointFormat.hf_safetensors:
        with safe_open(first, framework="pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype  # memory-mapped: nothing is read
    else:
        dtype = next(iter(load_torch_file(first).values())).dtype
    # fp64 or int8 files are not a format to write back.
    return dtype if dtype in TORCH_DTYPE_NAMES else torch.float32
