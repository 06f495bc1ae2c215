"""Checkpoint directories: Hugging Face's and Meta's formats in, Hugging Face's out.

`load_checkpoint` tells the format from the directory's files, then streams the weights into a
model built on the meta device: each tensor is viewed lazily through a memory map, copied once
into the run's dtype, and its file pages are dropped, so loading holds little more than the model.
Nothing on a load path runs code from a file: safetensors holds only tensors, and
`torch.load(weights_only=True)` refuses any pickled object that is not a tensor.

A Hugging Face `LlamaForCausalLM` state dict is finetune's own with `model.` in front of every key
but `lm_head.weight` (see model.py), so that format is a rename. Meta's is in meta_format.py.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import pickle
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finetune.architecture import (
    HF_CONFIG_KEYS,
    SAFETENSORS_INDEX,
    CheckpointFiles,
    CheckpointFormat,
    check_architecture,
    find_checkpoint,
    hf_architecture,
)
from finetune.config import ModelConfig, OutputDType
from finetune.errors import UserError
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

# The most of a file that loading reads before copying it and handing its pages back.
COPY_BLOCK_BYTES = 16 * 2**20
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# A tied model's output layer is its embedding: one weight, stored under the embedding's name.
TIED_OUTPUT = "lm_head.weight"


def hf_key(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def hf_config(cfg: ModelConfig, dtype: torch.dtype, bos_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{hf: getattr(cfg, ours) for ours, hf in HF_CONFIG_KEYS.items()},
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def save_hf(
    model: Llama,
    out_dir: Path,
    *,
    tokenizer: Path,
    bos_id: int,
    eos_id: int,
    dtype: torch.dtype,
    max_shard_bytes: int = 5_000_000_000,
    chat_template: str = "",
) -> None:
    """Write `model` as a Hugging Face checkpoint that transformers and vLLM load as they are.

    `chat_template` goes into tokenizer_config.json unless the tokenizer's own has one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        hf_key(name): t.detach().to(device="cpu", dtype=dtype).contiguous()
        for name, t in model.state_dict().items()
        # transformers writes a tied model without lm_head.weight, and ties it when loading.
        if not (model.cfg.tie_word_embeddings and name == TIED_OUTPUT)
    }
    shards = _split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config(model.cfg, dtype, bos_id, eos_id)
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False},
    )
    copy_tokenizer(tokenizer, out_dir)
    if chat_template:
        _add_chat_template(out_dir / "tokenizer_config.json", chat_template)


def _add_chat_template(path: Path, template: str) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("chat_template", template)
    _write_json(path, config)


def _split_into_shards(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def copy_tokenizer(tokenizer: Path, out_dir: Path) -> None:
    """Copy `tokenizer` (as tokenizer.model or tokenizer.json), with the Hugging Face files
    beside it or new ones."""
    target = out_dir / ("tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model")
    if tokenizer.resolve() != target.resolve():
        shutil.copyfile(tokenizer, target)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer.parent / name).is_file() and tokenizer.parent.resolve() != out_dir.resolve():
            shutil.copyfile(tokenizer.parent / name, out_dir / name)
    if not (out_dir / "tokenizer_config.json").is_file():
        _write_json(
            out_dir / "tokenizer_config.json",
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
            },
        )
    if not (out_dir / "special_tokens_map.json").is_file():
        _write_json(
            out_dir / "special_tokens_map.json",
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


# (key as the checkpoint names it, tensor in the run's dtype on its device)
Weights = Iterator[tuple[str, torch.Tensor]]


def load_checkpoint(
    cfg: ModelConfig, ckpt_dir: Path, device: torch.device, dtype: torch.dtype
) -> Llama:
    """A model of architecture `cfg` with the weights of `ckpt_dir` (Hugging Face's or Meta's
    format, told by its files), in `dtype` on `device`."""
    found = find_checkpoint(Path(ckpt_dir))
    with torch.device("meta"):
        model = Llama(cfg)
    file_key = meta_key if found.format is CheckpointFormat.meta else hf_key
    names = {file_key(name): name for name in model.state_dict()}
    shapes = {key: model.get_parameter(name).shape for key, name in names.items()}
    weights = _read_weights(found, cfg, shapes, device, dtype)
    state = {names[key]: tensor for key, tensor in weights}
    if cfg.tie_word_embeddings:
        _drop_tied_output(found, state)
        names = {key: name for key, name in names.items() if name != TIED_OUTPUT}
    missing = [key for key, name in names.items() if name not in state]
    if missing:
        raise UserError(
            f"{found.listing}: missing {missing[0]!r} "
            f"({len(missing)} of the model's {len(names)} weights are missing)"
        )
    # Not strict: a tied model's lm_head.weight is not in `state`; every other weight is.
    model.load_state_dict(state, assign=True, strict=False)
    # `assign` put a new embedding Parameter in place: point the output layer at it again.
    model.tie_output_to_embedding()
    return model


def _drop_tied_output(found: CheckpointFiles, state: dict[str, torch.Tensor]) -> None:
    """A tied checkpoint may still hold lm_head.weight: a copy of the embedding is dropped, but a
    different one is refused, since transformers versions disagree on it (5.x then unties the
    two, 4.x overwrote lm_head with the embedding)."""
    output = state.pop(TIED_OUTPUT, None)
    embedding = state.get("embed_tokens.weight")
    if output is not None and embedding is not None and not torch.equal(output, embedding):
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
) -> Weights:
    """Check the architecture, then read the tensors in the format's own way."""
    check_architecture(cfg, found.config.parent)
    if found.format is CheckpointFormat.meta:
        return _read_meta(found.weights, shapes, cfg.head_dim, device, dtype)
    if found.format is CheckpointFormat.hf_safetensors:
        return _read_hf_safetensors(found.weights, shapes, device, dtype)
    return _read_hf_bin(found.weights, shapes, device, dtype)


# Checkpoints saved by transformers before 4.31 (Llama-2's on the Hub among them) carry each
# layer's rotary inverse frequencies, a buffer computed from rope_theta, not a weight.
HF_ROTARY_BUFFER = "rotary_emb.inv_freq"


def _read_hf_safetensors(
    files: list[Path], shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype
) -> Weights:
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.endswith(HF_ROTARY_BUFFER):
                        continue
                    view = f.get_tensor(key)  # memory-mapped: nothing is read yet
                    _check_shape(file, key, view.shape, shapes.get(key))
                    yield key, _tensor_from_file(view, device, dtype)
        except SafetensorError as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None


def _read_hf_bin(
    files: list[Path], shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype
) -> Weights:
    for file in files:
        for key, view in _load_torch_file(file).items():
            if key.endswith(HF_ROTARY_BUFFER):
                continue
            _check_shape(file, key, view.shape, shapes.get(key))
            yield key, _tensor_from_file(view, device, dtype)


def _read_meta(
    files: list[Path],
    shapes: dict[str, torch.Size],
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Weights:
    """Meta's shards, merged one key at a time: only that key's slices are read at once."""
    shards = [_load_torch_file(file) for file in files]
    check_same_keys(files, shards)
    for key in shards[0]:
        if key in NOT_PARAMETERS:
            continue
        if key not in shapes:
            raise UserError(f"{files[0]}: unexpected key {key!r} for a Llama model")
        slices = [shard[key] for shard in shards]
        yield key, _merge_slices(files, key, slices, shapes[key], head_dim, device, dtype)


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
            _copy_from_file(region, view, rows_together=head_dim, reorder=reorder)
        else:
            _copy_from_file(region, view)
        offset += slice_shape[dim]
    return merged


def _check_shape(file: Path, key: str, found: torch.Size, expected: torch.Size | None) -> None:
    if expected is None:
        raise UserError(f"{file}: unexpected key {key!r} for a Llama model")
    if found != expected:
        raise UserError(f"{file}: {key} has shape {tuple(found)}, expected {tuple(expected)}")


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save file's tensors, memory-mapped; `weights_only` unpickles nothing but tensors
    and plain containers, so no code in the file can run."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: holds Python objects other than tensors; not loaded, since unpickling "
            f"them could run code"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({reason})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected a mapping from names to tensors")
    return state


def _tensor_from_file(view: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of its own, in `dtype` on `device`, with the values of the memory-mapped `view`.

    Always a copy, even in the file's dtype: a model whose weights pointed into a file mapping
    would keep the whole file mapped, and torch.save would write all of it for each weight.
    """
    tensor = torch.empty(view.shape, dtype=dtype, device=device)
    _copy_from_file(tensor, view)
    return tensor


def _copy_from_file(
    target: torch.Tensor,
    view: torch.Tensor,
    rows_together: int = 1,
    reorder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """`target[:] = reorder(view)`, a block of rows at a time, each block's file pages dropped
    once copied: so no more than one block of the file is resident at once, however large the
    tensor (an embedding is 1 GB at 70B). `reorder` must work on `rows_together` rows at a time."""
    if view.ndim == 0:
        target.copy_(view)
        return
    row_bytes = view[0].numel() * view.element_size()
    rows = max(1, COPY_BLOCK_BYTES // max(1, row_bytes) // rows_together) * rows_together
    for start in range(0, view.shape[0], rows):
        block = view[start : start + rows]
        target[start : start + rows].copy_(reorder(block) if reorder else block)
        _drop_file_pages(block)


def _drop_file_pages(view: torch.Tensor) -> None:
    """Let the kernel take back the pages of a memory-mapped tensor that has been copied.

    Pages read through a file mapping count in the process's resident memory until the mapping
    goes, and a file stays mapped while any of its tensors lives: without this, reading a whole
    checkpoint would hold the file and the copies at once. The mapping is private and never
    written, so a page read again comes back from the file unchanged. Only for views of a file:
    on anonymous memory MADV_DONTNEED would zero the pages.
    """
    if sys.platform != "linux" or view.device.type != "cpu" or not view.is_contiguous():
        return
    start = view.data_ptr()
    end = start + view.numel() * view.element_size()
    # Only the pages that lie wholly inside this tensor.
    first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end_page = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end_page > first_page:
        _madvise()(first_page, end_page - first_page, mmap.MADV_DONTNEED)


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


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
        dtype = next(iter(_load_torch_file(first).values())).dtype
    # fp64 or int8 files are not a format to write back.
    return dtype if dtype in TORCH_DTYPE_NAMES else torch.float32
