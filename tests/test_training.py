"""Loss, optimizer, schedule, step counting, the optimizer step with gradient accumulation, and
what a recipe plugs into the shared loop (its loss, its batches, its registry entry)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.config import RECIPES, DatasetConfig, DType, FullFinetuneParams, Recipe, recipe_of
from finetune.data import IGNORE_INDEX, Batch, Example, collate
from finetune.loss import LOGITS_PER_CHUNK, chunked_cross_entropy
from finetune.model import Llama
from finetune.schedule import lr_multiplier, steps_per_epoch, total_steps
from finetune.training import (
    build_optimizer,
    evaluate,
    next_token_loss,
    optimizer_steps,
    train_step,
)
from tests.conftest import SMALL_MODEL, small_model, write_jsonl

CPU = torch.device("cpu")
VOCAB, DIM = 50, 16


def make_params(checkpoint: Path, tmp_path: Path, **overrides: object) -> FullFinetuneParams:
    """Real run parameters (their __post_init__ checks that the files exist)."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    return FullFinetuneParams(
        model=SMALL_MODEL,
        dataset=DatasetConfig(path=str(data)),
        checkpoint=str(checkpoint),
        output_dir=str(tmp_path),
        **{"max_seq_len": 128, **overrides},
    )


# --------------------------------------------------------------------------------------------
# chunked_cross_entropy
# --------------------------------------------------------------------------------------------


def loss_inputs(
    seed: int = 0, ignored: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch 2, seq 7, dim) hidden states, (vocab, dim) weight, targets with some ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, DIM, generator=generator)
    weight = torch.randn(VOCAB, DIM, generator=generator) * 0.5
    targets = torch.randint(0, VOCAB, (2, 7), generator=generator)
    if ignored:
        targets[0, :3] = IGNORE_INDEX  # a masked prompt
        targets[1, 5:] = IGNORE_INDEX  # padding
    return hidden, weight, targets


def reference_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(
    fn: object, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fn(hidden, weight, targets)  # type: ignore[operator]
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize(
    "logits_per_chunk",
    [LOGITS_PER_CHUNK, 3 * VOCAB, 4 * VOCAB, 1],
    ids=["one-chunk", "chunks-of-3", "chunks-of-4", "chunks-of-1"],
)
@pytest.mark.parametrize("ignored", [False, True], ids=["all-labelled", "some-ignored"])
def test_chunked_cross_entropy_equals_cross_entropy_of_full_logits_with_gradients(
    monkeypatch: pytest.MonkeyPatch, logits_per_chunk: int, ignored: bool
) -> None:
    monkeypatch.setattr("finetune.loss.LOGITS_PER_CHUNK", logits_per_chunk)
    hidden, weight, targets = loss_inputs(ignored=ignored)

    loss, grad_hidden, grad_weight = loss_and_grads(chunked_cross_entropy, hidden, weight, targets)
    ref_loss, ref_grad_hidden, ref_grad_weight = loss_and_grads(
        reference_loss, hidden, weight, targets
    )

    assert loss.shape == ()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_grad_weight, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_gives_ignored_positions_zero_hidden_gradient() -> None:
    hidden, weight, targets = loss_inputs()
    _, grad_hidden, _ = loss_and_grads(chunked_cross_entropy, hidden, weight, targets)
    assert torch.all(grad_hidden[targets == IGNORE_INDEX] == 0)
    assert torch.all(grad_hidden[targets != IGNORE_INDEX].abs().sum(-1) > 0)


def test_chunked_cross_entropy_of_only_ignored_targets_is_zero_with_zero_gradients() -> None:
    hidden, weight, targets = loss_inputs()
    targets = torch.full_like(targets, IGNORE_INDEX)
    loss, grad_hidden, grad_weight = loss_and_grads(chunked_cross_entropy, hidden, weight, targets)
    assert float(loss) == 0.0
    assert torch.all(grad_hidden == 0)
    assert torch.all(grad_weight == 0)


def test_chunked_cross_entropy_gradients_scale_with_the_upstream_gradient() -> None:
    hidden, weight, targets = loss_inputs()

    def scaled(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(h, w, t) / 7.0

    _, grad_hidden, grad_weight = loss_and_grads(scaled, hidden, weight, targets)
    _, ref_grad_hidden, ref_grad_weight = loss_and_grads(reference_loss, hidden, weight, targets)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden / 7.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_grad_weight / 7.0, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_with_a_frozen_weight_computes_no_weight_gradient() -> None:
    hidden, weight, targets = loss_inputs()
    hidden.requires_grad_(True)
    loss = chunked_cross_entropy(hidden, weight, targets)
    loss.backward()
    _, ref_grad_hidden, _ = loss_and_grads(reference_loss, hidden.detach(), weight, targets)
    assert weight.grad is None
    assert hidden.grad is not None
    torch.testing.assert_close(hidden.grad, ref_grad_hidden, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_is_close_to_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("finetune.loss.LOGITS_PER_CHUNK", 4 * VOCAB)  # several chunks
    hidden, weight, targets = loss_inputs()
    ref_loss, ref_grad_hidden, ref_grad_weight = loss_and_grads(
        reference_loss, hidden, weight, targets
    )

    def bf16_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_cross_entropy(h, w, t)

    loss, grad_hidden, grad_weight = loss_and_grads(bf16_loss, hidden, weight, targets)

    assert loss.dtype == torch.float32
    assert grad_hidden.dtype == torch.float32 and grad_weight.dtype == torch.float32
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss))
    assert float((grad_hidden - ref_grad_hidden).abs().max()) <= 5e-2 * float(
        ref_grad_hidden.abs().max()
    )
    assert float((grad_weight - ref_grad_weight).abs().max()) <= 5e-2 * float(
        ref_grad_weight.abs().max()
    )


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def test_lr_warmup_is_linear_and_reaches_the_peak_at_the_last_warmup_step() -> None:
    values = [lr_multiplier(step, warmup_steps=4, total_steps=20) for step in range(4)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_lr_is_the_peak_at_the_first_step_after_warmup() -> None:
    assert lr_multiplier(4, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert lr_multiplier(0, warmup_steps=0, total_steps=20) == pytest.approx(1.0)


def test_lr_decays_by_cosine_monotonically_towards_zero() -> None:
    warmup, total = 4, 20
    decay = [lr_multiplier(step, warmup, total) for step in range(warmup, total)]
    assert all(later < earlier for earlier, later in itertools.pairwise(decay))
    assert lr_multiplier(warmup + 8, warmup, total) == pytest.approx(0.5)  # half-way
    assert 0 < decay[-1] < 0.01
    assert lr_multiplier(total, warmup, total) == pytest.approx(0.0, abs=1e-12)
    expected = [0.5 * (1 + math.cos(math.pi * i / 16)) for i in range(16)]
    assert decay == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def test_build_optimizer_decays_matrices_but_not_norms_and_skips_frozen_parameters() -> None:
    model = Llama(SMALL_MODEL)
    model.embed_tokens.weight.requires_grad_(False)
    model.layers[0].input_layernorm.weight.requires_grad_(False)

    optimizer = build_optimizer(model, lr=3e-4, weight_decay=0.1)

    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    n_in_groups = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_in_groups == len(decay_of)  # no parameter twice
    assert {g["lr"] for g in optimizer.param_groups} == {3e-4}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decay_of, name
        elif p.ndim == 1:
            assert decay_of[id(p)] == 0.0, name
        else:
            assert decay_of[id(p)] == 0.1, name
    assert len(decay_of) == sum(p.requires_grad for p in model.parameters())
    assert id(model.lm_head.weight) in decay_of
    assert id(model.norm.weight) in decay_of


# --------------------------------------------------------------------------------------------
# Step counting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_examples", "batch_size", "accumulation", "expected"),
    [
        (10, 4, 1, 3),  # a partial last batch
        (10, 4, 2, 2),  # 3 micro-batches: a full group and a partial one
        (8, 4, 2, 1),
        (9, 2, 2, 3),
        (1, 4, 8, 1),
        (16, 4, 4, 1),
        (17, 4, 4, 2),
    ],
)
def test_steps_per_epoch_counts_a_partial_last_accumulation_group(
    n_examples: int, batch_size: int, accumulation: int, expected: int
) -> None:
    assert steps_per_epoch(n_examples, batch_size, accumulation) == expected


def numbered_examples(n: int) -> list[Example]:
    """Example i has token 100 + i at position 1, so a batch tells which examples it holds."""
    return [Example(tokens=[1, 100 + i, 2], labels=[1, 100 + i, 2]) for i in range(n)]


def example_ids(batch: Batch) -> list[int]:
    return (batch.inputs[:, 1] - 100).tolist()


def test_optimizer_steps_group_micro_batches_per_epoch(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = make_params(
        small_checkpoint,
        tmp_path,
        batch_size=4,
        gradient_accumulation_steps=2,
        epochs=2,
        shuffle=False,
    )
    steps = list(optimizer_steps(numbered_examples(10), params, pad_id=0))

    assert [(epoch, n, [len(example_ids(b)) for b in group]) for epoch, n, group in steps] == [
        (0, 8, [4, 4]),
        (0, 2, [2]),
        (1, 8, [4, 4]),
        (1, 2, [2]),
    ]
    for epoch in (0, 1):
        ids = [i for e, _, group in steps if e == epoch for b in group for i in example_ids(b)]
        assert ids == list(range(10))
    assert len(steps) == total_steps(params, 10) == 4


def test_optimizer_steps_shuffle_each_epoch_differently(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = make_params(
        small_checkpoint,
        tmp_path,
        batch_size=3,
        gradient_accumulation_steps=1,
        epochs=2,
        shuffle=True,
        seed=7,
    )
    steps = list(optimizer_steps(numbered_examples(20), params, pad_id=0))
    orders = [
        [i for e, _, group in steps if e == epoch for b in group for i in example_ids(b)]
        for epoch in (0, 1)
    ]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(20))
    assert orders[0] != orders[1]
    assert orders[0] != list(range(20))


@pytest.mark.parametrize(("max_steps", "expected"), [(0, 12), (5, 5), (12, 12), (100, 12)])
def test_total_steps_multiplies_epochs_and_is_capped_by_max_steps(
    small_checkpoint: Path, tmp_path: Path, max_steps: int, expected: int
) -> None:
    # 10 examples in batches of 4: 3 micro-batches, 2 optimizer steps an epoch, 6 epochs.
    params = make_params(
        small_checkpoint,
        tmp_path,
        batch_size=4,
        gradient_accumulation_steps=2,
        epochs=6,
        max_steps=max_steps,
    )
    assert total_steps(params, 10) == expected


# --------------------------------------------------------------------------------------------
# train_step and gradient accumulation
# --------------------------------------------------------------------------------------------


def labelled_example(length: int, prompt: int, seed: int) -> Example:
    """Random tokens; the first `prompt` positions are masked as an Alpaca prompt would be."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, SMALL_MODEL.vocab_size, (length,), generator=generator).tolist()
    return Example(tokens, [IGNORE_INDEX] * prompt + tokens[prompt:])


def mean_loss_gradients(model: Llama, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: mean token cross-entropy of the full logits over all labelled targets."""
    model = copy.deepcopy(model)
    logits = model(batch.inputs)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def test_accumulated_micro_batches_step_like_one_batch_of_all_of_them(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = make_params(small_checkpoint, tmp_path, max_grad_norm=0.0, dtype=DType.fp32)
    a = [labelled_example(9, 4, seed=1), labelled_example(14, 6, seed=2)]
    b = [labelled_example(6, 5, seed=3), labelled_example(11, 4, seed=4), labelled_example(4, 1, 5)]
    batch_a, batch_b, batch_ab = collate(a, pad_id=0), collate(b, pad_id=0), collate(a + b, 0)
    # Different numbers of labelled tokens: averaging each micro-batch's mean would differ.
    assert batch_a.n_targets != batch_b.n_targets

    model_accumulated = small_model()
    model_single = copy.deepcopy(model_accumulated)
    before = copy.deepcopy(model_accumulated.state_dict())
    ref_loss, ref_grads = mean_loss_gradients(model_accumulated, batch_ab)

    lr = 0.5  # plain SGD: the change of every weight is -lr times its gradient
    accumulated = train_step(
        model_accumulated,
        [batch_a, batch_b],
        torch.optim.SGD(model_accumulated.parameters(), lr=lr),
        params,
        CPU,
    )
    single = train_step(
        model_single, [batch_ab], torch.optim.SGD(model_single.parameters(), lr=lr), params, CPU
    )

    assert accumulated.loss == pytest.approx(single.loss, rel=1e-5)
    assert accumulated.loss == pytest.approx(ref_loss, rel=1e-5)
    assert accumulated.grad_norm == pytest.approx(single.grad_norm, rel=1e-4)
    assert accumulated.n_tokens == single.n_tokens == sum(len(e.tokens) - 1 for e in a + b)
    after_accumulated = model_accumulated.state_dict()
    after_single = model_single.state_dict()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(after_accumulated[name], after_single[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(
            after_accumulated[name], before[name] - lr * grad, rtol=0, atol=1e-6
        )
    assert all(p.grad is None for p in model_accumulated.parameters())  # ready for the next step


def test_train_step_clips_the_gradient_norm_and_reports_it_unclipped(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = make_params(small_checkpoint, tmp_path, max_grad_norm=0.01)
    batch = collate([labelled_example(12, 3, seed=1), labelled_example(7, 2, seed=2)], 0)
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]

    result = train_step(model, [batch], torch.optim.SGD(model.parameters(), lr=1.0), params, CPU)

    after = [p.detach() for p in model.parameters()]
    change = torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])
    assert result.grad_norm > 0.01
    assert float(change.norm()) == pytest.approx(0.01, rel=1e-3)


def test_train_step_under_bf16_keeps_fp32_weights_and_a_close_loss(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    batch = collate([labelled_example(12, 3, seed=1), labelled_example(7, 2, seed=2)], 0)
    results = {}
    for dtype in (DType.fp32, DType.bf16):
        model = small_model()
        params = make_params(small_checkpoint, tmp_path, dtype=dtype)
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
        results[dtype] = train_step(model, [batch], optimizer, params, CPU)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    expected = results[DType.fp32].loss
    assert results[DType.bf16].loss == pytest.approx(expected, rel=2e-2)
    assert results[DType.bf16].loss == pytest.approx(math.log(SMALL_MODEL.vocab_size), rel=2e-2)


def test_a_forward_pre_hook_on_the_model_runs_in_training_steps_and_evaluation(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    # What FSDP's gathering of weights and torch.compile of the root rely on.
    params = make_params(small_checkpoint, tmp_path, batch_size=2)
    examples = [labelled_example(9, 3, seed=s) for s in range(3)]
    model = small_model()
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    micro_batches = [collate(examples[:2], 0), collate(examples[2:], 0)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    train_step(model, micro_batches, optimizer, params, CPU)
    assert seen == [(2, 8), (1, 8)]
    evaluate(model, examples, params, pad_id=0)
    assert seen == [(2, 8), (1, 8), (2, 8), (1, 8)]


def test_a_recipe_loss_function_replaces_the_next_token_loss(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = make_params(small_checkpoint, tmp_path, dtype=DType.fp32)
    examples = [labelled_example(12, 3, seed=1), labelled_example(7, 2, seed=2)]
    batch = collate(examples, 0)

    def doubled(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return 2 * next_token_loss(model, batch)

    plain_model, doubled_model = small_model(), small_model()
    plain = train_step(plain_model, [batch], build_optimizer(plain_model, 0.1, 0.0), params, CPU)
    optimizer = build_optimizer(doubled_model, 0.1, 0.0)
    twice = train_step(doubled_model, [batch], optimizer, params, CPU, loss_fn=doubled)
    assert twice.loss == pytest.approx(2 * plain.loss, rel=1e-6)
    evaluated = evaluate(small_model(), examples, params, 0, loss_fn=doubled)
    assert evaluated == pytest.approx(2 * evaluate(small_model(), examples, params, 0), rel=1e-6)


def test_the_loss_of_a_tied_model_is_the_full_logits_loss_and_trains_the_one_weight() -> None:
    cfg = dataclasses.replace(SMALL_MODEL, tie_word_embeddings=True)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    batch = collate([labelled_example(12, 3, seed=1), labelled_example(7, 2, seed=2)], 0)

    loss = model(batch.inputs, batch.targets)
    loss.backward()
    chunked_grad = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    logits = model(batch.inputs)
    reference = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch.targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    reference.backward()

    assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_grad, model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


def test_a_recipe_collate_function_makes_the_batches_of_training_and_evaluation(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = make_params(small_checkpoint, tmp_path, batch_size=2, shuffle=False)
    collated: list[list[int]] = []

    def recording_collate(examples: list[Example], pad_id: int, multiple: int) -> Batch:
        batch = collate(examples, pad_id, multiple)
        collated.append(example_ids(batch))
        return batch

    steps = list(optimizer_steps(numbered_examples(3), params, 0, collate=recording_collate))
    assert [example_ids(b) for _, _, group in steps for b in group] == [[0, 1], [2]]
    assert collated == [[0, 1], [2]]
    evaluate(small_model(), numbered_examples(3), params, 0, collate=recording_collate)
    assert collated == [[0, 1], [2], [0, 1], [2]]


def test_a_new_recipe_is_its_registry_entry_and_its_module(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dataclasses.dataclass
    class ToyParams(FullFinetuneParams):
        pass

    module = types.ModuleType("finetune.recipes.toy")
    module.run = lambda params: float(params.max_steps)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "finetune.recipes.toy", module)
    monkeypatch.setitem(RECIPES, "toy", Recipe("toy", ToyParams))
    full = make_params(small_checkpoint, tmp_path, max_steps=7)
    toy = ToyParams(**{f.name: getattr(full, f.name) for f in dataclasses.fields(full)})

    assert recipe_of(toy).name == "toy" and recipe_of(full).name == "full"
    assert recipe_of(toy).run(toy) == 7.0
