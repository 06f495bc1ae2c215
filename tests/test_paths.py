"""Paths in the config are taken from the directory the command ran in, with `~` expanded, and
saved absolute: params.yaml and the adapter's base model name work from any other directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from finetune.fields import absolute_path
from tests.conftest import (
    SMALL_MODEL,
    max_abs_diff,
    model_overrides,
    random_tokens,
    run_cli,
    small_params,
    write_jsonl,
)
from tests.test_lora_recipe import transformers_logits

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = [*model_overrides(SMALL_MODEL), "max_seq_len=128", "batch_size=2"]
ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("hi", "bye", "yes", "no")]


def user_files(directory: Path, small_checkpoint: Path) -> Path:
    """A checkpoint and data files under `directory`, as a user's project would hold them."""
    shutil.copytree(small_checkpoint, directory / "base")
    (directory / "data").mkdir()
    write_jsonl(directory / "data" / "train.jsonl", ROWS)
    write_jsonl(directory / "data" / "val.jsonl", ROWS[:2])
    return directory


def test_absolute_path_expands_home_and_keeps_unset_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_path("data/train.jsonl") == str(tmp_path / "data" / "train.jsonl")
    assert absolute_path("~/models/7b") == str(tmp_path / "home" / "models" / "7b")
    assert absolute_path("/srv/models") == "/srv/models"
    assert absolute_path("") == ""


def test_every_path_field_is_made_absolute_against_the_working_directory(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = user_files(tmp_path, small_checkpoint)
    (work / "adapter_in").mkdir()
    (work / "old_run").mkdir()
    monkeypatch.chdir(work)
    params = small_params(
        Path("base"),
        Path("out"),
        "recipe=lora",
        "tokenizer=base/tokenizer.model",
        "dataset.path=data/train.jsonl",
        "dataset.val_path=./data/val.jsonl",
        "adapter=adapter_in",
        "resume=old_run",
    )
    assert (params.checkpoint, params.tokenizer, params.output_dir) == (
        str(work / "base"),
        str(work / "base" / "tokenizer.model"),
        str(work / "out"),
    )
    assert params.dataset.path == str(work / "data" / "train.jsonl")
    assert params.dataset.val_path == str(work / "data" / "val.jsonl")
    assert (params.adapter, params.resume) == (str(work / "adapter_in"), str(work / "old_run"))


@pytest.mark.parametrize("word", ["true", "latest", "false", "True", ""])
def test_a_resume_word_is_not_taken_for_a_path(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, word: str
) -> None:
    monkeypatch.chdir(tmp_path)
    # Hydra reads `true` as a boolean, which the str field holds as "True".
    assert small_params(small_checkpoint, tmp_path, f"resume={word}").resume.lower() == word.lower()


def test_the_default_tokenizer_of_a_relative_checkpoint_is_absolute(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(user_files(tmp_path, small_checkpoint))
    params = small_params(Path("base"), Path("out"))
    assert params.tokenizer == str(tmp_path / "base" / "tokenizer.model")


def test_a_relative_checkpoint_gives_an_adapter_that_peft_loads_from_another_directory(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = user_files(tmp_path / "project", small_checkpoint)
    result = run_cli(
        "recipe=lora",
        "checkpoint=base",
        "dataset.path=data/train.jsonl",
        "hydra.run.dir=runs/first",
        *SMALL,
        "max_steps=3",
        "lr=1e-2",
        "warmup_steps=0",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    run_dir = work / "runs" / "first"
    saved = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert saved["checkpoint"] == str(work / "base")
    assert saved["tokenizer"] == str(work / "base" / "tokenizer.model")
    assert saved["dataset"]["path"] == str(work / "data" / "train.jsonl")
    assert saved["output_dir"] == str(run_dir)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "base")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base_name = peft.PeftConfig.from_pretrained(run_dir / "adapter").base_model_name_or_path
    base = transformers.AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    base_logits = base.eval()(random_tokens((2, 33), seed=0)).logits.detach()
    adapted = peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        adapted_logits = adapted(random_tokens((2, 33), seed=0)).logits
    assert max_abs_diff(adapted_logits, base_logits) > 1e-3  # the adapter was loaded and matters
    assert max_abs_diff(adapted_logits, transformers_logits(run_dir / "model")) <= 1e-4


def test_home_paths_are_expanded_in_the_run_and_in_messages(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    home = user_files(tmp_path / "home", small_checkpoint)
    work = tmp_path / "work"
    work.mkdir()
    # Hydra's override grammar reads a leading `~` only inside quotes.
    common = ["checkpoint='~/base'", *SMALL, "max_steps=1"]
    result = run_cli(
        *common,
        "dataset.path='~/data/train.jsonl'",
        "hydra.run.dir=run",
        cwd=work,
        env={"HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((work / "run" / "params.yaml").read_text())
    assert saved["checkpoint"] == str(home / "base")
    assert saved["dataset"]["path"] == str(home / "data" / "train.jsonl")
    assert (work / "run" / "model" / "model.safetensors").is_file()

    missing = run_cli(
        *common,
        "dataset.path='~/data/nope.jsonl'",
        "hydra.run.dir=run2",
        cwd=work,
        env={"HOME": str(home)},
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"error: dataset.path: file not found: {home / 'data' / 'nope.jsonl'}"
    )
