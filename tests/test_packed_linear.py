"""bf16 linear layers packed for the CPU: the same products bit for bit, on every layer a
generating model multiplies by, and nothing packed that must stay as it is."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from finetune.config import LORA_TARGETS, LoraConfig
from finetune.generation import generate
from finetune.lora import LoRALinear, apply_lora
from finetune.model import Llama
from finetune.packed_linear import PackedLinear, pack_linears
from tests.conftest import SMALL_MODEL, random_tokens, small_model
from tests.test_lora import randomise_adapters

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)

# Every matrix of a block and the output layer: 7 per layer, + lm_head.
LINEARS_PER_MODEL = 7 * SMALL_MODEL.n_layers + 1


def bf16_model(seed: int = 0, tied: bool = False) -> Llama:
    cfg = dataclasses.replace(SMALL_MODEL, tie_word_embeddings=tied)
    return small_model(seed, cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("rows", [1, 5])
def test_packed_linear_equals_the_plain_product_bit_for_bit(rows: int) -> None:
    linear = nn.Linear(64, 160, bias=False).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    packed = PackedLinear(linear)

    assert torch.equal(packed(x), linear(x))
    assert packed(x).shape == (2, rows, 160)


def test_packing_a_bf16_model_keeps_its_logits_and_generations() -> None:
    model = bf16_model()
    plain = copy.deepcopy(model)
    tokens = random_tokens((2, 12), seed=3)
    prompt = tokens[0, :8]

    assert pack_linears(model) == LINEARS_PER_MODEL
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))
    assert list(generate(model, prompt, 20)) == list(generate(plain, prompt, 20))


def test_packing_keeps_no_second_copy_of_a_weight() -> None:
    model = bf16_model()
    packed_parameters = {name for name, _ in model.named_parameters()}
    pack_linears(model)

    left = {name for name, _ in model.named_parameters()}
    # Only the embedding and the norms are Parameters still; the matrices live in the packs.
    assert left == {n for n in packed_parameters if "embed_tokens" in n or "norm" in n}


def test_fp32_models_and_tied_output_layers_are_left_as_they_are() -> None:
    assert pack_linears(small_model().eval()) == 0

    tied = bf16_model(tied=True)
    assert pack_linears(tied) == LINEARS_PER_MODEL - 1
    assert type(tied.lm_head) is nn.Linear
    assert tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_an_adapted_model_packs_its_bases_but_not_a_dora_base(use_dora: bool) -> None:
    model = bf16_model(seed=2)
    apply_lora(model, LoraConfig(4, 8.0, 0.0, list(LORA_TARGETS), use_dora))
    randomise_adapters(model)
    model.eval()
    plain = copy.deepcopy(model)
    prompt = random_tokens((1, 8), seed=5)[0]

    packed = pack_linears(model)

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    bases_packed = {type(layer.base) is PackedLinear for layer in layers}
    adapters = {type(layer.lora_A) for layer in layers} | {type(layer.lora_B) for layer in layers}
    assert bases_packed == {not use_dora}
    assert adapters == {nn.Linear}  # fp32: left plain
    assert packed == (0 if use_dora else len(layers))
    assert list(generate(model, prompt, 16)) == list(generate(plain, prompt, 16))
