"""Generation: the KV cache against the uncached model, greedy decoding against transformers'
`generate`, seeded sampling, stopping at EOS, and top-k / top-p filtering."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import finetune.generation
from finetune.config import LORA_TARGETS, LoraConfig, ModelConfig
from finetune.generation import filter_top_k, filter_top_p, generate, next_token
from finetune.hf_format import hf_key
from finetune.lora import apply_lora, merge_lora
from finetune.model import KVCache, Llama
from tests.conftest import SMALL_MODEL, max_abs_diff, random_tokens, small_model
from tests.test_lora import randomise_adapters
from tests.test_model import GQA_MODEL, hf_llama, random_model

CPU = torch.device("cpu")
# GQA_MODEL with as many KV heads as query heads: plain multi-head attention.
MHA_MODEL = dataclasses.replace(GQA_MODEL, n_kv_heads=GQA_MODEL.n_heads)
# transformers' LlamaConfig defaults to eos_token_id=2; ours is told the same.
HF_EOS_ID = 2


def prompt_for(cfg: ModelConfig, length: int = 8, seed: int = 1) -> torch.Tensor:
    """(length,) random token ids of `cfg`'s vocabulary."""
    return random_tokens((1, length), seed=seed, cfg=cfg)[0]


@pytest.mark.parametrize("cfg", [GQA_MODEL, MHA_MODEL], ids=["gqa", "mha"])
def test_greedy_generation_equals_transformers_generate(cfg: ModelConfig) -> None:
    ours = random_model(cfg)
    reference = hf_llama(cfg)
    reference.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    prompt = prompt_for(cfg)

    with torch.no_grad():
        expected = reference.generate(
            prompt.unsqueeze(0), do_sample=False, max_new_tokens=64, eos_token_id=HF_EOS_ID
        )[0, len(prompt) :].tolist()
    actual = list(generate(ours, prompt, max_new_tokens=64, eos_id=HF_EOS_ID))

    assert len(expected) == 64  # no early EOS: every one of the 64 steps is compared
    assert actual == expected


@pytest.mark.parametrize("cfg", [GQA_MODEL, MHA_MODEL], ids=["gqa", "mha"])
def test_cached_logits_equal_uncached_logits(cfg: ModelConfig) -> None:
    model = random_model(cfg)
    tokens = random_tokens((1, 20), cfg=cfg)
    cache = KVCache(cfg, max_len=20, device=CPU, dtype=torch.float32)

    with torch.no_grad():
        expected = model(tokens)
        # A prefill, a chunk after cached tokens (the shifted causal mask), then one at a time.
        pieces = [tokens[:, :6], tokens[:, 6:10], *tokens[:, 10:].split(1, dim=1)]
        actual = torch.cat([model(piece, cache=cache) for piece in pieces], dim=1)

    assert cache.length == 20
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert max_abs_diff(actual, expected) <= 1e-5


def test_cache_keeps_only_the_key_value_heads() -> None:
    cache = KVCache(SMALL_MODEL, max_len=32, device=CPU, dtype=torch.bfloat16)
    expected = (1, SMALL_MODEL.n_kv_heads, 32, SMALL_MODEL.head_dim)
    assert len(cache.keys) == len(cache.values) == SMALL_MODEL.n_layers
    assert all(t.shape == expected and t.dtype == torch.bfloat16 for t in cache.keys + cache.values)


def test_generating_n_tokens_runs_the_prompt_once_then_one_position_per_token() -> None:
    model = random_model(SMALL_MODEL)
    positions_fed: list[int] = []
    model.embed_tokens.register_forward_hook(
        lambda module, args, output: positions_fed.append(args[0].shape[1])
    )
    generated = list(generate(model, prompt_for(SMALL_MODEL, length=10), max_new_tokens=16))

    assert len(generated) == 16
    # The last token is yielded without being fed back.
    assert positions_fed == [10] + [1] * 15


def test_generation_applies_the_output_layer_to_one_position_per_step() -> None:
    # The prompt's other positions need no logits: only the next token's are used.
    model = random_model(SMALL_MODEL)
    positions_scored: list[int] = []
    model.lm_head.register_forward_hook(
        lambda module, args, output: positions_scored.append(args[0].shape[1])
    )
    list(generate(model, prompt_for(SMALL_MODEL, length=10), max_new_tokens=4))

    assert positions_scored == [1] * 4


def test_last_only_logits_are_the_last_position_of_all_logits() -> None:
    model = random_model(SMALL_MODEL)
    tokens = random_tokens((2, 12))
    with torch.no_grad():
        every = model(tokens)
        last = model(tokens, last_only=True)
        cache = KVCache(SMALL_MODEL, max_len=12, device=CPU, dtype=torch.float32, batch=2)
        cached_last = model(tokens, cache=cache, last_only=True)

    assert last.shape == cached_last.shape == (2, 1, SMALL_MODEL.vocab_size)
    assert max_abs_diff(last, every[:, -1:]) <= 1e-5  # a matmul of other rows rounds apart
    assert max_abs_diff(cached_last, every[:, -1:]) <= 1e-5


def test_cache_overflow_is_refused() -> None:
    model = random_model(SMALL_MODEL)
    cache = KVCache(SMALL_MODEL, max_len=4, device=CPU, dtype=torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow a cache of 4"):
        model(random_tokens((1, 5)), cache=cache)


def test_training_loss_refuses_a_cache() -> None:
    model = random_model(SMALL_MODEL)
    tokens = random_tokens((1, 4))
    cache = KVCache(SMALL_MODEL, max_len=4, device=CPU, dtype=torch.float32)
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens, targets=tokens, cache=cache)


def sampled(model: Llama, seed: int, **options: float) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    prompt = prompt_for(model.cfg)
    return list(generate(model, prompt, max_new_tokens=24, generator=generator, **options))


def test_seeded_sampling_is_reproducible_and_differs_across_seeds() -> None:
    model = random_model(SMALL_MODEL)
    first = sampled(model, seed=0, temperature=1.0)
    assert sampled(model, seed=0, temperature=1.0) == first
    assert sampled(model, seed=1, temperature=1.0) != first


def test_top_k_of_one_equals_greedy() -> None:
    model = random_model(SMALL_MODEL)
    greedy = list(generate(model, prompt_for(SMALL_MODEL), max_new_tokens=24))
    assert sampled(model, seed=0, temperature=1.5, top_k=1) == greedy


def test_generation_stops_after_eos_and_yields_it() -> None:
    model = random_model(SMALL_MODEL)
    greedy = list(generate(model, prompt_for(SMALL_MODEL), max_new_tokens=24))
    eos_id = greedy[5]
    first_eos = greedy.index(eos_id)

    stopped = list(generate(model, prompt_for(SMALL_MODEL), max_new_tokens=24, eos_id=eos_id))

    assert stopped == greedy[: first_eos + 1]


def test_generation_streams_and_leaves_a_training_model_in_training_mode() -> None:
    model = random_model(SMALL_MODEL).train()
    stream = generate(model, prompt_for(SMALL_MODEL), max_new_tokens=24)
    first = next(stream)
    # Between tokens the caller's own state is back: grad mode, and the model's training mode.
    assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert [first, *stream] == list(generate(model.eval(), prompt_for(SMALL_MODEL), 24))


def test_unmerged_lora_model_generates_as_its_merged_model() -> None:
    # Every target, lm_head included, with dropout that a training-mode step would apply.
    adapted = small_model(seed=4)
    apply_lora(adapted, LoraConfig(8, 64.0, 0.5, list(LORA_TARGETS), False))
    randomise_adapters(adapted)
    merged = copy.deepcopy(adapted)
    merge_lora(merged)
    prompt = prompt_for(SMALL_MODEL)

    expected = list(generate(merged, prompt, max_new_tokens=24))
    assert list(generate(adapted.train(), prompt, max_new_tokens=24)) == expected
    assert list(generate(small_model(seed=4), prompt, max_new_tokens=24)) != expected


def test_bf16_model_generates_with_a_bf16_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    caches: list[KVCache] = []

    class RecordedKVCache(KVCache):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(finetune.generation, "KVCache", RecordedKVCache)
    model = random_model(SMALL_MODEL).to(torch.bfloat16)

    assert len(list(generate(model, prompt_for(SMALL_MODEL), max_new_tokens=4))) == 4
    assert [cache.keys[0].dtype for cache in caches] == [torch.bfloat16]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": SMALL_MODEL.context_length}, "context length"),
    ],
)
def test_bad_generation_arguments_are_refused(options: dict, message: str) -> None:
    model = random_model(SMALL_MODEL)
    arguments = {"max_new_tokens": 4, **options}
    with pytest.raises(ValueError, match=message):
        next(generate(model, prompt_for(SMALL_MODEL), **arguments))


# A hand-made distribution, shuffled so that filtering cannot rely on the tokens' order:
# token 3 has 0.5, token 0 has 0.2, token 4 has 0.15, token 1 has 0.1, token 2 has 0.05.
PROBS = torch.tensor([0.2, 0.1, 0.05, 0.5, 0.15])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, value in enumerate(logits.tolist()) if value != -math.inf}


@pytest.mark.parametrize(
    "top_k, expected",
    [(1, {3}), (2, {3, 0}), (3, {3, 0, 4}), (0, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})],
)
def test_top_k_keeps_the_k_most_likely_tokens(top_k: int, expected: set[int]) -> None:
    filtered = filter_top_k(LOGITS, top_k)
    assert kept(filtered) == expected
    assert torch.equal(filtered[list(expected)], LOGITS[list(expected)])  # kept values unchanged


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.3, {3}),  # the most likely token alone already has 0.5
        (0.6, {3, 0}),  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
        (0.8, {3, 0, 4}),  # 0.7 < 0.8, 0.85 >= 0.8
        (0.9, {3, 0, 4, 1}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: set[int]) -> None:
    filtered = filter_top_p(LOGITS, top_p)
    assert kept(filtered) == expected
    assert torch.equal(filtered[list(expected)], LOGITS[list(expected)])


def test_top_p_applies_to_the_distribution_left_by_top_k() -> None:
    # After top_k=3 the probabilities are 0.5, 0.2, 0.15 over 0.85: 0.588, 0.235, 0.176, so
    # top_p=0.8 keeps two tokens, where over the whole distribution it keeps three.
    generator = torch.Generator().manual_seed(0)
    draws = {next_token(LOGITS, 1.0, 3, 0.8, generator) for _ in range(300)}
    assert draws == {3, 0}


def test_sampling_follows_the_temperature_scaled_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([next_token(LOGITS, 1.0, 0, 1.0, generator) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=5) / len(draws)
    assert max_abs_diff(frequencies, PROBS) < 0.03
    # A temperature near 0 sharpens the distribution onto the most likely token.
    assert {next_token(LOGITS, 0.01, 0, 1.0, generator) for _ in range(50)} == {3}
