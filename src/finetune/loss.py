"""The training loss: cross-entropy of the output layer, fused with it and computed in chunks."""

from __future__ import annotations

import torch

from finetune.data import IGNORE_INDEX

# Logits held at once by the chunked loss: 2**24 fp32 values are 64 MiB (2048 tokens at 8k vocab,
# 524 at Llama-2's 32k). A chunk's logits exist about twice over (the logits and their fp32
# log-probabilities), so this bounds the loss's own peak memory. Smaller chunks would save more,
# but under bf16 each chunk adds its (vocab, dim) weight gradient to the fp32 total in one more
# pass over it (the CPU has no bf16 matmul with an fp32 output to accumulate into).
LOGITS_PER_CHUNK = 2**24


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`, computed a chunk of tokens at a time.

    The gradients are computed in the forward pass, chunk by chunk, so neither the logits nor
    their gradient ever exist for all tokens at once; backward only scales them.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # (tokens, dim)
        weight: torch.Tensor,  # (vocab, dim)
        targets: torch.Tensor,  # (tokens,)
        chunk_size: int,
    ) -> torch.Tensor:
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)
                t = targets[start : start + chunk_size]
                # One fused pass from the (possibly bf16) logits to fp32 log-probabilities.
                log_probs = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
                loss -= log_probs.gather(1, t[:, None]).sum()
                if not (want_hidden_grad or want_weight_grad):
                    continue
                # d(sum of losses)/d(logits) = softmax - one_hot(target), built in place.
                grad_logits = log_probs.exp_()
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_logits @ w
                if grad_weight is None:
                    continue
                if grad_logits.dtype == grad_weight.dtype:  # fp32: no (vocab, dim) temporary
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    grad_weight += grad_logits.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: these tensors exist only to be returned once, and a copy of the
        # output layer's gradient would be another (vocab, dim) fp32 tensor at the memory peak.
        return (
            grad_hidden.mul_(grad_loss) if grad_hidden is not None else None,
            grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Sum over labelled positions of cross-entropy(hidden @ weight.T, targets).

    hidden: (..., dim) final hidden states; weight: (vocab, dim) the output layer; targets: (...)
    token ids or IGNORE_INDEX. Only labelled positions reach the output layer.
    """
    labelled = targets != IGNORE_INDEX
    chunk_size = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden[labelled], weight, targets[labelled], chunk_size)
