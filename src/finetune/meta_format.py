"""Meta's Llama-2 checkpoint layout: `params.json` and `consolidated.NN.pth` model-parallel shards.

What differs from finetune's (Hugging Face's) layout, and how each difference is bridged:
- Key names: `meta_key` maps each of our parameter names onto Meta's.
- Shards: checkpoints for N-way model parallelism are N files, each holding a slice of every
  matrix (`SPLIT_DIMS` says along which dimension) and a copy of every norm.
- Rotary layout: Meta rotates adjacent pairs of a head's dimensions (2i, 2i+1); we rotate the
  halves (i, i + head_dim/2). The same rotation applied to reordered q and k rows gives the same
  attention scores, so converting is an exact reordering of the rows of wq and wk, per head.
- `params.json` gives the feed-forward width as Meta's formula over `dim`, `multiple_of` and
  `ffn_dim_multiplier`, and may leave the vocabulary to the tokenizer (`vocab_size: -1`).
Reading params.json lives in architecture.py (without torch), finding the shards in
checkpoint_files.py, reading them lazily with the other readers in checkpoint.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from finetune import ranks
from finetune.architecture import LLAMA2_ROPE_THETA, meta_ffn_dim
from finetune.checkpoint_files import PARAMS_FILE, shard_name
from finetune.config import ModelConfig
from finetune.distributed import full_tensor
from finetune.errors import UserError
from finetune.model import Llama

# Present in Meta's files but not a parameter: the rotary frequencies, recomputed at run time.
NOT_PARAMETERS = frozenset({"rope.freqs"})

_TOP_LEVEL_KEYS = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Model-parallel slicing, by module: column-parallel layers are split along their output rows
# (dim 0), row-parallel ones along their input columns (dim 1), the embedding along its embedding
# dimension (dim 1). Modules not listed (the norms) are replicated in every shard.
SPLIT_DIMS = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}
_ROTARY_MODULES = frozenset({"wq", "wk"})


def meta_key(name: str) -> str:
    """Meta's key for one of finetune's parameter names, e.g. `layers.0.attention.wq.weight`."""
    if name in _TOP_LEVEL_KEYS:
        return _TOP_LEVEL_KEYS[name]
    _, layer, part = name.split(".", 2)
    return f"layers.{layer}.{_LAYER_KEYS[part]}"


def _module(key: str) -> str:
    return key.split(".")[-2]


def split_dim(key: str) -> int | None:
    """The dimension along which Meta's shards slice the tensor `key`; None if replicated."""
    return SPLIT_DIMS.get(_module(key))


def is_rotary(key: str) -> bool:
    """Whether the rows of `key` (wq, wk) are ordered for Meta's rotary embedding."""
    return _module(key) in _ROTARY_MODULES


def halves_from_pairs(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """wq/wk rows from Meta's order to ours: in each head, the even rows, then the odd ones.

    Rows 2i and 2i+1 (a rotary pair for Meta) become rows i and i + head_dim/2 (ours).
    """
    heads = weight.shape[0] // head_dim
    # (heads, pair, 2, in) -> (heads, 2, pair, in)
    return weight.reshape(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def pairs_from_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `halves_from_pairs`: interleave the two halves of each head's rows."""
    heads = weight.shape[0] // head_dim
    # (heads, 2, pair, in) -> (heads, pair, 2, in)
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# Shards (read lazily in checkpoint.py)
# --------------------------------------------------------------------------------------------


def check_same_keys(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> None:
    """Every model-parallel shard holds a slice (or a copy) of every tensor."""
    first = shards[0].keys()
    for file, shard in zip(files[1:], shards[1:], strict=True):
        if lacking := sorted(first - shard.keys()):
            raise UserError(f"{file}: missing {lacking[0]!r}, which {files[0].name} has")
        if extra := sorted(shard.keys() - first):
            raise UserError(f"{file}: unexpected key {extra[0]!r}, which {files[0].name} lacks")


def meta_slice_shape(
    file: Path, key: str, shape: torch.Size, dim: int, n_slices: int, head_dim: int
) -> torch.Size:
    """The shape of each of the `n_slices` slices of `key` (whole shape `shape`) along `dim`.

    wq and wk slices must hold whole heads, as Meta's reference code gives each rank its heads.
    """
    sizes = list(shape)
    sizes[dim] //= n_slices
    if shape[dim] % n_slices or (is_rotary(key) and sizes[0] % head_dim):
        raise UserError(
            f"{file}: {key} of shape {tuple(shape)} cannot be split into {n_slices} "
            f"model-parallel slices of whole heads; is a shard missing or extra?"
        )
    return torch.Size(sizes)


# --------------------------------------------------------------------------------------------
# params.json
# --------------------------------------------------------------------------------------------


def ffn_params(dim: int, ffn_dim: int) -> dict[str, int | float]:
    """`multiple_of`, and `ffn_dim_multiplier` if needed, for which `meta_ffn_dim` gives ffn_dim."""
    # Llama-2's 7B and 13B use multiple_of=256 without a multiplier. Other widths get the largest
    # power of two dividing them, to which a formula result a little below ffn_dim rounds up.
    largest_power_of_two = ffn_dim & -ffn_dim
    for multiple_of in (256, largest_power_of_two):
        if meta_ffn_dim(dim, multiple_of, None) == ffn_dim:
            return {"multiple_of": multiple_of}
    multiple_of = largest_power_of_two
    multiplier = ffn_dim / int(2 * 4 * dim / 3)
    if meta_ffn_dim(dim, multiple_of, multiplier) != ffn_dim:  # the product rounded down by one
        multiplier = math.nextafter(multiplier, math.inf)
    return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}


def params_json(cfg: ModelConfig) -> dict[str, int | float]:
    """params.json for `cfg`, with the real vocabulary size."""
    params: dict[str, int | float] = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        **ffn_params(cfg.dim, cfg.ffn_dim),
        "norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.rope_theta != LLAMA2_ROPE_THETA:
        params["rope_theta"] = cfg.rope_theta
    return params


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def rope_freqs(cfg: ModelConfig) -> torch.Tensor:
    """The `rope.freqs` buffer Meta's files carry: each rotary pair's inverse frequency."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
    return 1.0 / (cfg.rope_theta**exponents)


def meta_state_dict(model: Llama, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under Meta's names and in Meta's rotary layout, on the CPU in `dtype`."""
    state = {}
    for name, tensor in model.state_dict().items():
        key = meta_key(name)
        tensor = full_tensor(tensor).detach().to(device="cpu", dtype=dtype)
        if is_rotary(key):
            tensor = pairs_from_halves(tensor, model.cfg.head_dim)
        state[key] = tensor
    state["rope.freqs"] = rope_freqs(model.cfg).to(dtype)
    return state


def split_into_shards(
    state: dict[str, torch.Tensor], n_shards: int
) -> list[dict[str, torch.Tensor]]:
    """Meta's N model-parallel files: shard i has slice i of every split tensor, and every
    replicated one whole."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, tensor in state.items():
        dim = split_dim(key)
        pieces = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim=dim)
        if len(pieces) != n_shards or any(p.shape != pieces[0].shape for p in pieces):
            raise UserError(f"{key} of shape {tuple(tensor.shape)} does not split {n_shards} ways")
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece
    return shards


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in a storage of its own: torch.save writes whole storages, so a slice of a larger
    one would carry the rest of it into the file."""
    own_bytes = tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == own_bytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def save_meta(
    model: Llama, out_dir: Path, tokenizer: Path, dtype: torch.dtype, *, n_shards: int = 1
) -> None:
    """Write `model` as Meta's reference code loads it: params.json, consolidated.NN.pth and the
    tokenizer; `n_shards` files for that many model-parallel ranks."""
    if model.cfg.n_kv_heads % n_shards:
        # Meta's reference code gives each rank whole heads, key/value heads included.
        raise UserError(f"n_shards={n_shards} does not divide n_kv_heads={model.cfg.n_kv_heads}")
    # Meta's files each hold a slice of every weight: a sharded model is gathered whole to the
    # process that writes (every process must call this).
    state = meta_state_dict(model, dtype)
    if not ranks.writes_files():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(split_into_shards(state, n_shards)):
        # Through a file object: a failed write then surfaces as its OSError (see write_error).
        with (out_dir / shard_name(index)).open("wb") as f:
            torch.save({key: _compact(t) for key, t in shard.items()}, f)
    (out_dir / PARAMS_FILE).write_text(json.dumps(params_json(model.cfg), indent=2) + "\n")
    # Meta ships tokenizer.model; a tokenizer.json (not Meta's format) keeps its own name.
    target = out_dir / ("tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model")
    if tokenizer.resolve() != target.resolve():
        shutil.copyfile(tokenizer, target)
