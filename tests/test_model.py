"""The Llama model against transformers' LlamaForCausalLM, and Hugging Face checkpoint files.

Meta's format, .bin files and format detection are in test_checkpoint_formats.py; the published
parameter counts of the Llama-2 configs in test_configs.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from finetune.checkpoint import load_checkpoint
from finetune.checkpoint_files import SAFETENSORS_INDEX
from finetune.config import ModelConfig
from finetune.errors import UserError
from finetune.hf_format import hf_key, save_hf
from finetune.model import Llama
from tests.conftest import (
    SMALL_MODEL,
    TINY_TOKENIZER,
    max_abs_diff,
    random_tokens,
    write_checkpoint,
)

CPU = torch.device("cpu")
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# Grouped-query attention, and a RoPE base and RMSNorm epsilon that are not transformers' defaults,
# so that a field that is mapped wrongly (or not at all) changes the logits.
GQA_MODEL = ModelConfig(
    vocab_size=1024,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=160,
    norm_eps=1e-4,
    rope_theta=500.0,
    context_length=128,
)


def random_model(cfg: ModelConfig, seed: int = 0) -> Llama:
    """A model with weights large enough for attention to be far from uniform, and norm weights
    that are not all ones (so that swapping two norms would change the output)."""
    generator = torch.Generator().manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=generator))
            else:
                std = 1.0 if "embed_tokens" in name else 0.15
                p.copy_(std * torch.randn(p.shape, generator=generator))
    return model.eval()


def hf_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    """transformers' reference model for `cfg`, its configuration written with HF's own names."""
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.context_length,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def hf_rope_theta(config: LlamaConfig) -> float:
    """transformers 5 keeps the RoPE base in `rope_parameters`, 4.x in `rope_theta`."""
    rope_parameters = getattr(config, "rope_parameters", None)
    return rope_parameters["rope_theta"] if rope_parameters else config.rope_theta


# --------------------------------------------------------------------------------------------
# Same numbers as transformers
# --------------------------------------------------------------------------------------------


def test_logits_equal_transformers_llama_with_grouped_query_attention() -> None:
    ours = random_model(GQA_MODEL)
    reference = hf_llama(GQA_MODEL)
    reference.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    tokens = random_tokens((2, 33), cfg=GQA_MODEL)

    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        actual = ours(tokens)

    assert actual.shape == (2, 33, GQA_MODEL.vocab_size)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert max_abs_diff(actual, expected) <= 1e-4


def test_every_parameter_maps_onto_a_transformers_parameter_of_the_same_shape() -> None:
    ours = {hf_key(k): v.shape for k, v in Llama(SMALL_MODEL).state_dict().items()}
    reference = {k: v.shape for k, v in hf_llama(SMALL_MODEL).state_dict().items()}
    assert ours == reference


def test_transformers_loads_a_written_checkpoint_with_the_same_logits(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path, GQA_MODEL, seed=3)
    reference = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = load_checkpoint(GQA_MODEL, ckpt, CPU, torch.float32).eval()
    tokens = random_tokens((2, 17), cfg=GQA_MODEL)

    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        actual = ours(tokens)

    assert isinstance(reference, LlamaForCausalLM)
    assert reference.config.num_key_value_heads == GQA_MODEL.n_kv_heads
    assert hf_rope_theta(reference.config) == GQA_MODEL.rope_theta
    assert reference.config.rms_norm_eps == GQA_MODEL.norm_eps
    assert max_abs_diff(actual, expected) <= 1e-4


# --------------------------------------------------------------------------------------------
# Forward pass properties
# --------------------------------------------------------------------------------------------


def test_hidden_states_through_lm_head_equal_forward() -> None:
    model = random_model(SMALL_MODEL)
    tokens = random_tokens((2, 9))
    with torch.no_grad():
        hidden = model.hidden_states(tokens)
        logits = model(tokens)
    assert hidden.shape == (2, 9, SMALL_MODEL.dim)
    assert torch.allclose(model.lm_head(hidden), logits, rtol=0, atol=1e-6)


def test_changing_a_later_token_leaves_earlier_logits_unchanged() -> None:
    model = random_model(SMALL_MODEL)
    tokens = random_tokens((1, 12))
    changed = tokens.clone()
    changed[0, 8] = (tokens[0, 8] + 1) % SMALL_MODEL.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.allclose(before[:, :8], after[:, :8], rtol=0, atol=1e-5)
    assert max_abs_diff(before[:, 8:], after[:, 8:]) > 1e-2


def test_right_padding_does_not_change_the_logits_of_real_tokens() -> None:
    model = random_model(SMALL_MODEL)
    long, short = (
        random_tokens((12,), seed=1),
        random_tokens((5,), seed=2),
    )
    padded = torch.cat([short, torch.zeros(7, dtype=torch.long)])
    with torch.no_grad():
        batch = model(torch.stack([long, padded]))
        alone_long, alone_short = model(long[None]), model(short[None])
    assert torch.allclose(batch[1, :5], alone_short[0], rtol=0, atol=1e-5)
    assert torch.allclose(batch[0], alone_long[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Checkpoint files: errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "hf_name"),
    [
        ("dim", 128, "hidden_size"),
        ("n_layers", 3, "num_hidden_layers"),
        ("n_kv_heads", 4, "num_key_value_heads"),
        ("ffn_dim", 192, "intermediate_size"),
        ("vocab_size", 4000, "vocab_size"),
        ("rope_theta", 500000.0, "rope_theta"),
    ],
)
def test_load_checkpoint_rejects_a_checkpoint_of_another_architecture(
    small_checkpoint: Path, field: str, value: object, hf_name: str
) -> None:
    configured = dataclasses.replace(SMALL_MODEL, **{field: value})
    with pytest.raises(UserError) as error:
        load_checkpoint(configured, small_checkpoint, CPU, torch.float32)
    message = str(error.value)
    assert str(small_checkpoint / "config.json") in message
    assert f"model.{field}={value}" in message
    assert f"{hf_name}={getattr(SMALL_MODEL, field)}" in message


def test_load_checkpoint_ignores_a_different_context_length(small_checkpoint: Path) -> None:
    configured = dataclasses.replace(SMALL_MODEL, context_length=64)
    model = load_checkpoint(configured, small_checkpoint, CPU, torch.float32)
    assert model.cfg.context_length == 64


def test_load_checkpoint_rejects_a_transformers_checkpoint_with_another_rope_base(
    tmp_path: Path,
) -> None:
    saved = dataclasses.replace(SMALL_MODEL, rope_theta=500000.0)
    hf_llama(saved).save_pretrained(tmp_path)
    with pytest.raises(UserError) as error:
        load_checkpoint(SMALL_MODEL, tmp_path, CPU, torch.float32)
    assert "rope_theta" in str(error.value)
    assert "500000" in str(error.value) and "10000" in str(error.value)


def checkpoint_edited(tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A small checkpoint whose model.safetensors went through `edit`; returns its directory."""
    ckpt = write_checkpoint(tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


def test_load_checkpoint_names_the_missing_weight(tmp_path: Path) -> None:
    ckpt = checkpoint_edited(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError) as error:
        load_checkpoint(SMALL_MODEL, ckpt, CPU, torch.float32)
    assert str(ckpt) in str(error.value)
    assert "model.layers.1.mlp.up_proj.weight" in str(error.value)


def test_load_checkpoint_names_the_file_and_key_of_a_wrongly_shaped_tensor(tmp_path: Path) -> None:
    key = "model.layers.0.self_attn.k_proj.weight"
    ckpt = checkpoint_edited(tmp_path, lambda t: t.update({key: torch.zeros(64, 64)}))
    file = ckpt / "model.safetensors"
    with pytest.raises(UserError) as error:
        load_checkpoint(SMALL_MODEL, ckpt, CPU, torch.float32)
    message = str(error.value)
    assert str(file) in message
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "(64, 64)" in message and "(32, 64)" in message


def test_load_checkpoint_names_the_file_and_key_of_an_unexpected_tensor(tmp_path: Path) -> None:
    key = "model.layers.2.mlp.up_proj.weight"
    ckpt = checkpoint_edited(tmp_path, lambda t: t.update({key: torch.zeros(160, 64)}))
    file = ckpt / "model.safetensors"
    with pytest.raises(UserError) as error:
        load_checkpoint(SMALL_MODEL, ckpt, CPU, torch.float32)
    assert str(file) in str(error.value)
    assert "model.layers.2.mlp.up_proj.weight" in str(error.value)


def test_load_checkpoint_names_a_shard_that_the_index_lists_but_is_missing(tmp_path: Path) -> None:
    model = random_model(SMALL_MODEL)
    save_hf(
        model,
        tmp_path,
        tokenizer=TINY_TOKENIZER,
        bos_id=1,
        eos_id=2,
        dtype=torch.float32,
        max_shard_bytes=500_000,
    )
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError) as error:
        load_checkpoint(SMALL_MODEL, tmp_path, CPU, torch.float32)
    assert str(shard) in str(error.value)


def test_load_checkpoint_names_a_truncated_weights_file(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path)
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(UserError) as error:
        load_checkpoint(SMALL_MODEL, ckpt, CPU, torch.float32)
    assert str(file) in str(error.value)


def test_load_checkpoint_without_config_json_is_a_user_error(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json"):
        load_checkpoint(SMALL_MODEL, ckpt, CPU, torch.float32)


def test_load_checkpoint_without_weights_is_a_user_error(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(UserError, match=re.escape(str(ckpt))):
        load_checkpoint(SMALL_MODEL, ckpt, CPU, torch.float32)


# --------------------------------------------------------------------------------------------
# Checkpoint files: sharding and round trips
# --------------------------------------------------------------------------------------------


def test_load_checkpoint_reads_back_what_save_hf_wrote_bit_identically(tmp_path: Path) -> None:
    model = random_model(SMALL_MODEL)
    save_hf(model, tmp_path, tokenizer=TINY_TOKENIZER, bos_id=1, eos_id=2, dtype=torch.float32)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / SAFETENSORS_INDEX).exists()
    assert (tmp_path / "tokenizer.model").read_bytes() == TINY_TOKENIZER.read_bytes()
    loaded = load_checkpoint(SMALL_MODEL, tmp_path, CPU, torch.float32)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_save_hf_shards_above_max_shard_bytes_and_load_checkpoint_reads_them(
    tmp_path: Path,
) -> None:
    model = random_model(GQA_MODEL)
    max_shard_bytes = 100_000  # the embedding and the output layer (256 KiB) exceed it alone
    save_hf(
        model,
        tmp_path,
        tokenizer=TINY_TOKENIZER,
        bos_id=1,
        eos_id=2,
        dtype=torch.float32,
        max_shard_bytes=max_shard_bytes,
    )
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()

    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    state = model.state_dict()
    assert set(index["weight_map"]) == {hf_key(k) for k in state}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            keys = list(f.keys())
            assert keys
            assert all(index["weight_map"][k] == shard for k in keys)
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
            assert size <= max_shard_bytes or len(keys) == 1

    loaded = load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name

    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = random_tokens((1, 15), cfg=GQA_MODEL)
    with torch.no_grad():
        assert max_abs_diff(model(tokens), reference(input_ids=tokens).logits) <= 1e-4


def test_save_hf_writes_the_requested_dtype(tmp_path: Path) -> None:
    model = random_model(SMALL_MODEL)
    save_hf(model, tmp_path, tokenizer=TINY_TOKENIZER, bos_id=1, eos_id=2, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    loaded = load_checkpoint(SMALL_MODEL, tmp_path, CPU, torch.float32)
    weight = model.state_dict()["lm_head.weight"]
    assert torch.equal(loaded.lm_head.weight, weight.to(torch.bfloat16).float())
