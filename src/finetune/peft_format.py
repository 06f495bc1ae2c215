"""PEFT's adapter format: the directory `peft.PeftModel.from_pretrained` loads onto the Hugging
Face base model (`adapter_config.json` + `adapter_model.safetensors`).

Our LoRA forward computes what PEFT's does (lora.py), so an adapter trained here gives the same
logits there, and an adapter PEFT wrote loads here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finetune import ranks
from finetune.config import LoraConfig
from finetune.distributed import full_tensor, local_part, shard_rows
from finetune.errors import UserError
from finetune.hf_format import hf_key
from finetune.lora import LoRALinear, lora_modules
from finetune.model import Llama

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's prefix: its PeftModel holds the task model as `base_model.model`.
PEFT_PREFIX = "base_model.model."
# PEFT saves lm_head's base weight beside an lm_head adapter (in case the vocabulary was resized);
# ours is the checkpoint's, so we neither write nor read it.
PEFT_LM_HEAD_BASE_WEIGHT = f"{PEFT_PREFIX}lm_head.base_layer.weight"
# What PEFT assumes when adapter_config.json leaves a key out.
PEFT_DEFAULTS = {"use_dora": False, "use_rslora": False}


def peft_module_name(name: str) -> str:
    """Our module name -> the module name in PEFT's adapter file.

    `hf_key` maps weight names (`lm_head.weight` is the one without the `model.` prefix), so ask
    it about the module's weight and drop the suffix again.
    """
    return PEFT_PREFIX + hf_key(f"{name}.weight").removesuffix(".weight")


def adapter_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names, e.g.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return {
        f"{peft_module_name(name)}.{key}": tensor
        for name, module in lora_modules(model).items()
        for key, tensor in module.adapter_parameters().items()
    }


@torch.no_grad()
def adapter_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """`adapter_state_dict` with each tensor whole: gathered from every process when the model is
    sharded, so every process must call it."""
    return {key: full_tensor(t) for key, t in adapter_state_dict(model).items()}


def adapter_targets(model: Llama) -> list[str]:
    """The target names (`q_proj`, `lm_head`, ...) that `model`'s adapters sit on, sorted."""
    return sorted({name.rpartition(".")[2] for name in lora_modules(model)})


def peft_adapter_config(base_model_name_or_path: str, cfg: LoraConfig) -> dict:
    """The adapter_config.json peft 0.21 loads; PEFT's defaults for the rest are what we do."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(set(cfg.targets)),
        "use_dora": cfg.use_dora,
        "bias": "none",
        # Stated rather than left to PEFT's defaults, because each changes what the tensors mean:
        # s = alpha / r (not alpha / sqrt(r)), weights stored (out, in), no trained biases.
        "use_rslora": False,
        "fan_in_fan_out": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(
    model: Llama, out_dir: Path, base_model_name_or_path: str, cfg: LoraConfig
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT does, the adapter
    tensors only (PEFT takes lm_head's base weight from the base model when the file lacks it)."""
    _check_model_has(model, cfg)
    tensors = {k: t.cpu().contiguous() for k, t in adapter_tensors(model).items()}
    if not ranks.writes_files():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = peft_adapter_config(base_model_name_or_path, cfg)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _check_model_has(model: Llama, cfg: LoraConfig) -> None:
    """The settings written to adapter_config.json must describe the tensors written beside it."""
    settings = {"rank": cfg.rank, "alpha": cfg.alpha, "use_dora": cfg.use_dora}
    for name, module in lora_modules(model).items():
        for setting, value in settings.items():
            if getattr(module, setting) != value:
                raise ValueError(f"{setting}={value!r} but {name} has {getattr(module, setting)!r}")
    if adapter_targets(model) != sorted(set(cfg.targets)):
        raise ValueError(
            f"targets={cfg.targets!r} but the adapters are on {adapter_targets(model)}"
        )


def load_adapter(model: Llama, adapter_dir: Path) -> None:
    """Read an adapter directory (ours or PEFT's) into a model `apply_lora` prepared with the
    same targets, rank, alpha and DoRA setting; anything else is a `UserError` naming the file
    and key. Dropout may differ: it does not change the tensors."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("apply_lora the model before loading an adapter into it")
    _check_adapter_config(adapter_dir / ADAPTER_CONFIG, next(iter(modules.values())), model)
    expected = adapter_state_dict(model)
    tensors = _read_adapter_tensors(adapter_dir / ADAPTER_WEIGHTS, expected)
    with torch.no_grad():
        for key, param in expected.items():
            local_part(param).copy_(tensors[key][shard_rows(param)])


def read_adapter_config(path: Path) -> dict:
    """An adapter_config.json as read; a missing or unreadable one is a `UserError`."""
    if not path.is_file():
        raise UserError(f"{path}: not found (expected a PEFT LoRA adapter directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _check_adapter_config(path: Path, module: LoRALinear, model: Llama) -> None:
    config = read_adapter_config(path)
    expected = {
        "peft_type": "LORA",
        "r": module.rank,
        "lora_alpha": module.alpha,
        "use_dora": module.use_dora,
        "target_modules": adapter_targets(model),
        # rsLoRA scales by alpha / sqrt(r): the same tensors would mean a different update.
        "use_rslora": False,
    }
    for key, want in expected.items():
        found = config.get(key, PEFT_DEFAULTS.get(key))
        if key == "target_modules" and isinstance(found, list):
            found = sorted(set(found))
        if found != want:
            raise UserError(
                f"{path}: {key} is {found!r} but this run's adapter has {want!r}; "
                "set lora.* to the adapter's settings"
            )


def _read_adapter_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: not found")
    tensors = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key == PEFT_LM_HEAD_BASE_WEIGHT:
                    continue
                if key not in expected:
                    raise UserError(f"{path}: unexpected key {key!r} for this run's adapters")
                tensor = f.get_tensor(key)
                if tensor.shape != expected[key].shape:
                    raise UserError(
                        f"{path}: {key} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(expected[key].shape)}"
                    )
                tensors[key] = tensor
    except SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"{path}: missing {len(missing)} adapter tensors, e.g. {missing[0]!r}")
    return tensors
