"""The architecture a checkpoint directory describes, read without torch.

The run's architecture comes from the checkpoint: `resolve_architecture` fills every field the
`model=` option left at its null value (0, 0.0, False) from `config.json` (Hugging Face) or
`params.json` (Meta), and checks every field it did set against them. What finetune's Llama
cannot compute exactly (another activation, biases, scaled or windowed attention) is refused here,
before anything is loaded. config.py calls this while validating the params, so it imports no
torch; checkpoint_files.py tells the directory's format and files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.checkpoint_files import CheckpointFormat, find_checkpoint
from finetune.errors import ConfigError, UserError

if TYPE_CHECKING:  # config.py imports this module
    from finetune.config import ModelConfig


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
    "tie_word_embeddings": "tie_word_embeddings",
}
# What transformers' LlamaConfig assumes for a key config.json leaves out (num_key_value_heads:
# num_attention_heads), so an absent key means what it means to transformers.
HF_DEFAULTS = {
    "vocab_size": 32000,
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "ffn_dim": 11008,
    "norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "context_length": 2048,
    "tie_word_embeddings": False,
}
# config.json's dtype names finetune can write back (`output_dtype=auto`).
STORED_DTYPES = ("float32", "bfloat16", "float16")

# Llama-2's reference code hard-codes this RoPE base; params.json names it only when it differs.
LLAMA2_ROPE_THETA = 10000.0
# Meta's params.json has no context length: Llama-2's reference code takes it as an argument, and
# Llama-2 was pretrained on sequences of 4096 tokens.
LLAMA2_CONTEXT_LENGTH = 4096
# params.json keys finetune reads; any other may change the computation, so it is refused.
META_KEYS = frozenset(
    {
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "multiple_of",
        "ffn_dim_multiplier",
        "norm_eps",
        "rope_theta",
        "use_scaled_rope",
    }
)


def read_json_object(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(found).__name__}")
    return found


# --------------------------------------------------------------------------------------------
# The architecture a checkpoint describes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointArchitecture:
    """ModelConfig's fields as a checkpoint's config.json or params.json gives them."""

    path: Path  # config.json or params.json
    values: dict[str, object]  # ModelConfig field -> value; vocab_size 0: the tokenizer's
    described: dict[str, str]  # ModelConfig field -> what the file says, e.g. "hidden_size=64"
    stored_dtype: str = ""  # config.json's torch_dtype (or dtype), "" if it names none
    sliding_window: int | None = None


def read_architecture(ckpt_dir: Path) -> CheckpointArchitecture:
    """The architecture of the checkpoint in `ckpt_dir`; refuses what finetune cannot compute."""
    found = find_checkpoint(ckpt_dir)
    if found.format is CheckpointFormat.meta:
        return meta_architecture(found.config)
    return hf_architecture(found.config)


def hf_architecture(path: Path) -> CheckpointArchitecture:
    config = read_json_object(path)
    _refuse_what_llama_does_not_compute(path, config)
    # transformers 5 keeps the RoPE base inside `rope_parameters`.
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta"))
    values, described = {}, {}
    for ours, key in HF_CONFIG_KEYS.items():
        value = config.get(key)
        if value is None and ours == "n_kv_heads":
            value = values["n_heads"]
            described[ours] = f"{key} absent (= num_attention_heads={value})"
        elif value is None:
            value = HF_DEFAULTS[ours]
            described[ours] = f"{key} absent (transformers' default {value})"
        else:
            described[ours] = f"{key}={json.dumps(value) if isinstance(value, bool) else value}"
        values[ours] = _checked_value(path, key, value, type(HF_DEFAULTS.get(ours, 0)))
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * values["n_heads"] != values["dim"]:
        raise UserError(
            f"{path}: head_dim={head_dim} is not supported: finetune's heads are "
            f"hidden_size / num_attention_heads = {values['dim'] / values['n_heads']:g} wide"
        )
    # transformers 5 writes `dtype`; earlier versions (and finetune) `torch_dtype`.
    dtype_key = "torch_dtype" if config.get("torch_dtype") else "dtype"
    stored_dtype = config.get(dtype_key) or ""
    if stored_dtype and stored_dtype not in STORED_DTYPES:
        raise UserError(
            f"{path}: {dtype_key}={stored_dtype!r}, expected one of {', '.join(STORED_DTYPES)}"
        )
    return CheckpointArchitecture(
        path, values, described, stored_dtype, config.get("sliding_window")
    )


def _refuse_what_llama_does_not_compute(path: Path, config: dict) -> None:
    """config.json keys whose values would make transformers compute another model than ours."""
    unsupported = {
        "model_type": ("llama", "finetune computes Llama models (model_type llama) only"),
        "hidden_act": ("silu", "finetune's feed-forward is SwiGLU (hidden_act silu)"),
        "attention_bias": (False, "finetune's attention projections have no biases"),
        "mlp_bias": (False, "finetune's feed-forward projections have no biases"),
    }
    for key, (supported, why) in unsupported.items():
        if config.get(key, supported) != supported:
            raise UserError(f"{path}: {key}={json.dumps(config[key])} is not supported: {why}")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    if scaling:
        raise UserError(
            f"{path}: rope_scaling={json.dumps(scaling)} is not supported: finetune trains with "
            "Llama-2's unscaled rotary embeddings"
        )


def _checked_value(path: Path, key: str, value: object, kind: type) -> object:
    """`value` as a `kind` (int, float or bool), or a UserError naming the key."""
    expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise UserError(f"{path}: {key} is {json.dumps(value)}, expected {expected}")
    return kind(value)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The feed-forward width Meta's reference code builds from params.json."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def meta_architecture(path: Path) -> CheckpointArchitecture:
    params = read_json_object(path)
    for key in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps"):
        if not isinstance(params.get(key), (int, float)):
            raise UserError(f"{path}: {key} is {params.get(key)!r}, expected a number")
    if unknown := sorted(params.keys() - META_KEYS):
        raise UserError(
            f"{path}: {unknown[0]}={json.dumps(params[unknown[0]])} is not supported: finetune "
            f"reads only {', '.join(sorted(META_KEYS))}"
        )
    if params.get("use_scaled_rope"):
        raise UserError(
            f"{path}: use_scaled_rope=true is not supported: finetune trains with Llama-2's "
            "unscaled rotary embeddings"
        )
    described = {name: f"{name}={params[name]}" for name in ("dim", "n_layers", "n_heads")}
    values = {name: params[name] for name in ("dim", "n_layers", "n_heads")}
    values["n_kv_heads"] = params.get("n_kv_heads", params["n_heads"])
    described["n_kv_heads"] = (
        f"n_kv_heads={params['n_kv_heads']}"
        if "n_kv_heads" in params
        else f"n_kv_heads absent (= n_heads={params['n_heads']})"
    )
    multiplier = params.get("ffn_dim_multiplier")
    values["ffn_dim"] = meta_ffn_dim(params["dim"], params["multiple_of"], multiplier)
    described["ffn_dim"] = (
        f"multiple_of={params['multiple_of']}, ffn_dim_multiplier={multiplier} "
        f"(feed-forward width {values['ffn_dim']})"
    )
    values["norm_eps"] = params["norm_eps"]
    described["norm_eps"] = f"norm_eps={params['norm_eps']}"
    values["rope_theta"] = params.get("rope_theta", LLAMA2_ROPE_THETA)
    described["rope_theta"] = f"rope_theta={values['rope_theta']}"
    # -1 leaves the vocabulary to the tokenizer: 0 here, filled in where the tokenizer is read.
    vocab_size = params.get("vocab_size", -1)
    values["vocab_size"] = 0 if vocab_size == -1 else vocab_size
    described["vocab_size"] = f"vocab_size={vocab_size}"
    values["context_length"] = LLAMA2_CONTEXT_LENGTH
    described["context_length"] = (
        f"context length {LLAMA2_CONTEXT_LENGTH} (Llama-2's; params.json names none)"
    )
    # Meta's reference code has a separate output layer: its checkpoints are never tied.
    values["tie_word_embeddings"] = False
    described["tie_word_embeddings"] = "a separate output.weight"
    values = {
        name: _checked_value(path, name, value, type(HF_DEFAULTS.get(name, 0)))
        for name, value in values.items()
    }
    return CheckpointArchitecture(path, values, described)


# --------------------------------------------------------------------------------------------
# The run's architecture
# --------------------------------------------------------------------------------------------


def resolve_architecture(
    cfg: ModelConfig, ckpt_dir: Path, *, max_seq_len: int, extend_context: bool
) -> ModelConfig:
    """`cfg` with every field left at its null value taken from the checkpoint in `ckpt_dir`;
    a field it sets must be the checkpoint's (the context length may grow with
    `extend_context`)."""
    arch = read_architecture(ckpt_dir)
    _check_fields(cfg, arch, only_set=True)
    ours, theirs = cfg.context_length, arch.values["context_length"]
    if ours > theirs and not extend_context:
        raise ConfigError(
            "model.context_length",
            f"{ours} is longer than the checkpoint's {arch.described['context_length']} "
            f"({arch.path}); set extend_context=true to train beyond it",
        )
    if arch.sliding_window is not None and arch.sliding_window < max_seq_len:
        raise UserError(
            f"{arch.path}: sliding_window={arch.sliding_window} is not supported below "
            f"max_seq_len={max_seq_len}: finetune attends to the whole sequence; "
            f"set max_seq_len<={arch.sliding_window}"
        )
    filled = {
        name: value for name, value in arch.values.items() if not _is_set(cfg, name, every=False)
    }
    return dataclasses.replace(cfg, **filled)


def check_architecture(cfg: ModelConfig, ckpt_dir: Path) -> None:
    """The checkpoint in `ckpt_dir` must describe the architecture `cfg`, every field of it
    (the context length may be longer: see `resolve_architecture`)."""
    _check_fields(cfg, read_architecture(ckpt_dir), only_set=False)


def _is_set(cfg: ModelConfig, name: str, every: bool) -> bool:
    """Whether `cfg` gives field `name` rather than leave it to the checkpoint: a non-null value;
    a named `model=` option gives every field, False included."""
    return every or bool(getattr(cfg, name)) or (bool(cfg.name) and name == "tie_word_embeddings")


def _check_fields(cfg: ModelConfig, arch: CheckpointArchitecture, only_set: bool) -> None:
    for name, theirs in arch.values.items():
        ours = getattr(cfg, name)
        # vocab_size 0 is the tokenizer's (Meta); its embedding's shape is checked when read.
        # The context length is a setting of the run, checked with its params (a longer one
        # needs extend_context), not a property of the weights.
        if not _is_set(cfg, name, every=not only_set) or (name == "vocab_size" and not theirs):
            continue
        if ours == theirs or (name == "context_length" and (ours > theirs or not only_set)):
            continue
        if cfg.name:
            raise UserError(
                f"{arch.path}: {arch.described[name]} but model={cfg.name} has "
                f"model.{name}={ours}; leave out model= (or model=auto) to take the "
                "checkpoint's architecture"
            )
        raise UserError(
            f"{arch.path}: {arch.described[name]} but model.{name}={ours}; leave "
            f"model.{name} out to take the checkpoint's"
        )
