"""The Llama-2 architecture in plain PyTorch.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` (without its `model.` prefix),
and the rotary embedding rotates the two halves of each head as Hugging Face's does, so a
Hugging Face state dict maps onto this model by a rename alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.config import ModelConfig
from finetune.loss import chunked_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as the reference does) and cast back before scaling.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        scaled = self.weight * normed
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Only matmuls read a norm's output, and autocast would cast it to bf16 for each of
            # them (q, k and v; gate and up): cast it once, to the same values.
            return scaled.to(torch.get_autocast_dtype(device_type))
        return scaled


def rotary_cos_sin(
    cfg: ModelConfig, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of positions 0 .. seq_len - 1 as `apply_rotary` takes it, (seq, head_dim)
    each, in fp32: the cos of each pair's angle, and its sin with the first half negated."""
    exponents = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    sin = angles.sin()
    # The rotated pairs are (-second, first): the sign goes on the small sin table, once per
    # forward pass, which gives the same products without negating the activations (and their
    # gradients) in every layer.
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position: pairs are (i, i + head_dim/2); `cos`
    and `signed_sin` as `rotary_cos_sin` makes them, (seq, head_dim), or (batch, 1, seq,
    head_dim) where each row has its own positions."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * signed_sin.to(x.dtype)


def packed_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed rows, (batch, 1, seq, seq), True where a query may attend to a
    key, from (batch, seq) positions that restart at 0 with each sequence: causal within each
    sequence, nothing across them."""
    sequence = (positions == 0).cumsum(dim=1)  # (batch, seq) which sequence of its row
    same_sequence = sequence.unsqueeze(2) == sequence.unsqueeze(1)
    seq = positions.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    return (same_sequence & causal).unsqueeze(1)


class LayerCache(NamedTuple):
    """One layer's view of a `KVCache`: its key and value buffers, and where the new tokens go."""

    keys: torch.Tensor  # (batch, n_kv_heads, max_len, head_dim)
    values: torch.Tensor
    start: int

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k and v (batch, n_kv_heads, seq, head_dim) after the cached ones;
        the keys and values of every position so far."""
        end = self.start + k.shape[2]
        self.keys[:, :, self.start : end] = k
        self.values[:, :, self.start : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of the positions a model has already seen, so that the next token costs one
    position's forward pass, not the whole sequence's. Buffers are allocated once at `max_len`
    positions; with grouped-query attention they hold only the n_kv_heads heads.

    Opt-in: pass one to `Llama.forward(tokens, cache=...)`, which appends the tokens' keys and
    values and advances `length`. Training never builds one.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        batch: int = 1,
    ) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        # Positions stored so far, which is also the position of the next token.
        self.length = 0
        # The rotation of every position the cache can hold, computed once in fp32 and cast to
        # the cache's dtype (as `apply_rotary` casts it): a step slices its own rows instead of
        # building and casting them again, the same values either way.
        cos, signed_sin = rotary_cos_sin(cfg, max_len, device)
        self.cos, self.signed_sin = cos.to(dtype), signed_sin.to(dtype)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.keys[index], self.values[index], self.length)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, enable_gqa: bool
) -> torch.Tensor:
    """Attention of queries at positions start .. start + seq - 1 over keys at 0 .. start + seq - 1.

    SDPA's `is_causal` aligns the mask to the top left, which is right only when queries and keys
    start together (an empty cache); one new token attends to everything, needing no mask; a chunk
    after cached tokens needs the causal mask shifted by `start`.
    """
    seq = q.shape[2]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    mask = None
    if seq > 1:
        mask = torch.ones(seq, start + seq, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # q, k and v as one product, in place of the three: set for generation only
        # (decode_layout.fuse_projections), where one larger product reads its weights faster.
        self.qkv_proj: nn.Module | None = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], -1)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: the `packed_causal_mask` of packed rows; None, the causal mask."""
        batch, seq, _ = x.shape
        q, k, v = self.project(x)
        # (batch, heads, seq, head_dim)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        enable_gqa = self.n_kv_heads != self.n_heads
        if cache is None and mask is None:
            # Right padding needs no mask: under the causal mask no real token attends to a pad.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        elif cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
        else:
            k, v = cache.append(k, v)
            out = cached_attention(q, k, v, cache.start, enable_gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        # gate and up as one product, for generation only (as Attention.qkv_proj).
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        # Set by `parallel.apply_activation_checkpointing`. A flag rather than a wrapper module,
        # so that parameter names (and so checkpoints and adapters) stay the same either way.
        self.checkpoint_activations = False

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Without grad nothing is saved for backward, so there is nothing to recompute.
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Non-reentrant: works with parameters that need no grad (frozen LoRA bases) and
            # restores the RNG state when recomputing, so dropout draws the same masks twice.
            return checkpoint(self._forward, x, cos, sin, cache, mask, use_reentrant=False)
        return self._forward(x, cos, sin, cache, mask)

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.is_complete:
            raise ValueError(f"an architecture with fields left to a checkpoint: {cfg}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_output_to_embedding()

    def tie_output_to_embedding(self) -> None:
        """With `tie_word_embeddings`, make lm_head's weight the embedding's Parameter itself:
        one weight, trained once, with the gradients of both uses (as transformers ties them)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, vocab) logits; with `targets`, (batch, seq) token
        ids or IGNORE_INDEX, the summed cross-entropy of the labelled positions instead.

        With a `cache`, `tokens` continue the sequence the cache holds: they are placed at
        positions cache.length onwards, attend to the cached positions too, and are appended to it.
        `last_only` gives only the last position's logits, (batch, 1, vocab): all that generation
        needs, where the output layer over a whole prompt costs as much as several blocks.
        `positions`, (batch, seq), are those of packed rows (see `hidden_states`); generation
        never packs, so they take no cache.

        The training loss is computed here, inside the model's call, so that hooks on the model
        run on the training path: a forward hook, FSDP's gathering of the root's weights,
        torch.compile of the root. It applies the output layer a chunk of tokens at a time, so the
        logits of a whole batch never exist at once (see `loss.chunked_cross_entropy`).
        """
        if cache is None:
            hidden = self.hidden_states(tokens, positions)
        elif targets is None and positions is None:
            hidden = self.cached_hidden_states(tokens, cache)
        else:
            raise ValueError(
                "a KV cache is for generation; the training loss and packing take none"
            )
        if targets is None:
            return self.lm_head(hidden[:, -1:] if last_only else hidden)
        weight = self.output_weight()
        if not torch.is_grad_enabled():
            # The loss computes its gradients in the forward pass for every input that requires
            # them, which no_grad alone does not switch off.
            weight = weight.detach()
        return chunked_cross_entropy(hidden, weight, targets)

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, dim) final normalised hidden states.

        `positions` (batch, seq) lay out packed rows: each sequence's positions restart at 0, and
        it is rotated by them and attends only to itself, as if it were alone in its row.
        """
        cos, sin = rotary_cos_sin(self.cfg, tokens.shape[1], tokens.device)
        mask = None
        if positions is not None:
            # Each row's own angles, broadcast over the heads: the fp32 values of the same
            # positions in an unpacked sequence.
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            mask = packed_causal_mask(positions)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask=mask)
        return self.norm(x)

    def cached_hidden_states(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`hidden_states` of tokens that continue the sequence in `cache`, which they extend."""
        start, seq = cache.length, tokens.shape[1]
        if start + seq > cache.max_len:
            raise ValueError(
                f"{seq} tokens after {start} cached overflow a cache of {cache.max_len} positions"
            )
        cos, sin = cache.cos[start : start + seq], cache.signed_sin[start : start + seq]
        x = self.embed_tokens(tokens)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(index))
        cache.length = start + seq
        return self.norm(x)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight as the loss multiplies by it: an adapted `lm_head` (a LoRA
        layer) gives its `effective_weight()`, W + s·B A (DoRA: rescaled per row), built
        differentiably each call so that the loss is that of the adapted model and its weight
        gradient flows on to the adapter. Reading the base weight would bypass the adapter, which
        would then never train. Costs one (vocab, dim) tensor per call with an adapter.

        The one difference from the logits of `self(tokens)`: this path cannot apply LoRA dropout
        to the hidden states (dropout is per token, a weight is shared by all), so lm_head's
        adapter trains without dropout. With `lora.dropout=0` the two are identical.
        """
        adapted = getattr(self.lm_head, "effective_weight", None)
        return adapted() if adapted is not None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation: N(0, 0.02) matrices and embeddings, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
