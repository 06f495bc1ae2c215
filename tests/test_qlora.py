"""QLoRA (`lora.quantize_base`): the frozen block weights in torchao's NF4, their error and size,
that training touches only the adapters without dense copies of the base, and that merging and
saving give ordinary dense models and PEFT adapters."""

from __future__ import annotations

import sys
import weakref
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.checkpoint import load_checkpoint, load_hf
from finetune.config import LORA_TARGETS, LoraConfig, ModelConfig, build_params, model_preset
from finetune.errors import UserError
from finetune.hf_format import save_hf
from finetune.lora import apply_lora, lora_modules, merge_lora
from finetune.model import Llama
from finetune.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    load_adapter,
    save_adapter,
)
from finetune.qlora import (
    NF4_BLOCK_SIZE,
    NF4_SCALER_BLOCK_SIZE,
    NF4Linear,
    quantize_base_weights,
)
from finetune.recipes import lora as lora_recipe
from tests.conftest import (
    TINY_CHECKPOINT,
    TINY_TOKENIZER,
    compose_config,
    model_overrides,
    random_tokens,
    small_model,
    write_checkpoint,
)
from tests.test_lora import (
    ALPHA,
    CPU,
    PROJECTIONS,
    RANK,
    check_bf16_base_trains_under_autocast_and_merges,
    randomise_adapters,
)

# torchao's NF4 takes whole groups of 64 x 256 weights, so every linear here is a multiple of 16384
# weights (SMALL_MODEL's 64-wide ones are not).
QLORA_MODEL = ModelConfig(
    vocab_size=4096,
    dim=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    ffn_dim=256,
    norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=256,
)
needs_torchao = pytest.mark.skipif(
    find_spec("torchao") is None, reason="needs torchao: pip install 'finetune[qlora]'"
)


def lora_config(
    targets: list[str] = PROJECTIONS,
    use_dora: bool = False,
    dropout: float = 0.0,
    quantize_base: bool = True,
) -> LoraConfig:
    return LoraConfig(RANK, ALPHA, dropout, list(targets), use_dora, quantize_base)


def qlora_model(cfg: LoraConfig, seed: int = 0) -> Llama:
    model = small_model(seed, QLORA_MODEL)
    apply_lora(model, cfg)
    randomise_adapters(model)
    return model


def nf4_modules(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def nf4_bits_per_weight(weight: torch.Tensor) -> float:
    """The bits an NF4Tensor really stores per weight: its inner tensors' bytes (4-bit codes, int8
    block scales, their fp32 factors, the 16-entry code table) over the weights it stands for."""
    inner_names, _ = weight.__tensor_flatten__()
    tensors = [getattr(weight, name) for name in inner_names]
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / weight.numel()


@needs_torchao
def test_every_block_linear_is_quantized_but_embedding_and_lm_head_stay_dense() -> None:
    model = small_model(cfg=QLORA_MODEL)
    dense_weight = weakref.ref(model.layers[0].mlp.up_proj.weight)
    apply_lora(model, lora_config(["q_proj", "lm_head"]))
    assert dense_weight() is None  # freed, not kept beside its NF4 copy
    expected = {
        f"layers.{i}.{part}"
        for i in range(QLORA_MODEL.n_layers)
        for part in (
            "self_attn.q_proj.base",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert nf4_modules(model).keys() == expected
    assert type(model.lm_head.base) is nn.Linear
    assert type(model.lm_head.base.weight.data) is torch.Tensor
    assert type(model.embed_tokens.weight.data) is torch.Tensor
    # The chunked loss gets lm_head's dense effective weight, not something to dequantize.
    assert type(model.output_weight()) is torch.Tensor


@needs_torchao
def test_nf4_weight_error_is_within_half_the_widest_step_between_nf4_codes() -> None:
    """Each weight is rounded to the nearest of 16 codes times its block's absmax; the widest gap
    between codes (-1 to -0.6962) bounds the rounding at 0.1519 absmax. The block scale itself is
    int8 (double quantization): off by at most 1/128 of the largest scale in its group of 256."""
    dense = small_model(cfg=QLORA_MODEL)
    model = small_model(cfg=QLORA_MODEL)
    apply_lora(model, lora_config(["q_proj"]))
    for name, module in nf4_modules(model).items():
        weight = dense.get_submodule(name.removesuffix(".base")).weight
        error = (module.dequantized() - weight).abs().view(-1, NF4_BLOCK_SIZE)  # (blocks, 64)
        absmax = weight.abs().view(-1, NF4_BLOCK_SIZE).amax(dim=1)  # (blocks,)
        groups = absmax.view(-1, NF4_SCALER_BLOCK_SIZE)  # (groups, 256)
        group_max = groups.amax(dim=1).repeat_interleave(NF4_SCALER_BLOCK_SIZE)
        bound = 0.1519 * absmax + group_max / 128 + 1e-7
        assert (error.amax(dim=1) <= bound).all(), name
        # Normally distributed weights: NF4's RMS error is ~9 % of theirs.
        assert 0.05 < (error.norm() / weight.norm()).item() < 0.11, name


@needs_torchao
def test_nf4_base_stores_about_4_bits_per_weight() -> None:
    model = small_model(cfg=QLORA_MODEL)
    apply_lora(model, lora_config())
    for name, module in nf4_modules(model).items():
        dense_bits = torch.finfo(module.weight.dtype).bits
        bits = nf4_bits_per_weight(module.weight)
        # 4 for the code, 8/64 for the block scale, the rest per group or tensor.
        assert 4.125 < bits < 4.2, name
        assert bits / dense_bits < 0.14, name


@needs_torchao
def test_quantized_pretrained_model_gives_logits_close_to_the_dense_ones() -> None:
    """On real weights, the shipped tiny model's: NF4's ~9 % error per weight moves the logits by
    ~2.5 % and seldom changes the most likely token."""
    model = load_hf(model_preset("tiny"), TINY_CHECKPOINT, CPU, torch.float32).eval()
    tokens = random_tokens(shape=(2, 64))
    with torch.no_grad():
        expected = model(tokens)
        apply_lora(model, lora_config(["q_proj"]))
        logits = model(tokens)
    assert (logits - expected).norm() / expected.norm() < 0.05
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def dense_twin(model: Llama, cfg: LoraConfig, seed: int = 0) -> Llama:
    """The same model with dense bases holding the NF4 model's dequantized weights, and equal
    adapters: what the quantized model must compute."""
    twin = small_model(seed, QLORA_MODEL)
    with torch.no_grad():
        for name, module in nf4_modules(model).items():
            twin.get_submodule(name.removesuffix(".base")).weight.copy_(module.dequantized())
    apply_lora(twin, LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.use_dora))
    twin_adapters = adapter_state_dict(twin)
    with torch.no_grad():
        for key, tensor in adapter_state_dict(model).items():
            twin_adapters[key].copy_(tensor)
    return twin


@needs_torchao
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_qlora_logits_and_adapter_grads_equal_lora_on_the_dequantized_base(
    use_dora: bool,
) -> None:
    cfg = lora_config(list(LORA_TARGETS), use_dora)
    model = qlora_model(cfg)
    twin = dense_twin(model, cfg)
    tokens = random_tokens()
    logits, expected = model(tokens), twin(tokens)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    twin_grads = {key: p.grad for key, p in adapter_state_dict(twin).items()}
    for key, p in adapter_state_dict(model).items():
        scale = twin_grads[key].abs().max().item()
        torch.testing.assert_close(p.grad, twin_grads[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


@needs_torchao
def test_backward_reaches_every_adapter_and_no_nf4_base_weight() -> None:
    model = qlora_model(lora_config(list(LORA_TARGETS), use_dora=True, dropout=0.1))
    model(random_tokens()).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(not m.weight.requires_grad for m in nf4_modules(model).values())


@needs_torchao
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_forward_keeps_nf4_weights_not_dense_copies_for_backward(use_dora: bool) -> None:
    """Saving each layer's dequantized weight for backward would hold the whole dense base."""
    model = qlora_model(lora_config(PROJECTIONS, use_dora, dropout=0.1))
    base_shapes = {tuple(m.weight.shape) for m in nf4_modules(model).values()}
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(random_tokens())
    dense_weights = [t for t in saved if tuple(t.shape) in base_shapes and not is_nf4(t)]
    assert not dense_weights
    # Layer 0's q, k and v need no input gradient (their input is the frozen embedding's output),
    # so they save nothing; every other layer saves its NF4 weight.
    first_qkv = {f"layers.0.self_attn.{p}.base" for p in ("q_proj", "k_proj", "v_proj")}
    expected = {id(m.weight) for n, m in nf4_modules(model).items() if n not in first_qkv}
    assert {id(t) for t in saved if is_nf4(t)} == expected


def is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


@needs_torchao
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_qlora_model_saves_as_a_dense_model_with_the_unmerged_logits(
    tmp_path: Path, use_dora: bool
) -> None:
    model = qlora_model(lora_config(["q_proj", "down_proj", "lm_head"], use_dora))
    tokens = random_tokens()
    with torch.no_grad():
        unmerged = model(tokens)
        merge_lora(model)
    assert not lora_modules(model) and not nf4_modules(model)
    assert all(type(p.data) is torch.Tensor for p in model.parameters())
    assert model.state_dict().keys() == small_model(cfg=QLORA_MODEL).state_dict().keys()

    save_hf(model, tmp_path, tokenizer=TINY_TOKENIZER, bos_id=1, eos_id=2, dtype=torch.float32)
    reloaded = load_hf(QLORA_MODEL, tmp_path, CPU, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), unmerged, rtol=0, atol=1e-4)


@needs_torchao
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_in_nf4_trains_under_autocast_and_merges_to_bf16(use_dora: bool) -> None:
    model = small_model(cfg=QLORA_MODEL).to(torch.bfloat16)
    apply_lora(model, lora_config(list(LORA_TARGETS), use_dora, dropout=0.1))
    assert all(m.weight.dtype == torch.bfloat16 for m in nf4_modules(model).values())
    check_bf16_base_trains_under_autocast_and_merges(model)


@needs_torchao
def test_adapter_files_are_the_same_with_and_without_quantize_base(tmp_path: Path) -> None:
    """PEFT applies the adapter to the dense base; nothing in the files says it trained on NF4.
    An adapter moves either way between dense and quantized runs."""
    cfg = lora_config(["q_proj", "up_proj", "lm_head"], use_dora=True)
    dense_cfg = LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.use_dora)
    quantized, dense = qlora_model(cfg), qlora_model(dense_cfg, seed=1)
    save_adapter(quantized, tmp_path / "quantized", "base", cfg)
    save_adapter(dense, tmp_path / "dense", "base", dense_cfg)
    config = (tmp_path / "quantized" / ADAPTER_CONFIG).read_text()
    assert config == (tmp_path / "dense" / ADAPTER_CONFIG).read_text()
    assert "quant" not in config and "4bit" not in config

    load_adapter(quantized, tmp_path / "dense")
    loaded, saved = adapter_state_dict(quantized), adapter_state_dict(dense)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in saved.items())
    assert (tmp_path / "quantized" / ADAPTER_WEIGHTS).is_file()


@needs_torchao
def test_lora_recipe_with_quantize_base_saves_a_merged_model_equal_to_the_qlora_one(
    tmp_path: Path,
) -> None:
    checkpoint = write_checkpoint(tmp_path / "base", QLORA_MODEL)
    params = build_params(
        compose_config(
            [
                "recipe=lora",
                *model_overrides(QLORA_MODEL),
                f"checkpoint={checkpoint}",
                f"output_dir={tmp_path / 'run'}",
                "max_steps=2",
                "batch_size=2",
                "max_seq_len=64",
                # Large steps, so that the adapters are far from zero when merged.
                "lr=1e-2",
                "lora.quantize_base=true",
            ]
        )
    )
    lora_recipe.run(params)

    model = load_checkpoint(QLORA_MODEL, checkpoint, CPU, torch.float32)
    apply_lora(model, params.lora)
    load_adapter(model, tmp_path / "run" / "adapter")
    model.eval()  # no adapter dropout
    merged = load_checkpoint(QLORA_MODEL, tmp_path / "run" / "model", CPU, torch.float32)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert min(t.abs().max() for k, t in adapter.items() if "lora_B" in k) > 1e-3  # trained
    tokens = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), model(tokens), rtol=0, atol=1e-4)


def test_quantize_base_is_off_by_default_and_combines_with_dora() -> None:
    assert LoraConfig().quantize_base is False
    assert LoraConfig(use_dora=True, quantize_base=True).quantize_base
    cfg = compose_config(["recipe=lora", "lora.quantize_base=true", "lora.use_dora=true"])
    assert cfg.lora.quantize_base is True


def test_missing_torchao_is_a_one_line_user_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes an import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UserError, match=r"torchao .*pip install 'finetune\[qlora\]'") as error:
        apply_lora(small_model(cfg=QLORA_MODEL), lora_config())
    assert "\n" not in str(error.value)


@needs_torchao
def test_layer_too_small_for_nf4_blocks_is_a_user_error_naming_it() -> None:
    model = small_model()
    with pytest.raises(
        UserError,
        match=r"^lora.quantize_base: layers.0.self_attn.q_proj has 4096 weights \(64x64\), "
        r"not a multiple of 16384",
    ):
        apply_lora(model, lora_config())


@needs_torchao
def test_rows_of_the_weight_quantized_whole_are_its_rows_but_rows_quantized_alone_are_not() -> None:
    """What a process of a sharded QLoRA run keeps (NF4Linear.load_weight): torchao's split of
    the whole weight's NF4Tensor, FSDP2's split along dim 0, dequantizes to the rows of the whole
    one's. Rows quantized on their own differ: the double quantization subtracts the mean of the
    whole tensor's block scales."""
    from torchao.quantization import to_nf4

    weight = small_model(cfg=QLORA_MODEL).layers[0].mlp.up_proj.weight.detach()  # (256, 128)
    whole = to_nf4(weight, NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
    parts = torch.chunk(whole, 2)  # each one group of 64 x 256 weights
    expected = torch.chunk(whole.get_original_weight(), 2)
    for part, rows in zip(parts, expected, strict=True):
        assert torch.equal(part.get_original_weight(), rows)
    alone = to_nf4(weight[:128].clone(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
    assert (alone.get_original_weight() - expected[0]).abs().max() > 1e-4


@needs_torchao
def test_a_layer_that_does_not_split_evenly_over_the_processes_is_refused_naming_it() -> None:
    """QLORA_MODEL's q_proj is one group of 16384 weights: whole on one process, not on two."""
    with torch.device("meta"):  # as a sharded run builds it
        model = Llama(QLORA_MODEL)
    quantize_base_weights(model, processes=1)
    with torch.device("meta"):
        model = Llama(QLORA_MODEL)
    with pytest.raises(
        UserError,
        match=r"^lora.quantize_base: layers.0.self_attn.q_proj has 16384 weights \(128x128\), "
        r"which do not split over 2 processes into equal parts of whole rows, each a multiple "
        r"of 16384 weights .*; run on fewer processes or with lora.quantize_base=false$",
    ):
        quantize_base_weights(model, processes=2)
