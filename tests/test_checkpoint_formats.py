"""Checkpoint formats in and out: Hugging Face safetensors and .bin, Meta's consolidated shards.

Every checkpoint here is made by the tests: Hugging Face ones by transformers (or as transformers
4 wrote .bin files, which transformers 5 no longer writes but still reads), Meta ones by a writer
in this file that follows Meta's layout independently of finetune's. Meta-format numbers are
checked against a small Meta-style forward pass written here, not against our own model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from finetune.checkpoint import load_checkpoint
from finetune.checkpoint_files import CheckpointFormat, find_checkpoint
from finetune.config import ModelConfig
from finetune.errors import UserError
from finetune.hf_format import hf_key, save_hf
from finetune.loss import chunked_cross_entropy
from finetune.meta_format import (
    halves_from_pairs,
    meta_ffn_dim,
    pairs_from_halves,
    params_json,
    save_meta,
)
from finetune.recipes import full
from finetune.training import build_optimizer
from tests.conftest import (
    TINY_TOKENIZER,
    compose_config,
    max_abs_diff,
    model_overrides,
    random_tokens,
    small_params,
)
from tests.test_model import GQA_MODEL, hf_llama, random_model

CPU = torch.device("cpu")

# A Llama-2-like model as Meta would describe it: vocabulary left to the tokenizer, the
# feed-forward width from the formula (int(8 * 64 / 3) = 170, rounded up to a multiple of 32).
META_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 32,
    "norm_eps": 1e-05,
    "vocab_size": -1,
}
META_MODEL = ModelConfig(
    vocab_size=1024,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=192,
    norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=4096,  # Llama-2's, which a params.json without max_seq_len means
)
# Meta's model-parallel slicing, by module (see REFERENCE.md), written out again for the tests.
SPLIT_ALONG_ROWS = {"wq", "wk", "wv", "w1", "w3", "output"}
SPLIT_ALONG_COLUMNS = {"wo", "w2", "tok_embeddings"}


# --------------------------------------------------------------------------------------------
# Checkpoint writers and a Meta-style reference forward
# --------------------------------------------------------------------------------------------


def random_meta_weights(
    cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights under Meta's names, as a Meta checkpoint holds them (rope.freqs included)."""
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int, std: float = 0.15) -> torch.Tensor:
        return (std * torch.randn(rows, cols, generator=generator)).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.3 * torch.randn(cfg.dim, generator=generator)).to(dtype)

    hd, kv = cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    weights = {"tok_embeddings.weight": matrix(cfg.vocab_size, cfg.dim, std=1.0)}
    for i in range(cfg.n_layers):
        weights |= {
            f"layers.{i}.attention.wq.weight": matrix(cfg.n_heads * hd, cfg.dim),
            f"layers.{i}.attention.wk.weight": matrix(kv, cfg.dim),
            f"layers.{i}.attention.wv.weight": matrix(kv, cfg.dim),
            f"layers.{i}.attention.wo.weight": matrix(cfg.dim, cfg.n_heads * hd),
            f"layers.{i}.feed_forward.w1.weight": matrix(cfg.ffn_dim, cfg.dim),
            f"layers.{i}.feed_forward.w2.weight": matrix(cfg.dim, cfg.ffn_dim),
            f"layers.{i}.feed_forward.w3.weight": matrix(cfg.ffn_dim, cfg.dim),
            f"layers.{i}.attention_norm.weight": norm(),
            f"layers.{i}.ffn_norm.weight": norm(),
        }
    weights["norm.weight"] = norm()
    weights["output.weight"] = matrix(cfg.vocab_size, cfg.dim)
    weights["rope.freqs"] = (1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))).to(
        dtype
    )
    return weights


def meta_shards(weights: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split weights into model-parallel files the way Meta's are split."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, tensor in weights.items():
        module = key.split(".")[-2]
        if module in SPLIT_ALONG_ROWS | SPLIT_ALONG_COLUMNS:
            dim = 0 if module in SPLIT_ALONG_ROWS else 1
            size = tensor.shape[dim] // n_shards
            pieces = [tensor.narrow(dim, i * size, size).clone() for i in range(n_shards)]
        else:
            pieces = [tensor.clone() for _ in range(n_shards)]
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece
    return shards


def write_meta(
    directory: Path,
    weights: dict[str, torch.Tensor],
    n_shards: int = 1,
    params: dict | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(meta_shards(weights, n_shards)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params or META_PARAMS))
    return directory


def meta_forward(
    weights: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor
) -> torch.Tensor:
    """Logits of a Meta-layout Llama-2: rotary embedding on adjacent pairs as complex numbers."""
    n_heads, dim = params["n_heads"], params["dim"]
    n_kv_heads = params.get("n_kv_heads", n_heads)
    hd, eps = dim // n_heads, params["norm_eps"]
    batch, seq = tokens.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
    rotations = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x: torch.Tensor) -> torch.Tensor:  # (batch, seq, heads, hd)
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(pairs * rotations[None, :, None, :]).flatten(3)

    w = weights
    h = w["tok_embeddings.weight"][tokens]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        q = rotate((x @ w[p + "attention.wq.weight"].T).view(batch, seq, n_heads, hd))
        k = rotate((x @ w[p + "attention.wk.weight"].T).view(batch, seq, n_kv_heads, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(batch, seq, n_kv_heads, hd)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + causal
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, dim)
        h = h + attended @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"])
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["output.weight"].T


def save_bin(model: PreTrainedModel, directory: Path, max_shard_size: str | None = None) -> Path:
    """`pytorch_model.bin`, or shards with `pytorch_model.bin.index.json`, as transformers 4's
    `save_pretrained(safe_serialization=False)` wrote them (transformers 5 writes only
    safetensors)."""
    model.config.save_pretrained(directory)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size or "50GB"
    )
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name].contiguous() for name in names}, directory / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def transformers_checkpoint(directory: Path, layout: str, seed: int = 5) -> PreTrainedModel:
    """A random transformers Llama (GQA) saved in `layout`; returns the model."""
    reference = hf_llama(GQA_MODEL)
    reference.load_state_dict(
        {hf_key(k): v for k, v in random_model(GQA_MODEL, seed).state_dict().items()}
    )
    if layout == "safetensors":
        reference.save_pretrained(directory)
    elif layout == "sharded safetensors":
        reference.save_pretrained(directory, max_shard_size="100KB")
    elif layout == "bin":
        save_bin(reference, directory)
    else:
        save_bin(reference, directory, max_shard_size="100KB")
    return reference


def equal_state_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def load_meta_files(directory: Path) -> list[dict[str, torch.Tensor]]:
    shards = sorted(directory.glob("consolidated.*.pth"))
    return [torch.load(f, weights_only=True) for f in shards]


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints: same numbers as transformers
# --------------------------------------------------------------------------------------------

# layout -> (the format detected, the file that lists the weights)
HF_LAYOUTS = {
    "safetensors": (CheckpointFormat.hf_safetensors, "model.safetensors"),
    "sharded safetensors": (CheckpointFormat.hf_safetensors, "model.safetensors.index.json"),
    "bin": (CheckpointFormat.hf_bin, "pytorch_model.bin"),
    "sharded bin": (CheckpointFormat.hf_bin, "pytorch_model.bin.index.json"),
}


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_transformers_checkpoints_load_with_equal_weights_and_logits(
    tmp_path: Path, layout: str
) -> None:
    reference = transformers_checkpoint(tmp_path, layout)
    expected_format, listing = HF_LAYOUTS[layout]
    found = find_checkpoint(tmp_path)
    assert (found.format, found.listing.name) == (expected_format, listing)
    if layout.startswith("sharded"):
        assert len(found.weights) >= 3

    ours = load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32).eval()
    theirs = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[hf_key(name)]), name
    tokens = random_tokens((2, 21), cfg=GQA_MODEL)
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        assert expected.abs().max() > 1.0
        assert max_abs_diff(ours(tokens), expected) <= 1e-4


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_one_training_step_gives_the_same_losses_as_transformers(
    tmp_path: Path, layout: str
) -> None:
    transformers_checkpoint(tmp_path, layout)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).train()
    ours = load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32).train()
    tokens = random_tokens((2, 24), cfg=GQA_MODEL)
    labels = tokens.clone()
    labels[:, :7] = -100  # a prompt that is not trained on
    labels[1, 18:] = -100  # padding
    # transformers shifts the labels itself; our targets are already the next position's label.
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)

    def our_loss() -> torch.Tensor:
        summed = chunked_cross_entropy(ours.hidden_states(tokens), ours.lm_head.weight, targets)
        return summed / (targets != -100).sum()

    def their_loss() -> torch.Tensor:
        return theirs(input_ids=tokens, labels=labels).loss

    losses = []
    for model, loss in ((ours, our_loss), (theirs, their_loss)):
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
        before = loss()
        before.backward()
        optimizer.step()
        with torch.no_grad():
            losses.append((before.item(), loss().item()))

    (ours_before, ours_after), (theirs_before, theirs_after) = losses
    assert ours_before == pytest.approx(theirs_before, abs=1e-5)
    assert ours_after == pytest.approx(theirs_after, abs=1e-4)
    assert ours_after < ours_before - 0.01  # the step changed the model


# --------------------------------------------------------------------------------------------
# Meta checkpoints: same numbers as a Meta-style forward pass
# --------------------------------------------------------------------------------------------


def test_rotary_rows_go_from_adjacent_pairs_to_halves_and_back() -> None:
    head_dim = 4
    meta_rows = torch.arange(2 * head_dim, dtype=torch.float32)[:, None]  # two heads
    ours = halves_from_pairs(meta_rows, head_dim)
    # Per head, Meta's pairs (0, 1), (2, 3) become our pairs (0, 2), (1, 3).
    assert ours.flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(pairs_from_halves(ours, head_dim), meta_rows)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_logits_equal_a_meta_style_forward(tmp_path: Path, n_shards: int) -> None:
    weights = random_meta_weights(META_MODEL, seed=2)
    write_meta(tmp_path, weights, n_shards)
    assert find_checkpoint(tmp_path).format is CheckpointFormat.meta
    ours = load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32).eval()
    tokens = random_tokens((2, 19), cfg=META_MODEL)
    with torch.no_grad():
        expected = meta_forward(weights, META_PARAMS, tokens)
        assert expected.abs().max() > 1.0
        assert max_abs_diff(ours(tokens), expected) <= 1e-4


def test_four_meta_shards_load_the_same_weights_as_one(tmp_path: Path) -> None:
    # Four-way model parallelism needs four key/value heads.
    cfg = dataclasses.replace(META_MODEL, n_kv_heads=4)
    params = {**META_PARAMS, "n_kv_heads": 4, "rope_theta": 500.0}
    cfg = dataclasses.replace(cfg, rope_theta=500.0)
    weights = random_meta_weights(cfg, seed=4)
    one = load_checkpoint(cfg, write_meta(tmp_path / "one", weights, 1, params), CPU, torch.float32)
    four = load_checkpoint(cfg, write_meta(tmp_path / "4", weights, 4, params), CPU, torch.float32)
    assert equal_state_dicts(one.state_dict(), four.state_dict())
    tokens = random_tokens((1, 11), cfg=cfg)
    with torch.no_grad():
        assert max_abs_diff(four(tokens), meta_forward(weights, params, tokens)) <= 1e-4


def test_meta_bf16_weights_load_into_the_requested_dtype(tmp_path: Path) -> None:
    weights = random_meta_weights(META_MODEL, dtype=torch.bfloat16)
    write_meta(tmp_path, weights, n_shards=2)
    model = load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.norm.weight, weights["norm.weight"].float())
    assert torch.equal(model.lm_head.weight, weights["output.weight"].float())


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


def test_meta_to_finetune_to_hf_to_finetune_to_meta_is_bit_identical(tmp_path: Path) -> None:
    weights = random_meta_weights(META_MODEL, seed=6, dtype=torch.bfloat16)
    write_meta(tmp_path / "meta", weights)
    model = load_checkpoint(META_MODEL, tmp_path / "meta", CPU, torch.float32)
    save_hf(
        model, tmp_path / "hf", tokenizer=TINY_TOKENIZER, bos_id=1, eos_id=2, dtype=torch.bfloat16
    )
    again = load_checkpoint(META_MODEL, tmp_path / "hf", CPU, torch.float32)
    save_meta(again, tmp_path / "meta_out", TINY_TOKENIZER, torch.bfloat16)

    (written,) = load_meta_files(tmp_path / "meta_out")
    assert equal_state_dicts(written, weights)
    params = json.loads((tmp_path / "meta_out" / "params.json").read_text())
    assert params["vocab_size"] == META_MODEL.vocab_size
    assert meta_ffn_dim(params["dim"], params["multiple_of"], None) == META_MODEL.ffn_dim
    assert (tmp_path / "meta_out" / "tokenizer.model").read_bytes() == TINY_TOKENIZER.read_bytes()


def test_hf_to_finetune_to_meta_to_finetune_to_hf_is_bit_identical(tmp_path: Path) -> None:
    transformers_checkpoint(tmp_path / "hf", "sharded safetensors")
    model = load_checkpoint(GQA_MODEL, tmp_path / "hf", CPU, torch.float32)
    save_meta(model, tmp_path / "meta", TINY_TOKENIZER, torch.float32)
    again = load_checkpoint(GQA_MODEL, tmp_path / "meta", CPU, torch.float32)
    save_hf(
        again,
        tmp_path / "hf_out",
        tokenizer=TINY_TOKENIZER,
        bos_id=1,
        eos_id=2,
        dtype=torch.float32,
    )
    original = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        original |= load_file(file)
    assert equal_state_dicts(load_file(tmp_path / "hf_out" / "model.safetensors"), original)


def test_save_meta_in_two_shards_splits_as_meta_does(tmp_path: Path) -> None:
    weights = random_meta_weights(META_MODEL, seed=8)
    model = load_checkpoint(META_MODEL, write_meta(tmp_path / "in", weights), CPU, torch.float32)
    save_meta(model, tmp_path / "out", TINY_TOKENIZER, torch.float32, n_shards=2)
    written = load_meta_files(tmp_path / "out")
    expected = meta_shards(weights, 2)
    assert len(written) == 2
    assert all(equal_state_dicts(w, e) for w, e in zip(written, expected, strict=True))


def test_meta_shards_hold_only_their_own_slices(tmp_path: Path) -> None:
    """torch.save writes whole storages: a slice saved as it is would carry the whole tensor."""
    model = random_model(META_MODEL)
    save_meta(model, tmp_path / "one", TINY_TOKENIZER, torch.float32)
    save_meta(model, tmp_path / "two", TINY_TOKENIZER, torch.float32, n_shards=2)
    one = (tmp_path / "one" / "consolidated.00.pth").stat().st_size
    two = sum(f.stat().st_size for f in (tmp_path / "two").glob("consolidated.*.pth"))
    assert two < 1.1 * one


# --------------------------------------------------------------------------------------------
# params.json
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "multiple_of", "multiplier", "width"),
    [(4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672)],
)
def test_feed_forward_width_follows_metas_formula_for_llama2(
    dim: int, multiple_of: int, multiplier: float | None, width: int
) -> None:
    assert meta_ffn_dim(dim, multiple_of, multiplier) == width


@pytest.mark.parametrize("option", ["tiny", "llama2", "llama2_13b", "llama2_70b"])
def test_written_params_json_describes_each_configured_model(option: str) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_config([f"model={option}"]).model)
    params = params_json(cfg)
    width = meta_ffn_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
    assert width == cfg.ffn_dim
    assert (params["n_heads"], params["n_kv_heads"], params["vocab_size"]) == (
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.vocab_size,
    )
    # Llama-2's reference code takes no rope_theta key; its base is fixed at 10000.
    assert "rope_theta" not in params
    if option == "llama2":
        assert params["multiple_of"] == 256 and "ffn_dim_multiplier" not in params


def test_written_params_json_reproduces_any_feed_forward_width() -> None:
    for dim in (8, 64, 96, 256, 4096):
        for ffn_dim in range(dim, 4 * dim, max(1, dim // 7)):
            cfg = dataclasses.replace(
                META_MODEL, dim=dim, n_heads=dim // 8, n_kv_heads=dim // 8, ffn_dim=ffn_dim
            )
            params = params_json(cfg)
            multiplier = params.get("ffn_dim_multiplier")
            assert meta_ffn_dim(dim, params["multiple_of"], multiplier) == ffn_dim, (dim, ffn_dim)


# --------------------------------------------------------------------------------------------
# Errors: one line naming the file, the field or key, and both values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "described"),
    [
        ("dim", 128, "dim=64"),
        ("n_layers", 3, "n_layers=2"),
        ("n_heads", 8, "n_heads=4"),
        ("n_kv_heads", 4, "n_kv_heads=2"),
        ("ffn_dim", 160, "multiple_of=32, ffn_dim_multiplier=None (feed-forward width 192)"),
        ("norm_eps", 1e-6, "norm_eps=1e-05"),
        ("rope_theta", 500000.0, "rope_theta=10000.0"),
    ],
)
def test_a_meta_checkpoint_of_another_architecture_is_rejected_by_field(
    tmp_path: Path, field: str, value: object, described: str
) -> None:
    write_meta(tmp_path, random_meta_weights(META_MODEL))
    configured = dataclasses.replace(META_MODEL, **{field: value})
    with pytest.raises(UserError) as error:
        load_checkpoint(configured, tmp_path, CPU, torch.float32)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'params.json'}: {described} but model.{field}={value}")


def test_a_meta_vocab_size_is_checked_when_params_json_gives_one(tmp_path: Path) -> None:
    write_meta(
        tmp_path, random_meta_weights(META_MODEL), params={**META_PARAMS, "vocab_size": 1024}
    )
    configured = dataclasses.replace(META_MODEL, vocab_size=1000)
    with pytest.raises(
        UserError, match=r"params\.json: vocab_size=1024 but model\.vocab_size=1000"
    ):
        load_checkpoint(configured, tmp_path, CPU, torch.float32)


def test_an_embedding_of_another_vocabulary_names_file_key_and_shapes(tmp_path: Path) -> None:
    write_meta(tmp_path, random_meta_weights(META_MODEL))  # vocab_size -1: the tokenizer's
    configured = dataclasses.replace(META_MODEL, vocab_size=1000)
    with pytest.raises(UserError) as error:
        load_checkpoint(configured, tmp_path, CPU, torch.float32)
    assert str(error.value) == (
        f"{tmp_path / 'consolidated.00.pth'}: tok_embeddings.weight has shape (1024, 64), "
        f"expected (1000, 64)"
    )


def test_a_tokenizer_whose_vocabulary_differs_from_the_embedding_is_rejected(
    tmp_path: Path,
) -> None:
    write_meta(
        tmp_path / "meta", random_meta_weights(META_MODEL)
    )  # 1024 tokens, the tokenizer 4096
    params = small_params(
        tmp_path / "meta",
        tmp_path / "out",
        *model_overrides(META_MODEL),
        f"tokenizer={TINY_TOKENIZER}",
    )
    with pytest.raises(UserError) as error:
        full.run(params)
    message = str(error.value)
    assert str(TINY_TOKENIZER) in message and "4096" in message and "1024" in message


@pytest.mark.parametrize("n_shards", [1, 2])
def test_a_missing_meta_weight_names_the_shard_and_key(tmp_path: Path, n_shards: int) -> None:
    weights = random_meta_weights(META_MODEL)
    del weights["layers.1.feed_forward.w3.weight"]
    write_meta(tmp_path, weights, n_shards)
    with pytest.raises(UserError) as error:
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)
    assert str(error.value).startswith(
        f"{tmp_path / 'consolidated.00.pth'}: missing 'layers.1.feed_forward.w3.weight'"
    )


def test_an_unexpected_meta_weight_names_the_shard_and_key(tmp_path: Path) -> None:
    weights = random_meta_weights(META_MODEL)
    weights["layers.2.attention.wq.weight"] = weights["layers.1.attention.wq.weight"]
    write_meta(tmp_path, weights)
    with pytest.raises(UserError) as error:
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)
    assert str(error.value) == (
        f"{tmp_path / 'consolidated.00.pth'}: unexpected key 'layers.2.attention.wq.weight' "
        f"for a Llama model"
    )


def test_a_wrongly_shaped_meta_slice_names_its_shard(tmp_path: Path) -> None:
    write_meta(tmp_path, random_meta_weights(META_MODEL), n_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w2.weight"] = torch.zeros(64, 64)
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(UserError) as error:
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)
    assert str(error.value) == (
        f"{tmp_path / 'consolidated.01.pth'}: layers.0.feed_forward.w2.weight has shape (64, 64), "
        f"expected (64, 96)"
    )


def test_meta_shards_with_different_keys_name_the_odd_one(tmp_path: Path) -> None:
    write_meta(tmp_path, random_meta_weights(META_MODEL), n_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    del shard["norm.weight"]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(UserError) as error:
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)
    assert str(error.value).startswith(f"{tmp_path / 'consolidated.01.pth'}: missing 'norm.weight'")


def test_a_gap_in_the_meta_shard_numbers_names_the_missing_shard(tmp_path: Path) -> None:
    write_meta(tmp_path, random_meta_weights(META_MODEL), n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(UserError, match=r"consolidated\.01\.pth: missing"):
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)


def test_meta_shards_without_params_json_are_a_user_error(tmp_path: Path) -> None:
    write_meta(tmp_path, random_meta_weights(META_MODEL))
    (tmp_path / "params.json").unlink()
    with pytest.raises(UserError, match=r"consolidated\.00\.pth but no params\.json"):
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)


def test_a_directory_without_a_checkpoint_names_both_formats(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(UserError) as error:
        load_checkpoint(META_MODEL, tmp_path, CPU, torch.float32)
    message = str(error.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("config.json", "params.json", "consolidated.00.pth"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("delete", "missing 'model.layers.1.mlp.up_proj.weight'"),
        ("extra", "unexpected key 'model.layers.2.mlp.up_proj.weight'"),
        ("reshape", "model.layers.1.mlp.up_proj.weight has shape (64, 64), expected (160, 64)"),
    ],
)
def test_bin_checkpoint_errors_name_the_file_and_key(
    tmp_path: Path, change: str, expected: str
) -> None:
    transformers_checkpoint(tmp_path, "bin")
    file = tmp_path / "pytorch_model.bin"
    state = torch.load(file, weights_only=True)
    key = "model.layers.1.mlp.up_proj.weight"
    if change == "delete":
        del state[key]
    elif change == "extra":
        state["model.layers.2.mlp.up_proj.weight"] = state[key]
    else:
        state[key] = torch.zeros(64, 64)
    torch.save(state, file)
    with pytest.raises(UserError) as error:
        load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32)
    assert str(error.value).startswith(f"{file}: {expected}")


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_rotary_inv_freq_buffers_of_older_transformers_are_skipped(
    tmp_path: Path, layout: str
) -> None:
    # Llama-2's Hugging Face files were written by transformers < 4.31, which saved these.
    reference = transformers_checkpoint(tmp_path, layout)
    head_dim = GQA_MODEL.dim // GQA_MODEL.n_heads
    buffers = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(head_dim // 2)
        for i in range(GQA_MODEL.n_layers)
    }
    if layout == "safetensors":
        weights = load_file(tmp_path / "model.safetensors")
        save_file({**weights, **buffers}, tmp_path / "model.safetensors")
    else:
        weights = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        torch.save({**weights, **buffers}, tmp_path / "pytorch_model.bin")

    ours = load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32)
    theirs = reference.state_dict()
    assert all(torch.equal(t, theirs[hf_key(name)]) for name, t in ours.state_dict().items())


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("{not json", "config.json: not valid JSON (Expecting property name"),
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        (
            {"rope_scaling": {"type": "linear", "factor": 4.0}},
            'config.json: rope_scaling={"type": "linear", "factor": 4.0} is not supported',
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
            'config.json: rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta"',
        ),
    ],
)
def test_a_config_json_that_does_not_describe_a_llama_2_is_a_user_error(
    tmp_path: Path, config: str | dict, expected: str
) -> None:
    transformers_checkpoint(tmp_path, "safetensors")
    path = tmp_path / "config.json"
    if isinstance(config, dict):
        config = json.dumps({**json.loads(path.read_text()), **config})
    path.write_text(config)
    with pytest.raises(UserError) as error:
        load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32)
    assert str(error.value).startswith(f"{tmp_path}/{expected}"), str(error.value)


def test_a_bin_shard_that_the_index_lists_but_is_missing_is_named(tmp_path: Path) -> None:
    transformers_checkpoint(tmp_path, "sharded bin")
    shard = sorted(tmp_path.glob("pytorch_model-*.bin"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard}: missing, but pytorch_model.bin.index.json"):
        load_checkpoint(GQA_MODEL, tmp_path, CPU, torch.float32)


class _TouchOnUnpickle:
    """Unpickling this object would create a file: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("layout", ["bin", "meta"])
def test_loading_never_runs_code_from_a_pickled_file(tmp_path: Path, layout: str) -> None:
    directory, marker = tmp_path / "ckpt", tmp_path / "code_ran"
    if layout == "bin":
        transformers_checkpoint(directory, "bin")
        file = directory / "pytorch_model.bin"
    else:
        write_meta(directory, random_meta_weights(META_MODEL))
        file = directory / "consolidated.00.pth"
    state = torch.load(file, weights_only=True)
    torch.save({**state, "payload": _TouchOnUnpickle(marker)}, file)
    with pytest.raises(UserError) as error:
        load_checkpoint(GQA_MODEL if layout == "bin" else META_MODEL, directory, CPU, torch.float32)
    assert str(error.value).startswith(f"{file}: holds Python objects other than tensors")
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# Lean loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["safetensors", "bin", "meta"])
def test_loaded_weights_are_copies_independent_of_the_files(
    tmp_path: Path, layout: str, dtype: torch.dtype
) -> None:
    """Weights read through a memory map must not stay views of it: overwriting the files after
    loading leaves them unchanged, and each owns exactly its own memory."""
    if layout == "meta":
        write_meta(tmp_path, random_meta_weights(META_MODEL), n_shards=1)
        cfg = META_MODEL
    else:
        transformers_checkpoint(tmp_path, layout)
        cfg = GQA_MODEL
    model = load_checkpoint(cfg, tmp_path, CPU, dtype)  # the files hold fp32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for file in [*tmp_path.glob("*.safetensors"), *tmp_path.glob("*.bin"), *tmp_path.glob("*.pth")]:
        with open(file, "r+b") as f:
            f.write(bytes(os.path.getsize(file)))
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == dtype
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        assert torch.equal(tensor, before[name]), name


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def test_recipe_fine_tunes_a_meta_checkpoint_and_also_writes_meta_format(tmp_path: Path) -> None:
    cfg = dataclasses.replace(META_MODEL, vocab_size=4096)  # the shipped tokenizer's
    write_meta(tmp_path / "meta", random_meta_weights(cfg, seed=3))
    params = small_params(
        tmp_path / "meta",
        tmp_path / "out",
        *model_overrides(cfg),
        f"tokenizer={TINY_TOKENIZER}",
        "max_steps=1",
        "output_format=meta",
    )
    full.run(params)

    meta_dir = tmp_path / "out" / "model_meta"
    assert sorted(p.name for p in meta_dir.iterdir()) == [
        "consolidated.00.pth",
        "params.json",
        "tokenizer.model",
    ]
    assert json.loads((meta_dir / "params.json").read_text())["vocab_size"] == 4096
    from_meta = load_checkpoint(cfg, meta_dir, CPU, torch.float32)
    from_hf = load_checkpoint(cfg, tmp_path / "out" / "model", CPU, torch.float32)
    assert equal_state_dicts(from_meta.state_dict(), from_hf.state_dict())
