"""LoRA and DoRA adapters on the Llama's linear layers: applied, trained, merged.

LoRA (Hu et al., 2021) trains a low-rank update beside each frozen weight: y = W x + s·B A x with
A (rank, in), B (out, rank) and s = alpha / rank. DoRA (Liu et al., 2024) also trains a magnitude
m per output row and rescales each row of W + s·B A to it. Only the adapter tensors train.

The forward computes what PEFT's does, so an adapter saved in PEFT's format (peft_format.py)
gives the same logits there. With `lora.quantize_base` the frozen base layers are QLoRA's 4-bit
ones (qlora.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune import ranks
from finetune.config import LoraConfig
from finetune.distributed import local_part, shard_rows
from finetune.model import Llama
from finetune.qlora import NF4Linear, quantize_base_weights


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
        # Made without values (nn.Linear's own initialisation would draw from the RNG), then
        # given them by `init_adapter` alone: one sequence of draws, whether the model is built
        # on one process or on the meta device and sharded.
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device="meta")
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device="meta")
        if use_dora:
            m = torch.empty(base.out_features, device="meta")
            self.lora_magnitude_vector = nn.Parameter(m)
        device = base.weight.device
        if device.type != "meta":  # a model built on meta is initialised once its base is loaded
            self.lora_A.to_empty(device=device)
            self.lora_B.to_empty(device=device)
            if use_dora:
                self.lora_magnitude_vector = nn.Parameter(torch.empty_like(m, device=device))
            self.init_adapter()

    @torch.no_grad()
    def init_adapter(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform as nn.Linear initialises itself, B zero, so a
        fresh adapter changes nothing; DoRA's m is then ‖W + s·B A‖ = ‖W‖ per output row.

        Works on a layer sharded across processes (distributed.shard_model) too: every process
        draws the whole A, from the same seed, and keeps its rows, so A is the same as on one
        process; B's and m's rows go with W's.
        """
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        local_part(self.lora_A.weight).copy_(a[shard_rows(self.lora_A.weight)])
        local_part(self.lora_B.weight).zero_()
        if self.use_dora:
            rows = local_part(self.base_weight(torch.float32))
            local_part(self.lora_magnitude_vector).copy_(torch.linalg.vector_norm(rows, dim=1))

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
        quantize_base_weights(model, ranks.world_size())
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, NF4Linear)) and name.rpartition(".")[2] in cfg.targets:
            wrapped = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_dora)
            model.set_submodule(name, wrapped)


def init_adapters(model: nn.Module) -> None:
    """Initialise every adapter of `model` (see `LoRALinear.init_adapter`), in module order."""
    for module in lora_modules(model).values():
        module.init_adapter()


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
