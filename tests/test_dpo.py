"""recipe=dpo: the preference loss against its formula, the reference (adapters disabled, or
log-probabilities computed before training), preference data, outputs, resume, the default run."""

from __future__ import annotations

import json
import logging
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finetune.chat_format import Message
from finetune.checkpoint import load_checkpoint
from finetune.config import (
    ASSETS_DIR,
    DPOConfig,
    LoraConfig,
    PreferenceDatasetConfig,
    model_preset,
)
from finetune.data import IGNORE_INDEX, Example, tokenize_chat
from finetune.lora import apply_lora, lora_modules
from finetune.model import Llama
from finetune.preference import PreferencePair, collate_pairs, load_pairs
from finetune.recipes import dpo
from tests.conftest import (
    ONE_THREAD,
    SMALL_MODEL,
    max_abs_diff,
    metrics_rows,
    random_tokens,
    run_cli,
    small_model,
    small_params,
    write_checkpoint,
    write_jsonl,
)
from tests.test_resume import interrupt_at_step

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CPU = torch.device("cpu")
PREFERENCE_SAMPLE = ASSETS_DIR / "preference_sample.jsonl"
N_PAIRS = 12


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = PREFERENCE_SAMPLE.read_text().splitlines(keepends=True)[:N_PAIRS]
    path.write_text("".join(lines))
    return path


def dpo_params(checkpoint: Path, out: Path, data: Path, *overrides: str) -> dpo.DPOParams:
    """A short DPO run of the small model: no validation, a constant high learning rate."""
    return small_params(
        checkpoint,
        out,
        "recipe=dpo",
        f"dataset.path={data}",
        "dataset.val_split=0",
        "eval_every_n_steps=0",
        "warmup_steps=0",
        "lr=1e-3",
        *overrides,
    )


def preference_config(path: Path, *, template: str = "alpaca") -> PreferenceDatasetConfig:
    return PreferenceDatasetConfig(path=str(path), template=template)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def expected_loss_and_slope(
    loss: str, smoothing: float, beta: float, h: float
) -> tuple[float, float]:
    """The loss of one pair with log-ratio difference h, and its derivative in h, by hand."""
    if loss == "sigmoid":
        value = -(1 - smoothing) * math.log(sigmoid(beta * h)) - smoothing * math.log(
            sigmoid(-beta * h)
        )
        slope = -(1 - smoothing) * beta * (1 - sigmoid(beta * h)) + smoothing * beta * sigmoid(
            beta * h
        )
        return value, slope
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
    return max(0.0, 1 - beta * h), -beta if beta * h < 1 else 0.0


@pytest.mark.parametrize(
    ("loss", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_preference_losses_and_gradients_follow_the_formula(loss: str, smoothing: float) -> None:
    beta = 0.5
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = -3.0, -5.0, -3.5, -4.0
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # 1.5
    policy = torch.tensor([policy_chosen, policy_rejected], dtype=torch.float64, requires_grad=True)
    cfg = DPOConfig(beta=beta, loss=loss, label_smoothing=smoothing)
    losses, chosen, rejected = dpo.preference_losses(
        policy[:1],
        policy[1:],
        torch.tensor([reference_chosen], dtype=torch.float64),
        torch.tensor([reference_rejected], dtype=torch.float64),
        cfg,
    )
    losses.sum().backward()

    value, slope = expected_loss_and_slope(loss, smoothing, beta, h)
    assert losses.item() == pytest.approx(value, abs=1e-12)
    assert policy.grad.tolist() == pytest.approx([slope, -slope], abs=1e-12)
    assert chosen.item() == pytest.approx(beta * (policy_chosen - reference_chosen))
    assert rejected.item() == pytest.approx(beta * (policy_rejected - reference_rejected))


def direct_logps(model: Llama, example: Example) -> torch.Tensor:
    """The summed log-probability of an example's labelled tokens, from the full logits."""
    tokens = torch.tensor(example.tokens)
    logits = model(tokens[None, :-1])[0]  # (seq, vocab)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    labels = torch.tensor(example.labels[1:])
    labelled = labels != IGNORE_INDEX
    return log_probs[labelled].gather(1, labels[labelled][:, None]).sum()


def test_one_batch_loss_rewards_and_gradients_equal_a_direct_implementation(
    pairs_file: Path, tokenizer: object
) -> None:
    beta = 0.3
    pairs = load_pairs(preference_config(pairs_file), tokenizer, 128)[:3]
    reference, policy = small_model(seed=1), small_model(seed=0)
    with torch.no_grad():
        for pair in pairs:
            pair.reference_logps = (
                float(direct_logps(reference, pair.chosen)),
                float(direct_logps(reference, pair.rejected)),
            )
    cfg = DPOConfig(beta=beta)
    loss, metrics = dpo.dpo_loss(policy, collate_pairs(pairs, pad_id=0), cfg)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad()

    expected = torch.zeros((), dtype=torch.float64)
    chosen_rewards, rejected_rewards, chosen_logps = [], [], []
    for pair in pairs:
        chosen, rejected = direct_logps(policy, pair.chosen), direct_logps(policy, pair.rejected)
        ref_chosen, ref_rejected = pair.reference_logps
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        expected = expected - F.logsigmoid(beta * h.double())
        chosen_rewards.append(beta * (chosen.item() - ref_chosen))
        rejected_rewards.append(beta * (rejected.item() - ref_rejected))
        chosen_logps.append(chosen.item())
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert float(metrics["rewards/chosen"]) == pytest.approx(sum(chosen_rewards), abs=1e-4)
    assert float(metrics["rewards/rejected"]) == pytest.approx(sum(rejected_rewards), abs=1e-4)
    accuracy = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    assert float(metrics["rewards/accuracy"]) == accuracy
    assert float(metrics["logps/chosen"]) == pytest.approx(sum(chosen_logps), abs=1e-3)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_adapters_disabled_give_the_base_models_log_probabilities(
    pairs_file: Path, tokenizer: object
) -> None:
    pairs = load_pairs(preference_config(pairs_file), tokenizer, 128)[:2]
    batch = collate_pairs(pairs, pad_id=0)
    base, adapted = small_model(seed=0), small_model(seed=0)
    torch.manual_seed(0)  # the adapters' A matrices are drawn from the global generator
    apply_lora(adapted, LoraConfig(rank=4, targets=["q_proj", "v_proj", "lm_head"], use_dora=True))
    with torch.no_grad():
        for module in lora_modules(adapted).values():
            module.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
            module.lora_magnitude_vector.mul_(1.5)
        expected = dpo.sequence_logps(base, batch.inputs, batch.targets)
        with dpo.adapters_disabled(adapted):
            disabled = dpo.sequence_logps(adapted, batch.inputs, batch.targets)
        enabled = dpo.sequence_logps(adapted, batch.inputs, batch.targets)

    assert max_abs_diff(disabled, expected) < 1e-4
    assert max_abs_diff(enabled, expected) > 0.1  # the adapters are back


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", ["false", "true"])
def test_at_step_0_the_sigmoid_loss_is_log_2_and_the_rewards_0(
    lora: str, small_checkpoint: Path, pairs_file: Path, tmp_path: Path
) -> None:
    dpo.run(dpo_params(small_checkpoint, tmp_path, pairs_file, f"dpo.lora={lora}", "max_steps=2"))

    first, second = (row for row in metrics_rows(tmp_path) if "loss" in row)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert first[name] == 0.0, name
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    # One update later the policy has moved away from the reference.
    assert second["rewards/margin"] != 0.0


def test_full_dpo_caches_reference_logps_beside_the_run_and_reuses_them(
    small_checkpoint: Path,
    pairs_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = dpo_params(small_checkpoint, tmp_path, pairs_file, "max_steps=1")
    with caplog.at_level(logging.INFO, logger="finetune.recipes.dpo"):
        dpo.run(params)
    saved = json.loads((tmp_path / dpo.REFERENCE_FILE).read_text())
    assert len(saved["logps"]) == N_PAIRS
    assert all(c < 0 and r < 0 for c, r in saved["logps"])
    assert "saved to" in caplog.text

    # The second run of the same pairs reads them, computing none.
    monkeypatch.setattr(dpo, "compute_reference_logps", pytest.fail)
    caplog.clear()
    shutil.rmtree(tmp_path / "model")  # not a finished run any more
    with caplog.at_level(logging.INFO, logger="finetune.recipes.dpo"):
        dpo.run(dpo_params(small_checkpoint, tmp_path, pairs_file, "max_steps=1"))
    assert "read from" in caplog.text


# 12 pairs in micro-batches of 2, 2 per step: 3 steps an epoch, 2 epochs, a checkpoint every 2.
RESUME_SCHEDULE = (
    "gradient_accumulation_steps=2",
    "epochs=2",
    "save_every_n_steps=2",
    "keep_last_n=0",
)


@pytest.mark.parametrize(
    ("lora", "weights_file"),
    [("false", "model/model.safetensors"), ("true", "adapter/adapter_model.safetensors")],
)
def test_an_interrupted_dpo_run_resumed_matches_a_straight_one_bit_for_bit(
    lora: str,
    weights_file: str,
    small_checkpoint: Path,
    pairs_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = (*RESUME_SCHEDULE, f"dpo.lora={lora}", "lora.dropout=0.2", "lora.rank=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    dpo.run(dpo_params(small_checkpoint, straight, pairs_file, *args))
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            dpo.run(dpo_params(small_checkpoint, resumed, pairs_file, *args))
    dpo.run(dpo_params(small_checkpoint, resumed, pairs_file, *args, "resume=true"))

    def rows(run: Path) -> list[dict]:
        timing = ("tokens_per_s", "elapsed_s")
        return [{k: v for k, v in r.items() if k not in timing} for r in metrics_rows(run)]

    assert [r["step"] for r in rows(resumed)] == [1, 2, 3, 4, 5, 6]
    assert rows(resumed) == rows(straight)
    expected, actual = load_file(straight / weights_file), load_file(resumed / weights_file)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@torch.no_grad()
def transformers_logits(model_dir: Path, adapter_dir: Path | None = None) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()(random_tokens((2, 17), seed=0)).logits


def test_lora_dpo_writes_an_adapter_peft_loads_and_the_merged_model(
    small_checkpoint: Path, pairs_file: Path, tmp_path: Path
) -> None:
    dpo.run(
        dpo_params(
            small_checkpoint, tmp_path, pairs_file, "dpo.lora=true", "lora.rank=4", "lr=1e-2"
        )
    )

    with_adapter = transformers_logits(small_checkpoint, tmp_path / "adapter")
    merged = transformers_logits(tmp_path / "model")
    assert max_abs_diff(with_adapter, merged) < 1e-4
    assert max_abs_diff(merged, transformers_logits(small_checkpoint)) > 1e-3  # it trained
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert not (tmp_path / dpo.REFERENCE_FILE).exists()  # the base model is the reference


def test_the_default_run_raises_held_out_reward_accuracy_well_above_chance(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("recipe=dpo", f"hydra.run.dir={run}", cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr

    rows = metrics_rows(run)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert train_rows[0]["rewards/accuracy"] == 0.0
    assert [r["step"] for r in val_rows] == [23]
    assert val_rows[-1]["val_rewards/accuracy"] >= 0.9
    assert val_rows[-1]["val_rewards/margin"] > 1.0
    assert val_rows[-1]["val_loss"] < 0.3
    assert "val_perplexity" not in val_rows[-1]
    late = train_rows[-5:]
    assert sum(r["rewards/accuracy"] for r in late) / len(late) >= 0.9
    assert (run / "loss.png").stat().st_size > 0
    # The saved model is the trained one, and transformers reads it as we do.
    ours = load_checkpoint(model_preset("tiny"), run / "model", CPU, torch.float32)
    expected = ours.eval()(random_tokens((2, 17), seed=0))
    assert max_abs_diff(transformers_logits(run / "model"), expected) < 1e-4


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def answer_start(example: Example) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_string_pairs_share_the_prompt_and_are_labelled_on_the_answers_only(
    template: str, pairs_file: Path, tokenizer: object
) -> None:
    pair = load_pairs(preference_config(pairs_file, template=template), tokenizer, 128)[0]
    start = answer_start(pair.chosen)
    assert answer_start(pair.rejected) == start
    assert pair.chosen.tokens[:start] == pair.rejected.tokens[:start]
    assert pair.chosen.tokens[0] == tokenizer.bos_id
    for example in (pair.chosen, pair.rejected):
        assert example.labels[start:] == example.tokens[start:]
        assert example.tokens[-1] == tokenizer.eos_id
    first = json.loads(pairs_file.read_text().splitlines()[0])
    prompt_text = tokenizer.decode(pair.chosen.tokens[1:start])
    assert first["prompt"] in prompt_text
    assert ("[INST]" in prompt_text) == (template == "chat")
    assert tokenizer.decode(pair.chosen.tokens[start:-1]).strip() == first["chosen"]


def test_message_list_pairs_are_labelled_on_their_last_answer_only(
    tmp_path: Path, tokenizer: object
) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "What does len do?"}
    first_answer = {"role": "assistant", "content": "It counts."}
    follow_up = {"role": "user", "content": "Counts what?"}
    good, bad = (
        {"role": "assistant", "content": "The items of a container."},
        {"role": "assistant", "content": "Sheep."},
    )
    prefix = [system, user, first_answer, follow_up]
    whole = write_jsonl(
        tmp_path / "whole.jsonl", [{"chosen": [*prefix, good], "rejected": [*prefix, bad]}]
    )
    split = write_jsonl(
        tmp_path / "split.jsonl", [{"prompt": prefix, "chosen": [good], "rejected": [bad]}]
    )
    pair = load_pairs(preference_config(whole, template="chat"), tokenizer, 256)[0]
    assert load_pairs(preference_config(split, template="chat"), tokenizer, 256)[0] == pair

    conversation = [Message(m["role"], m["content"]) for m in [*prefix, good]]
    full = tokenize_chat(conversation, tokenizer, 256, train_on_input=False)
    assert pair.chosen.tokens == full.tokens
    start = answer_start(pair.chosen)
    # The first answer is labelled in SFT; here only the last one is.
    assert answer_start(full) < start
    assert pair.chosen.labels[start:] == full.labels[start:]
    assert pair.chosen.tokens[:start] == pair.rejected.tokens[:start]
    assert tokenizer.decode(pair.rejected.tokens[start:-1]).strip() == "Sheep."


def test_column_map_and_parquet_give_the_same_pairs(
    tmp_path: Path, pairs_file: Path, tokenizer: object
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    records = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in records]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "pairs.parquet")
    cfg = preference_config(tmp_path / "pairs.parquet")
    cfg.column_map.prompt, cfg.column_map.chosen, cfg.column_map.rejected = "q", "good", "bad"

    assert load_pairs(cfg, tokenizer, 128) == load_pairs(
        preference_config(pairs_file), tokenizer, 128
    )


def test_pairs_whose_answers_max_seq_len_cuts_off_are_left_out(
    tmp_path: Path, tokenizer: object, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = " ".join(["word"] * 200)
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Bye."},
            {"prompt": long_prompt, "chosen": "Hi.", "rejected": "Bye."},
        ],
    )
    with caplog.at_level(logging.WARNING):
        pairs = load_pairs(preference_config(path), tokenizer, 64)
    assert len(pairs) == 1 and isinstance(pairs[0], PreferencePair)
    assert "1 of 2 pairs left out" in caplog.text


def test_the_loss_equals_trl_dpo_trainers_on_the_same_model_and_batch(
    pairs_file: Path, tokenizer: object, tmp_path: Path
) -> None:
    """TRL is no dependency of finetune: this runs where `pip install trl` has put it."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    policy_dir = write_checkpoint(tmp_path / "policy", seed=0)
    reference_dir = write_checkpoint(tmp_path / "reference", seed=1)
    pairs = load_pairs(preference_config(pairs_file), tokenizer, 128)[:3]
    beta = 0.2

    ours = load_checkpoint(SMALL_MODEL, policy_dir, CPU, torch.float32)
    reference = load_checkpoint(SMALL_MODEL, reference_dir, CPU, torch.float32)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        ref_logps = dpo.sequence_logps(reference, batch.inputs, batch.targets).tolist()
    for i, pair in enumerate(pairs):
        pair.reference_logps = (ref_logps[i], ref_logps[len(pairs) + i])
    loss, _ = dpo.dpo_loss(ours, collate_pairs(pairs, pad_id=0), DPOConfig(beta=beta))

    # TRL's trainer on the transformers models of the same checkpoints, fed the same token ids.
    load = partial(transformers.AutoModelForCausalLM.from_pretrained, dtype=torch.float32)
    trainer = trl.DPOTrainer(
        model=load(policy_dir),
        ref_model=load(reference_dir),
        # bf16=False: TRL's default is bf16 autocast where the machine supports it.
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"), beta=beta, bf16=False, report_to=[], use_cpu=True
        ),
        train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=transformers.AutoTokenizer.from_pretrained(policy_dir),
    )
    features = []
    for pair in pairs:
        start = answer_start(pair.chosen)
        features.append(
            {
                "prompt_ids": pair.chosen.tokens[:start],
                "chosen_ids": pair.chosen.tokens[start:],
                "rejected_ids": pair.rejected.tokens[start:],
            }
        )
    trl_batch = trainer.data_collator(features)
    theirs = trainer.compute_loss(trainer.model, trl_batch)

    assert loss.item() / len(pairs) == pytest.approx(theirs.item(), abs=1e-5)
