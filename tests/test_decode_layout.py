"""A model laid out for decoding: q/k/v and gate/up fused, bf16 weights packed for oneDNN, fp32
ones transposed where that is faster; the same logits (bf16 products bit for bit, fp32 to
rounding), the same generations, and nothing changed that must stay as it is."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from finetune.config import LORA_TARGETS, LoraConfig
from finetune.decode_layout import (
    PackedLinear,
    TransposedLinear,
    fuse_projections,
    lay_out_for_decoding,
)
from finetune.generation import generate
from finetune.lora import LoRALinear, apply_lora
from finetune.model import Llama
from tests.conftest import SMALL_MODEL, random_tokens, small_model
from tests.test_lora import randomise_adapters

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)

# Once fused, a block multiplies by 4 matrices: qkv, o, gate_up, down. bf16 lays out all of them
# and the output layer; fp32 those with at least as many outputs as inputs: not down_proj.
KEPT_IN_FP32 = ("mlp.down_proj",)
LAID_OUT = {
    torch.bfloat16: 4 * SMALL_MODEL.n_layers + 1,
    torch.float32: 3 * SMALL_MODEL.n_layers + 1,
}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


def eval_model(dtype: torch.dtype, seed: int = 0, tied: bool = False) -> Llama:
    cfg = dataclasses.replace(SMALL_MODEL, tie_word_embeddings=tied)
    return small_model(seed, cfg).to(dtype).eval()


@pytest.mark.parametrize("rows", [1, 5])
def test_packed_linear_equals_the_plain_bf16_product_bit_for_bit(rows: int) -> None:
    linear = nn.Linear(64, 160, bias=False).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    packed = PackedLinear(linear)

    assert torch.equal(packed(x), linear(x))
    assert packed(x).shape == (2, rows, 160)


@pytest.mark.parametrize("rows", [1, 5])
def test_transposed_linear_equals_the_plain_fp32_product_to_rounding(rows: int) -> None:
    linear = nn.Linear(64, 160, bias=False)
    x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(0))

    transposed = TransposedLinear(linear)

    with torch.no_grad():
        torch.testing.assert_close(transposed(x), linear(x), rtol=1e-6, atol=1e-6)
    assert transposed.weight_t.shape == (64, 160) and transposed.weight_t.is_contiguous()


@DTYPES
def test_laying_out_a_model_keeps_its_logits_and_generations(dtype: torch.dtype) -> None:
    model = eval_model(dtype)
    plain = copy.deepcopy(model)
    tokens = random_tokens((2, 12), seed=3)
    prompt = tokens[0, :8]

    assert lay_out_for_decoding(model) == LAID_OUT[dtype]
    left_plain = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    kept = KEPT_IN_FP32 if dtype == torch.float32 else ()
    assert left_plain == {
        f"layers.{i}.{name}" for i in range(SMALL_MODEL.n_layers) for name in kept
    }
    with torch.no_grad():
        tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(model(tokens), plain(tokens), **tolerance)
    assert list(generate(model, prompt, 20)) == list(generate(plain, prompt, 20))


def test_laying_out_keeps_no_second_copy_of_a_weight() -> None:
    model = eval_model(torch.bfloat16)
    parameters = {name for name, _ in model.named_parameters()}
    lay_out_for_decoding(model)

    left = {name for name, _ in model.named_parameters()}
    # Only the embedding and the norms are Parameters still; the matrices live in the packs.
    assert left == {n for n in parameters if "embed_tokens" in n or "norm" in n}


@DTYPES
def test_a_tied_output_layer_is_left_as_it_is(dtype: torch.dtype) -> None:
    tied = eval_model(dtype, tied=True)

    assert lay_out_for_decoding(tied) == LAID_OUT[dtype] - 1
    assert type(tied.lm_head) is nn.Linear
    assert tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_an_adapted_model_packs_its_bases_but_not_a_dora_base(use_dora: bool) -> None:
    model = eval_model(torch.bfloat16, seed=2)
    apply_lora(model, LoraConfig(4, 8.0, 0.0, list(LORA_TARGETS), use_dora))
    randomise_adapters(model)
    model.eval()
    plain = copy.deepcopy(model)
    prompt = random_tokens((1, 8), seed=5)[0]

    packed = lay_out_for_decoding(model)

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    bases_packed = {type(layer.base) is PackedLinear for layer in layers}
    adapters = {type(layer.lora_A) for layer in layers} | {type(layer.lora_B) for layer in layers}
    assert bases_packed == {not use_dora}
    assert adapters == {nn.Linear}  # fp32: left plain
    assert packed == (0 if use_dora else len(layers))
    assert list(generate(model, prompt, 16)) == list(generate(plain, prompt, 16))


def test_fused_projections_compute_the_same_outputs_as_the_separate_ones() -> None:
    model = eval_model(torch.float32, seed=1)
    plain = copy.deepcopy(model)
    tokens = random_tokens((2, 12), seed=4)

    assert fuse_projections(model) == 2 * SMALL_MODEL.n_layers
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    width = (
        SMALL_MODEL.n_heads * SMALL_MODEL.head_dim
        + 2 * SMALL_MODEL.n_kv_heads * SMALL_MODEL.head_dim
    )
    assert attention.qkv_proj.weight.shape == (width, SMALL_MODEL.dim)
    assert attention.q_proj is attention.k_proj is attention.v_proj is None
    assert mlp.gate_up_proj.weight.shape == (2 * SMALL_MODEL.ffn_dim, SMALL_MODEL.dim)
    assert mlp.gate_proj is mlp.up_proj is None
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


def test_layers_with_adapters_are_not_fused_the_others_are() -> None:
    model = eval_model(torch.bfloat16, seed=3)
    apply_lora(model, LoraConfig(4, 8.0, 0.0, ["q_proj", "v_proj"], False))
    randomise_adapters(model)
    model.eval()
    plain = copy.deepcopy(model)
    prompt = random_tokens((1, 8), seed=6)[0]

    lay_out_for_decoding(model)

    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attention.qkv_proj is None
    assert type(attention.k_proj) is PackedLinear and type(attention.q_proj.base) is PackedLinear
    assert type(mlp.gate_up_proj) is PackedLinear and mlp.gate_proj is None
    assert list(generate(model, prompt, 16)) == list(generate(plain, prompt, 16))
