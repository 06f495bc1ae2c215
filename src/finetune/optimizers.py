"""The optimizers a run can use, all AdamW (`optimizer=`): with its state in fp32, in 8 bits, or in
CPU memory beside a model on a GPU; stepped once per step, or per weight during backward
(`optimizer_in_backward=true`).

Memory per trained weight, besides the weight itself (4 bytes): fp32 AdamW keeps a gradient (4)
and two moments (8); adamw8bit keeps the moments in 8 bits with one fp32 scale per 256 values
(~2.03); adamw_offload keeps the moments, an fp32 copy of the weight and one of its gradient in
CPU memory; in-backward keeps one weight's gradient at a time instead of all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch

from finetune.errors import ConfigError, UserError
from finetune.qlora import quiet_loggers

OPTIM_EXTRA = "pip install 'finetune[optim]'"

# (parameter groups) -> an optimizer over them.
NewOptimizer = Callable[[list[dict]], torch.optim.Optimizer]


def optimizer_class(kind: str) -> NewOptimizer:
    """The optimizer `optimizer=<kind>` names, made over parameter groups."""
    if kind == "adamw":
        # The fused kernel is one pass over the parameters; on the CPU it is ~8x faster than the
        # default multi-tensor AdamW.
        return lambda groups: torch.optim.AdamW(groups, fused=True)
    optim = _import_torchao_optim(kind)
    if kind == "adamw8bit":
        # Tensors under 4096 values (norm weights) keep fp32 moments: torchao's choice, as
        # bitsandbytes', since their scales would cost as much as they save.
        return optim.AdamW8bit
    # Weights under 4096 values stay on the GPU with their own AdamW: one transfer each would
    # cost more than their update.
    return lambda groups: optim.CPUOffloadOptimizer(groups, torch.optim.AdamW, fused=True)


def _import_torchao_optim(kind: str) -> ModuleType:
    """torchao's optimizers, imported only when asked for: an optional dependency."""
    try:
        # A CPU build of torch makes torchao's import log warnings about CUDA kernels it could not
        # load; the optimizers need none of them.
        with quiet_loggers("torchao", "torch.utils._pytree"):
            import torchao.optim
    except ImportError as e:
        raise UserError(f"optimizer={kind} needs torchao ({e}): {OPTIM_EXTRA}") from None
    return torchao.optim


def check_offload_device(parameters: list[torch.Tensor]) -> None:
    """adamw_offload moves the optimizer's work off a GPU; a model on the CPU has none to move."""
    devices = sorted({p.device.type for p in parameters})
    if devices != ["cuda"]:
        raise ConfigError(
            "optimizer",
            f"adamw_offload moves the optimizer state off a GPU into CPU memory, but the model "
            f"is on the {'/'.join(devices)}: use optimizer=adamw (or adamw8bit) there",
        )


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per trainable weight, stepped by a hook as soon as backward has accumulated
    that weight's gradient, which it then frees: at most one weight's gradient lives at a time
    (the autograd buffers of the backward in flight aside).

    Its parameter groups are the per-weight optimizers' own groups (the same dicts), so the LR
    scheduler sets every one's learning rate. `step()` does no update (each was applied during
    backward); it closes the step, for `grad_norm_and_finite` to report it. A weight whose
    gradient is not finite is not updated (and the step is reported as not finite).
    """

    def __init__(self, groups: list[dict], new_optimizer: NewOptimizer) -> None:
        self.per_weight = {
            p: new_optimizer([{**group, "params": [p]}])
            for group in groups
            for p in group["params"]
        }
        super().__init__(self._shared_groups(), {})
        self._square_sum = torch.zeros((), dtype=torch.float64)
        self._all_finite = True
        for p, optimizer in self.per_weight.items():
            p.register_post_accumulate_grad_hook(self._update)
            # Loading a checkpoint gives an optimizer new group dicts: share those instead.
            optimizer.register_load_state_dict_post_hook(self._share_groups_again)

    def _shared_groups(self) -> list[dict]:
        return [g for optimizer in self.per_weight.values() for g in optimizer.param_groups]

    def _share_groups_again(self, _: torch.optim.Optimizer) -> None:
        self.param_groups = self._shared_groups()

    @torch.no_grad()
    def _update(self, weight: torch.Tensor) -> None:
        # A norm reduces in place; squaring the gradient first would briefly double it, at the
        # moment memory peaks (the output layer's gradient comes first, beside every activation).
        norm = torch.linalg.vector_norm(weight.grad, dtype=torch.float32)
        if torch.isfinite(norm):
            self.per_weight[weight].step()
        else:
            self._all_finite = False
        self._square_sum += norm.to(self._square_sum) ** 2
        weight.grad = None

    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        """Nothing to update: backward did. (Called so that the LR scheduler sees a step.)"""

    def grad_norm_and_finite(self) -> tuple[float, bool]:
        """The norm of the step's whole gradient, summed weight by weight as backward freed it,
        and whether every part was finite; resets both for the next step."""
        norm, finite = math.sqrt(float(self._square_sum)), self._all_finite
        self._square_sum.zero_()
        self._all_finite = True
        return norm, finite


def build(kind: str, groups: list[dict], in_backward: bool) -> torch.optim.Optimizer:
    """The optimizer of `optimizer=<kind>` over `groups`, per weight when `in_backward`."""
    if kind == "adamw_offload":
        check_offload_device([p for group in groups for p in group["params"]])
    new_optimizer = optimizer_class(kind)
    if in_backward:
        return OptimizerInBackward(groups, new_optimizer)
    return new_optimizer(groups)


def state_holders(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers whose state a training-state checkpoint saves and loads, by weight name."""
    if isinstance(optimizer, OptimizerInBackward):
        return list(optimizer.per_weight.values())
    # Known by name: torchao is imported only by the runs that use it.
    if type(optimizer).__name__ == "CPUOffloadOptimizer":
        # Its per-weight optimizers hold CPU copies of the weights, which no weight name maps to.
        raise ConfigError(
            "optimizer",
            "adamw_offload's state is not saved in training-state checkpoints; this run "
            "stopped without one",
        )
    return [optimizer]
