"""The full fine-tuning recipe end to end: what it writes, and that the ecosystem loads it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from finetune import ranks
from finetune.checkpoint import load_hf
from finetune.config import FullFinetuneParams, build_params
from finetune.recipes import full, lora
from tests.conftest import SMALL_MODEL, compose_config, metrics_rows, small_params


@pytest.fixture(scope="module")
def finished_run(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    full.run(small_params(small_checkpoint, out, "max_steps=4", "lr=1e-3", "log_every_n_steps=2"))
    return out


def test_params_yaml_records_every_resolved_field(finished_run: Path) -> None:
    saved = yaml.safe_load((finished_run / "params.yaml").read_text())
    assert saved["lr"] == 1e-3 and saved["max_steps"] == 4 and saved["dtype"] == "fp32"
    assert saved["model"]["dim"] == SMALL_MODEL.dim
    assert saved["tokenizer"].endswith("tokenizer.model")
    expected = set(FullFinetuneParams.__dataclass_fields__)
    assert set(saved) == expected


def test_metrics_rows_are_logged_every_n_steps(finished_run: Path) -> None:
    rows = metrics_rows(finished_run)
    assert [r["step"] for r in rows] == [2, 4]
    keys = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert all(set(r) == keys for r in rows)
    assert rows[0]["elapsed_s"] < rows[1]["elapsed_s"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows)


def test_loss_plot_is_a_png(finished_run: Path) -> None:
    assert (finished_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_model_is_a_hugging_face_llama(finished_run: Path) -> None:
    model_dir = finished_run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == SMALL_MODEL.dim
    assert config["num_key_value_heads"] == SMALL_MODEL.n_kv_heads
    for name in ["generation_config.json", "tokenizer.model", "tokenizer_config.json"]:
        assert (model_dir / name).is_file()
    assert json.loads((model_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_transformers_loads_the_output_with_equal_logits(finished_run: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = finished_run / "model"
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = load_hf(SMALL_MODEL, model_dir, torch.device("cpu"), torch.float32)
    tokens = torch.randint(
        0, SMALL_MODEL.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (reference(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-4


def test_transformers_tokenizer_matches_ours(finished_run: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from finetune.tokenizer import Tokenizer

    ours = Tokenizer(finished_run / "model" / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(finished_run / "model")
    text = "Return the sum of two numbers.\nUse it wisely."
    assert theirs(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]


def test_training_changes_the_weights(finished_run: Path, small_checkpoint: Path) -> None:
    before = load_hf(SMALL_MODEL, small_checkpoint, torch.device("cpu"), torch.float32)
    after = load_hf(SMALL_MODEL, finished_run / "model", torch.device("cpu"), torch.float32)
    changed = [
        name
        for (name, a), (_, b) in zip(
            before.state_dict().items(), after.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert len(changed) == len(before.state_dict())


def test_large_models_are_saved_in_shards_that_transformers_loads(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    full.run(small_params(small_checkpoint, tmp_path, "max_steps=1", "max_shard_size_mb=1"))
    model_dir = tmp_path / "model"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (model_dir / "model.safetensors").exists()
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = load_hf(SMALL_MODEL, model_dir, torch.device("cpu"), torch.float32)
    tokens = torch.arange(20)[None]
    with torch.no_grad():
        assert (reference(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4


def test_bf16_run_trains_fp32_master_weights_and_saves_bf16(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    # The checkpoint is fp32, so output_dtype=auto would save fp32.
    loss = full.run(
        small_params(small_checkpoint, tmp_path, "max_steps=2", "dtype=bf16", "output_dtype=bf16")
    )
    assert 0 < loss < 20
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_same_seed_gives_the_same_losses(small_checkpoint: Path, tmp_path: Path) -> None:
    losses = [
        full.run(small_params(small_checkpoint, tmp_path / str(i), "max_steps=3", "shuffle=true"))
        for i in range(2)
    ]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_shipped_model_visibly_learns_the_sample_task(tmp_path: Path) -> None:
    params = build_params(compose_config([f"output_dir={tmp_path}", "max_steps=60"]))
    full.run(params)
    rows = metrics_rows(tmp_path)
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("recipe", [full, lora])
def test_a_process_that_does_not_write_files_trains_but_saves_nothing(
    recipe: ModuleType, small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ranks.writes_files is the one place that decides it, for the loop and the recipes alike.
    # (Checkpoints are written by every process, each its shard: see test_distributed.py.)
    monkeypatch.setattr(ranks, "writes_files", lambda: False)
    overrides = ["max_steps=2"]
    if recipe is lora:
        overrides.append("recipe=lora")
    final_loss = recipe.run(small_params(small_checkpoint, tmp_path, *overrides))

    assert math.isfinite(final_loss)
    written = {p.name for p in tmp_path.iterdir()}
    assert not written & {"params.yaml", "checkpoints", "model", "adapter", "loss.png"}
    assert "metrics.jsonl" not in written
