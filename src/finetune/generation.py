"""Generating token ids from a prompt: greedy or sampled, one token at a time through a KV cache.

`generate` yields each id as soon as it is chosen, so a caller can stream text while the model
continues. The prompt is run once (prefill); after that each step feeds only the newest token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from finetune.model import KVCache, Llama


@torch.inference_mode()
def generate(
    model: Llama,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt_ids` (batch 1), stopping after
    `eos_id`, which is yielded too, so a caller can tell a finished answer from a cut-off one.

    temperature 0 is greedy (top_k and top_p then do nothing); above 0, tokens are sampled from
    softmax(logits / temperature), restricted to the `top_k` most likely (0: all) and then to the
    smallest set whose probability reaches `top_p`. Sampling draws from `generator` (on the
    model's device) so that a seed reproduces the same tokens. The cache is in the model's dtype.
    """
    check_sampling(temperature, top_k, top_p)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    if prompt.numel() == 0:
        raise ValueError("generation needs a prompt of at least one token")
    total = prompt.numel() + max_new_tokens
    if total > model.cfg.context_length:
        raise ValueError(
            f"{prompt.numel()} prompt tokens + {max_new_tokens} new ones exceed the model's "
            f"context length of {model.cfg.context_length}"
        )
    weight = model.embed_tokens.weight
    cache = KVCache(model.cfg, total, weight.device, weight.dtype)
    tokens = prompt.to(weight.device).unsqueeze(0)  # (1, seq): the prompt, then each new token
    for _ in range(max_new_tokens):
        with eval_mode(model):
            logits = model(tokens, cache=cache, last_only=True)[0, -1]  # (vocab,)
        next_id = next_token(logits, temperature, top_k, top_p, generator)
        yield next_id
        if next_id == eos_id:
            return
        tokens = torch.tensor([[next_id]], device=weight.device)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no LoRA dropout) for one step, then back as it was: between the
    yields of `generate` the caller may train the same model."""
    was_training = model.training
    if not was_training:
        # Already in eval mode: spare each step two walks over every module.
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """The id chosen from one position's (vocab,) logits."""
    if temperature == 0:
        # The same index in fp32, which holds every bf16 value exactly: the CPU's fp32 argmax
        # over a 32,000-token vocabulary is about 3x faster than its bf16 one.
        return int(logits.float().argmax())
    # Scaled and filtered in fp32: bf16 logits would round small probabilities to ties.
    scaled = logits.float() / temperature
    filtered = filter_top_p(filter_top_k(scaled, top_k), top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """`logits` with every token below the k-th largest set to -inf (ties with it kept)."""
    if top_k == 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` with every token outside the nucleus set to -inf: the most likely tokens, in order,
    until their probability reaches `top_p`. The most likely token always stays."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # A token is in the nucleus when the tokens before it have not yet reached top_p.
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
