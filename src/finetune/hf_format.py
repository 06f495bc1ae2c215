"""Hugging Face's checkpoint format out: the directory transformers and vLLM load as it is.

A Hugging Face `LlamaForCausalLM` state dict is finetune's own with `model.` in front of every key
but `lm_head.weight` (see model.py), so the format is a rename, plus config.json,
generation_config.json and the tokenizer's files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune import ranks
from finetune.architecture import HF_CONFIG_KEYS
from finetune.checkpoint_files import SAFETENSORS_INDEX
from finetune.config import ModelConfig
from finetune.distributed import full_tensor
from finetune.model import Llama

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

    `chat_template` goes into tokenizer_config.json, replacing any the tokenizer brought: a
    model answers best in the format it was last trained on, not its base's. One
    safetensors file at a time is gathered and written, so a sharded model (every process calls
    this; rank 0 writes) is never whole on one process, and a model on one process is never
    copied whole into the output dtype.
    """
    writes = ranks.writes_files()
    state = {
        hf_key(name): t
        for name, t in model.state_dict().items()
        # transformers writes a tied model without lm_head.weight, and ties it when loading.
        if not (model.cfg.tie_word_embeddings and name == TIED_OUTPUT)
    }
    sizes = {key: t.numel() * dtype.itemsize for key, t in state.items()}
    shards = _split_into_shards(sizes, max_shard_bytes)
    files = ["model.safetensors"]
    if len(shards) > 1:
        files = [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
        ]
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
    for file, keys in zip(files, shards, strict=True):
        tensors = {key: _to_save(state[key], dtype) for key in keys}
        if writes:
            save_file(tensors, out_dir / file, metadata={"format": "pt"})
    if not writes:
        return
    if len(shards) > 1:
        weight_map = {key: file for file, keys in zip(files, shards, strict=True) for key in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
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


@torch.no_grad()
def _to_save(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` whole (gathered when sharded), on the CPU in `dtype`, contiguous."""
    return full_tensor(tensor).to(device="cpu", dtype=dtype).contiguous()


def _add_chat_template(path: Path, template: str) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    _write_json(path, config)


def _split_into_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """The keys of each file, in order, each file at most `max_shard_bytes` unless one tensor is
    larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
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
