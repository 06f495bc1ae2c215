"""LoRA and DoRA adapters: what they train, merging, and PEFT's adapter format and numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from finetune.checkpoint import load_hf
from finetune.config import LORA_TARGETS, LoraConfig
from finetune.data import IGNORE_INDEX
from finetune.errors import ConfigError, UserError
from finetune.lora import LoRALinear, apply_lora, lora_modules, merge_lora
from finetune.loss import chunked_cross_entropy
from finetune.model import Llama
from finetune.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    load_adapter,
    save_adapter,
)
from tests.conftest import SMALL_MODEL, random_tokens, small_model

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0
PROJECTIONS = [t for t in LORA_TARGETS if t != "lm_head"]
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def randomise_adapters(model: Llama, seed: int = 2) -> None:
    """A fresh adapter is the identity (B = 0, m = ‖W‖); give B and m values a trained one has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0.0, 0.05, generator=generator)
            if module.use_dora:
                m = module.lora_magnitude_vector
                m.mul_(1.0 + 0.1 * torch.randn(m.shape, generator=generator))


def lora_model(
    targets: list[str], use_dora: bool, dropout: float = 0.0, rank: int = RANK, seed: int = 0
) -> Llama:
    model = small_model(seed)
    apply_lora(model, LoraConfig(rank, ALPHA, dropout, targets, use_dora))
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_leaves_logits_unchanged(use_dora: bool) -> None:
    tokens = random_tokens()
    expected = small_model()(tokens)
    model = lora_model(list(LORA_TARGETS), use_dora)
    torch.testing.assert_close(model(tokens), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_with_nonzero_b_changes_logits(use_dora: bool) -> None:
    tokens = random_tokens()
    model = lora_model(["v_proj"], use_dora)
    before = model(tokens)
    randomise_adapters(model)
    assert (model(tokens) - before).abs().max() > 1e-3


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_only_adapter_tensors_require_grad(use_dora: bool) -> None:
    model = lora_model(list(LORA_TARGETS), use_dora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_wrapped = SMALL_MODEL.n_layers * len(PROJECTIONS) + 1
    assert len(trainable) == n_wrapped * (3 if use_dora else 2)
    assert all(n.endswith(ADAPTER_SUFFIXES) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_backward_leaves_base_weight_grads_none_and_reaches_every_adapter() -> None:
    model = lora_model(list(LORA_TARGETS), use_dora=True, dropout=0.1)
    randomise_adapters(model)
    model(random_tokens()).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_apply_lora_wraps_exactly_the_named_layers() -> None:
    model = lora_model(["k_proj", "down_proj"], use_dora=False)
    wrapped = sorted(lora_modules(model))
    assert wrapped == sorted(
        f"layers.{i}.{part}" for i in range(2) for part in ("self_attn.k_proj", "mlp.down_proj")
    )
    assert isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize(
    ("targets", "rank", "key"),
    [
        (["q_proj", "qproj"], 4, "lora.targets"),
        ([], 4, "lora.targets"),
        (["q_proj"], 0, "lora.rank"),
    ],
)
def test_apply_lora_rejects_bad_settings_naming_the_key(
    targets: list[str], rank: int, key: str
) -> None:
    with pytest.raises(ConfigError) as error:
        apply_lora(small_model(), LoraConfig(rank, ALPHA, 0.0, targets, False))
    assert error.value.key == key


def test_unknown_target_error_lists_the_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"'qproj'.*q_proj, k_proj, .*, lm_head"):
        apply_lora(small_model(), LoraConfig(RANK, ALPHA, 0.0, ["qproj"], False))


@pytest.mark.parametrize(
    ("targets", "use_dora"),
    [(PROJECTIONS, False), (PROJECTIONS, True), (["lm_head"], False), (["lm_head"], True)],
    ids=["lora", "dora", "lm_head-lora", "lm_head-dora"],
)
def test_lora_merge_matches_unmerged_output(targets: list[str], use_dora: bool) -> None:
    tokens = random_tokens()
    model = lora_model(targets, use_dora)
    randomise_adapters(model)
    unmerged = model(tokens)
    merge_lora(model)
    torch.testing.assert_close(model(tokens), unmerged, rtol=0, atol=1e-5)
    assert not lora_modules(model)
    # A plain Llama's state dict again, so save_hf writes a normal checkpoint.
    assert model.state_dict().keys() == small_model().state_dict().keys()


def test_adapter_state_dict_uses_peft_key_names_and_shapes() -> None:
    model = lora_model(["q_proj", "lm_head"], use_dora=True)
    state = adapter_state_dict(model)
    dim, vocab = SMALL_MODEL.dim, SMALL_MODEL.vocab_size
    q_out = SMALL_MODEL.n_heads * SMALL_MODEL.head_dim
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert state[f"{q}.lora_A.weight"].shape == (RANK, dim)
    assert state[f"{q}.lora_B.weight"].shape == (q_out, RANK)
    assert state[f"{q}.lora_magnitude_vector"].shape == (q_out,)
    assert state["base_model.model.lm_head.lora_B.weight"].shape == (vocab, RANK)
    assert len(state) == (SMALL_MODEL.n_layers + 1) * 3


def peft_model(checkpoint: Path, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """transformers' model of the checkpoint with the adapter loaded by PEFT."""
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def saved_lora_model(
    checkpoint: Path, out_dir: Path, use_dora: bool, dropout: float = 0.0
) -> Llama:
    """Our model of the checkpoint with random adapters on every target, also saved to out_dir."""
    model = load_hf(SMALL_MODEL, checkpoint, CPU, torch.float32)
    apply_lora(model, LoraConfig(RANK, ALPHA, dropout, list(LORA_TARGETS), use_dora))
    randomise_adapters(model)
    save_adapter(
        model,
        out_dir,
        str(checkpoint),
        LoraConfig(RANK, ALPHA, dropout, list(LORA_TARGETS), use_dora),
    )
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_loads_the_saved_adapter_with_the_same_logits_and_gradients(
    small_checkpoint: Path, tmp_path: Path, use_dora: bool
) -> None:
    """Equal gradients also check that DoRA's weight norm is a constant to autograd, as in PEFT."""
    model = saved_lora_model(small_checkpoint, tmp_path, use_dora).eval()
    reference = peft_model(small_checkpoint, tmp_path, trainable=True).eval()
    tokens = random_tokens()
    ours, theirs = model(tokens), reference(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)

    # A loss that weighs every logit differently, so no gradient cancels by symmetry.
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    their_grads = {
        # PEFT's parameter names carry the adapter's name ("default") and a module's `.weight`.
        name.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector"): p.grad
        for name, p in reference.named_parameters()
        if p.requires_grad
    }
    our_grads = {key: p.grad for key, p in adapter_state_dict(model).items()}
    assert our_grads.keys() == their_grads.keys()
    for key, grad in our_grads.items():
        # Relative to the largest entry: the two sum in different orders.
        atol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(grad, their_grads[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dropout_in_training_mode_matches_peft_under_the_same_seed(
    small_checkpoint: Path, tmp_path: Path, use_dora: bool
) -> None:
    """Both draw one dropout mask per adapted layer in the same order, so equal seeds give equal
    masks: this checks where dropout applies, DoRA's dropout form included."""
    model = saved_lora_model(small_checkpoint, tmp_path, use_dora, dropout=0.3).train()
    reference = peft_model(small_checkpoint, tmp_path, trainable=True).train()
    tokens = random_tokens()
    with torch.no_grad():
        torch.manual_seed(5)
        ours = model(tokens)
        torch.manual_seed(5)
        theirs = reference(tokens).logits
        torch.manual_seed(6)
        assert (model(tokens) - ours).abs().max() > 1e-3  # dropout is really on
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_adapter_config_has_peft_fields(tmp_path: Path) -> None:
    model = lora_model(["q_proj", "v_proj"], use_dora=True)
    save_adapter(
        model, tmp_path, "/ckpt", LoraConfig(RANK, ALPHA, 0.05, ["v_proj", "q_proj"], True)
    )
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert (
        config
        | {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": RANK,
            "lora_alpha": ALPHA,
            "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"],
            "use_dora": True,
            "bias": "none",
            "base_model_name_or_path": "/ckpt",
        }
        == config
    )
    assert (tmp_path / ADAPTER_WEIGHTS).is_file()


def test_load_adapter_reads_an_adapter_saved_by_peft(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    """PEFT's own file also holds lm_head's base weight; load_adapter must take the adapters."""
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(small_checkpoint, dtype=torch.float32)
    targets = ["o_proj", "up_proj", "lm_head"]
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, use_dora=True, task_type="CAUSAL_LM"
    )
    reference = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    reference.save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / ADAPTER_WEIGHTS)

    model = load_hf(SMALL_MODEL, small_checkpoint, CPU, torch.float32)
    apply_lora(model, LoraConfig(RANK, ALPHA, 0.0, targets, True))
    load_adapter(model, tmp_path)
    tokens = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=1e-4)


def test_load_adapter_round_trip_restores_identical_tensors(tmp_path: Path) -> None:
    model = lora_model(list(LORA_TARGETS), use_dora=True)
    randomise_adapters(model)
    save_adapter(model, tmp_path, "base", LoraConfig(RANK, ALPHA, 0.0, list(LORA_TARGETS), True))
    resumed = lora_model(list(LORA_TARGETS), use_dora=True, seed=1)
    load_adapter(resumed, tmp_path)
    saved, loaded = adapter_state_dict(model), adapter_state_dict(resumed)
    assert saved.keys() == loaded.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


def test_load_adapter_of_another_rank_names_the_config_file_and_key(tmp_path: Path) -> None:
    model = lora_model(["q_proj"], use_dora=False, rank=4)
    save_adapter(model, tmp_path, "base", LoraConfig(4, ALPHA, 0.0, ["q_proj"], False))
    with pytest.raises(UserError, match=rf"{ADAPTER_CONFIG}: r is 4 .* has 8"):
        load_adapter(lora_model(["q_proj"], use_dora=False, rank=8), tmp_path)


def test_load_adapter_of_other_targets_names_target_modules(tmp_path: Path) -> None:
    model = lora_model(["q_proj"], use_dora=False)
    save_adapter(model, tmp_path, "base", LoraConfig(RANK, ALPHA, 0.0, ["q_proj"], False))
    with pytest.raises(UserError, match=rf"{ADAPTER_CONFIG}: target_modules"):
        load_adapter(lora_model(["q_proj", "v_proj"], use_dora=False), tmp_path)


def test_load_adapter_names_the_file_and_key_of_a_wrongly_shaped_tensor(tmp_path: Path) -> None:
    model = lora_model(["q_proj"], use_dora=False)
    save_adapter(model, tmp_path, "base", LoraConfig(RANK, ALPHA, 0.0, ["q_proj"], False))
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(RANK + 1, SMALL_MODEL.dim)
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(UserError, match=rf"{ADAPTER_WEIGHTS}: {key} has shape \(5, 64\)"):
        load_adapter(lora_model(["q_proj"], use_dora=False), tmp_path)


def test_load_adapter_names_a_missing_tensor(tmp_path: Path) -> None:
    model = lora_model(["q_proj"], use_dora=True)
    save_adapter(model, tmp_path, "base", LoraConfig(RANK, ALPHA, 0.0, ["q_proj"], True))
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    del tensors[key]
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(UserError, match=rf"{ADAPTER_WEIGHTS}: missing 1 .*{key}"):
        load_adapter(lora_model(["q_proj"], use_dora=True), tmp_path)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_with_fp32_adapters_trains_under_autocast(use_dora: bool) -> None:
    model = small_model().to(torch.bfloat16)
    apply_lora(model, LoraConfig(RANK, ALPHA, 0.1, list(LORA_TARGETS), use_dora))
    check_bf16_base_trains_under_autocast_and_merges(model)


def check_bf16_base_trains_under_autocast_and_merges(model: Llama) -> None:
    """A bf16 base with fp32 adapters: trains under autocast with fp32 adapter gradients and no
    base gradients, evaluates without autocast (bf16 activations meet fp32 adapters), and merges
    to bf16 weights with the same output."""
    randomise_adapters(model)
    tokens = random_tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = chunked_cross_entropy(model.hidden_states(tokens), model.output_weight(), tokens)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None, name
            assert p.grad.dtype == torch.float32 and p.grad.isfinite().all(), name
        else:
            assert p.dtype == torch.bfloat16 and p.grad is None, name

    model.eval()
    with torch.no_grad():
        plain = model(tokens)
        merge_lora(model)
        merged = model(tokens)
    assert plain.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(merged, plain, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_output_weight_gives_the_chunked_loss_the_full_logits_gradients(
    monkeypatch: pytest.MonkeyPatch, use_dora: bool
) -> None:
    # Several chunks, so that the weight gradient is accumulated across them.
    monkeypatch.setattr("finetune.loss.LOGITS_PER_CHUNK", SMALL_MODEL.vocab_size * 5)
    model = lora_model(["v_proj", "lm_head"], use_dora)
    randomise_adapters(model)
    tokens = random_tokens()
    targets = random_tokens(seed=3)
    targets[:, :3] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]

    chunked = chunked_cross_entropy(model.hidden_states(tokens), model.output_weight(), targets)
    chunked_grads = torch.autograd.grad(chunked, params)
    logits = model(tokens)
    full = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    full_grads = torch.autograd.grad(full, params)

    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    head = model.lm_head
    assert isinstance(head, LoRALinear)
    lm_head_grads = {id(p) for p in head.adapter_parameters().values()}
    for p, ours, expected in zip(params, chunked_grads, full_grads, strict=True):
        # Relative to the largest entry: summation order differs between the two paths.
        scale = expected.abs().max().item()
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * scale)
        if id(p) in lm_head_grads:
            assert ours.abs().sum() > 0


def test_output_weight_without_an_lm_head_adapter_is_the_base_weight() -> None:
    model = lora_model(["q_proj"], use_dora=False)
    assert model.output_weight() is model.lm_head.weight
