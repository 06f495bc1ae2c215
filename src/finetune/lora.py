"""LoRA and DoRA adapters on the Llama's linear layers, saved in PEFT's adapter format.

LoRA (Hu et al., 2021) trains a low-rank update beside each frozen weight: y = W x + s·B A x with
A (rank, in), B (out, rank) and s = alpha / rank. DoRA (Liu et al., 2024) also trains a magnitude
m per output row and rescales each row of W + s·B A to it. Only the adapter tensors train.

`save_adapter` writes the directory `peft.PeftModel.from_pretrained` loads onto the
Hugging Face base model (`adapter_config.json` + `adapter_model.safetensors`), and our forward
computes what PEFT's does, so an adapter trained here gives the same logits there.

QLoRA (Dettmers et al., 2023; `lora.quantize_base`) keeps the frozen linear weights of the
transformer blocks in 4-bit NormalFloat (torchao's `NF4Tensor`) and dequantizes one layer at a time
in the forward and backward passes; the adapters are unchanged, so the adapter files are the same.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from finetune.checkpoint import hf_key
from finetune.config import LoraConfig
from finetune.errors import UserError
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
# torchao's NF4 defaults, the QLoRA paper's: one absmax scale per 64 weights, and those scales
# quantized again to int8 in groups of 256 ("double quantization"): ~4.13 bits per weight.
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
QLORA_EXTRA = "pip install 'finetune[qlora]'"


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer whose weight is an `NF4Tensor` (QLoRA's 4-bit base).

    `weight` keeps the shape and dtype of the dense weight it replaced; dequantizing gives that
    dtype back. Only one layer's dense weight exists at a time: the forward dequantizes it for its
    matmul and drops it, and the backward dequantizes it again (see `_NF4Matmul`).
    """

    bias = None  # as nn.Linear's, for code that checks it

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dtype nn.Linear would compute in: autocast's, else the input's.
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = x.dtype
        return _NF4Matmul.apply(x.to(dtype), self.weight)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight, in the original dtype unless `dtype` is given."""
        weight = self.weight.get_original_weight()
        return weight if dtype is None else weight.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4"


class _NF4Matmul(torch.autograd.Function):
    """x @ dequantize(W).T with W kept in NF4 for the backward pass.

    F.linear on the dequantized weight would save that dense copy for backward, so by the end of
    the forward pass every layer's would be alive at once, undoing the 4-bit saving. This saves the
    NF4 weight instead and dequantizes it again in backward: one more dequantization per layer.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,  # (..., in), already in the compute dtype
        weight: torch.Tensor,  # NF4 (out, in)
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.get_original_weight().to(x.dtype))

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (weight,) = ctx.saved_tensors
        # The base is frozen: only the input's gradient, (..., out) @ (out, in).
        return grad_out @ weight.get_original_weight().to(grad_out.dtype), None


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or `NF4Linear` (`base`) plus a trainable low-rank update, optionally
    DoRA.

    The adapter tensors are always fp32, whatever the base's dtype: they are what the optimizer
    updates, and bf16 would round most fine-tuning steps away (see `training.autocast`). A bf16
    base is fine because it never changes.
    """

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        rank: int,
        alpha: float,
        dropout: float,
        use_dora: bool,
    ) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear supports bias-free linear layers only (as in Llama)")
        base.weight.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.use_dora = use_dora
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.Linear(
            base.in_features, rank, bias=False, device=device, dtype=torch.float32
        )
        self.lora_B = nn.Linear(
            rank, base.out_features, bias=False, device=device, dtype=torch.float32
        )
        # PEFT's default: A Kaiming-uniform as nn.Linear initialises itself, B zero, so a fresh
        # adapter changes nothing.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            # m starts at ‖W + s·B A‖ = ‖W‖ per output row, so a fresh DoRA adapter is the identity.
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        drops = self.training and self.dropout.p > 0
        dropped = self.dropout(x) if drops else x
        lora_out = self.lora_B(self.lora_A(self._adapter_input(dropped))) * self.scaling
        if not self.use_dora:
            return (base_out + lora_out).to(base_out.dtype)
        # DoRA as PEFT computes it: y = W x + (m/‖W + s·BA‖ - 1)·W x' + m/‖W + s·BA‖·s·BA x', where
        # x' is the dropped-out input. Without dropout this is (m/‖·‖)·(W + s·BA) x, the merged
        # weight's output. The norm is a constant to autograd (DoRA paper, section 4.3), which
        # saves differentiating through it; m still gets its gradient through the division.
        scale = self.lora_magnitude_vector / self.weight_norm()  # (out,)
        base_on_dropped = self.base(dropped) if drops else base_out
        dora_out = base_out + (scale - 1) * base_on_dropped + scale * lora_out
        return dora_out.to(base_out.dtype)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """Under autocast the matmuls cast their inputs themselves; without it a bf16 activation
        must become fp32 to meet the fp32 adapter weights."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.lora_A.weight.dtype)

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B A‖ of every output row, (out,) fp32, outside autograd.

        Computed in fp32 whatever the base dtype or autocast: a bf16 norm would be off by up to
        0.4 %, and the norm divides the magnitude.
        """
        device_type = self.base.weight.device.type
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            return torch.linalg.vector_norm(self.merged_weight(torch.float32), dim=1)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen W as a dense (out, in) tensor (an NF4 base dequantized), cast to `dtype`."""
        if isinstance(self.base, NF4Linear):
            return self.base.dequantized(dtype)
        weight = self.base.weight
        return weight if dtype is None else weight.to(dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + s·B A, (out, in), differentiable in A and B; not DoRA-rescaled."""
        w, b, a = self.base_weight(dtype), self.lora_B.weight, self.lora_A.weight
        if dtype is not None:
            b, a = b.to(dtype), a.to(dtype)
        return w + self.scaling * (b @ a)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight this layer applies when dropout is off: W + s·B A, or for DoRA
        m/‖W + s·B A‖ · (W + s·B A) per row. Differentiable in the adapter tensors.

        Without `dtype` it follows the surrounding autocast (a bf16 base under bf16 autocast gives
        a bf16 weight, no fp32 copy of the base); `merge` asks for fp32.
        """
        weight = self.merged_weight(dtype)
        if not self.use_dora:
            return weight
        scale = self.lora_magnitude_vector / self.weight_norm()
        return weight * scale.to(weight.dtype)[:, None]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors under their names inside this module (PEFT's names)."""
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, use_dora={self.use_dora}"


def apply_lora(model: Llama, cfg: LoraConfig) -> None:
    """Wrap every linear layer named in `cfg.targets` (e.g. every layer's `q_proj`) in a
    `LoRALinear`, in place, and freeze everything but the adapters; with `cfg.quantize_base`,
    quantize the blocks' linear layers to NF4 first."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    if model.cfg.tie_word_embeddings and "lm_head" in cfg.targets:
        # LoraFinetuneParams refuses this; merging would write the update into the embedding.
        raise ValueError("lm_head is tied to the embedding: it cannot take an adapter")
    model.requires_grad_(False)
    if cfg.quantize_base:
        quantize_base_weights(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, NF4Linear)) and name.rpartition(".")[2] in cfg.targets:
            wrapped = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_dora)
            model.set_submodule(name, wrapped)


def quantize_base_weights(model: Llama) -> None:
    """Replace every linear layer of the transformer blocks by an `NF4Linear`, in place, one at a
    time so that the dense weight is freed as its NF4 copy takes its place.

    The embedding and lm_head stay dense, as in QLoRA (and transformers' bitsandbytes loading):
    they are a few percent of a Llama's weights, quantization hurts the output layer most, and the
    chunked loss multiplies by lm_head's weight directly (`Llama.output_weight`), which would
    otherwise need dequantizing whole for every micro-batch.
    """
    to_nf4 = _import_to_nf4()
    # Names, not modules: a list of the modules would keep every dense weight alive to the end.
    names = [n for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
    for name in names:
        quantized = _quantize(model.get_submodule(name), name, to_nf4)
        model.set_submodule(name, NF4Linear(quantized))


def _quantize(linear: nn.Linear, name: str, to_nf4: Callable) -> torch.Tensor:
    if linear.bias is not None:
        raise ValueError(f"{name}: NF4Linear supports bias-free linear layers only (as in Llama)")
    # Whole blocks, and whole groups of block scales, are all torchao's NF4 takes. Every Llama's
    # sizes are multiples; only toy models' may not be.
    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    if linear.weight.numel() % group:
        raise UserError(
            f"lora.quantize_base: {name} has {linear.weight.numel()} weights "
            f"({linear.out_features}x{linear.in_features}), not a multiple of {group} "
            f"(NF4 blocks of {NF4_BLOCK_SIZE}, their scales in groups of {NF4_SCALER_BLOCK_SIZE})"
        )
    return to_nf4(linear.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


def _import_to_nf4() -> Callable:
    """torchao's `to_nf4`, imported only when asked for: it is an optional dependency, and
    importing it takes a second or two."""
    try:
        # A CPU build of torch makes torchao's import log warnings about CUDA kernels it could not
        # load and a deprecation meant for torchao's developers; NF4 needs neither.
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.quantization import to_nf4
    except ImportError as e:
        raise UserError(f"lora.quantize_base needs torchao ({e}): {QLORA_EXTRA}") from None
    return to_nf4


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Drop the named loggers' messages below ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model` by its module name (ours, e.g. `layers.0.self_attn.q_proj`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: Llama) -> None:
    """Fold every adapter into its base weight and put plain `nn.Linear` layers back, NF4 ones
    dequantized, so that the model's state dict is a normal Llama's (for `save_hf`). Merged in
    fp32, cast back to the base's dtype.

    A QLoRA model merges into its dequantized weights, the ones it was trained with: the merged
    model computes what the quantized one did, not what the adapter gives on the original base.
    """
    for name, module in lora_modules(model).items():
        model.set_submodule(name, _merged_linear(module))
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            model.set_submodule(name, _dense_linear(module.dequantized()))


def _merged_linear(module: LoRALinear) -> nn.Linear:
    base = module.base
    with torch.autocast(base.weight.device.type, enabled=False):
        merged = module.effective_weight(torch.float32)
    if isinstance(base, NF4Linear):
        return _dense_linear(merged.to(base.weight.dtype))
    base.weight.copy_(merged.to(base.weight.dtype))
    return base


def _dense_linear(weight: torch.Tensor) -> nn.Linear:
    """A frozen bias-free nn.Linear holding `weight` (out, in) itself."""
    out_features, in_features = weight.shape
    # On the meta device: nn.Linear would otherwise allocate and initialise a weight to discard.
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


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
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().cpu().contiguous() for k, t in adapter_state_dict(model).items()}
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
            param.copy_(tensors[key])


def _check_adapter_config(path: Path, module: LoRALinear, model: Llama) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found (expected a PEFT LoRA adapter directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
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
