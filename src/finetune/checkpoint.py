"""Hugging Face checkpoint directories: `config.json` + safetensors, read lazily, written sharded.

A Hugging Face `LlamaForCausalLM` state dict is finetune's own with `model.` in front of every key
but `lm_head.weight` (see model.py), so loading and saving are a rename.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finetune.config import ModelConfig
from finetune.errors import UserError
from finetune.model import Llama

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# ModelConfig field -> Hugging Face LlamaConfig key.
HF_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "context_length": "max_position_embeddings",
}


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
        "tie_word_embeddings": False,
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
) -> None:
    """Write `model` as a Hugging Face checkpoint that transformers and vLLM load as they are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        hf_key(name): t.detach().to(device="cpu", dtype=dtype).contiguous()
        for name, t in model.state_dict().items()
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


def load_hf(cfg: ModelConfig, ckpt_dir: Path, device: torch.device, dtype: torch.dtype) -> Llama:
    """Build the model on the meta device and fill it straight from the memory-mapped files."""
    check_architecture(cfg, ckpt_dir)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {hf_key(name): p for name, p in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(ckpt_dir):
        try:
            state.update(_read_safetensors(file, expected, device, dtype))
        except SafetensorError as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - {hf_key(k) for k in state})
    if missing:
        raise UserError(f"{ckpt_dir}: missing {len(missing)} weights, e.g. {missing[0]!r}")
    model.load_state_dict(state, assign=True)
    return model


def _read_safetensors(
    file: Path, expected: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors of one file under finetune's names, each checked and cast as it is read."""
    state = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key not in expected:
                raise UserError(f"{file}: unexpected key {key!r} for a Llama model")
            tensor = f.get_tensor(key)
            if tensor.shape != expected[key].shape:
                raise UserError(
                    f"{file}: {key} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[key].shape)}"
                )
            state[key.removeprefix("model.")] = tensor.to(device=device, dtype=dtype)
    return state


def _safetensors_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise UserError(f"{file}: missing, but {index.name} lists it")
        return files
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{ckpt_dir}: no model.safetensors or {SAFETENSORS_INDEX}")


def check_architecture(cfg: ModelConfig, ckpt_dir: Path) -> None:
    """The checkpoint's config.json must describe the architecture the run was configured with."""
    path = ckpt_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{ckpt_dir}: no config.json (expected a Hugging Face checkpoint)")
    found = json.loads(path.read_text())
    # transformers 5 keeps the RoPE base inside `rope_parameters`.
    found.setdefault("rope_theta", (found.get("rope_parameters") or {}).get("rope_theta"))
    for ours, hf in HF_CONFIG_KEYS.items():
        value, expected = found.get(hf), getattr(cfg, ours)
        # Absent means the library default; a different context length is a setting, not a
        # different model.
        if value is None or ours == "context_length":
            continue
        if value != expected:
            raise UserError(
                f"{path}: {hf}={value} but model.{ours}={expected}; "
                f"pick the model= option that matches the checkpoint"
            )
