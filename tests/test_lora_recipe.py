"""The LoRA recipe end to end: what it writes, that PEFT and transformers load it with our numbers,
that only the adapters train, continuing from an adapter, and a sweep over ranks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune import training
from finetune.checkpoint import load_checkpoint
from finetune.config import LoraFinetuneParams
from finetune.errors import UserError
from finetune.hf_format import hf_key
from finetune.lora import apply_lora
from finetune.model import Llama
from finetune.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, load_adapter
from finetune.recipes import lora as lora_recipe
from tests.conftest import (
    SMALL_MODEL,
    max_abs_diff,
    metrics_rows,
    model_overrides,
    random_tokens,
    run_cli,
    small_params,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0
DEFAULT_TARGETS = ["k_proj", "o_proj", "q_proj", "v_proj"]
# A high, constant learning rate: after a few steps every adapter is visibly away from zero.
FAST = ["lr=1e-2", "warmup_steps=0"]


def small_lora_params(checkpoint: Path, out: Path, *overrides: str) -> LoraFinetuneParams:
    return small_params(
        checkpoint, out, "recipe=lora", f"lora.rank={RANK}", f"lora.alpha={ALPHA}", *overrides
    )


def first_logged_loss(run_dir: Path) -> float:
    return metrics_rows(run_dir)[0]["loss"]


@torch.no_grad()
def our_adapted_logits(params: LoraFinetuneParams, adapter_dir: Path) -> torch.Tensor:
    """The recipe's model with a saved adapter loaded into it, unmerged."""
    model = load_checkpoint(params.model, Path(params.checkpoint), CPU, torch.float32)
    apply_lora(model, params.lora)
    load_adapter(model, adapter_dir)
    return model.eval()(random_tokens((2, 33), seed=0))


@torch.no_grad()
def peft_logits(checkpoint: Path, adapter_dir: Path) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    return model.eval()(random_tokens((2, 33), seed=0)).logits


@torch.no_grad()
def transformers_logits(model_dir: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()(random_tokens((2, 33), seed=0)).logits


@pytest.fixture(scope="module")
def finished_run(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora_run")
    lora_recipe.run(
        small_lora_params(small_checkpoint, out, "max_steps=4", "log_every_n_steps=2", *FAST)
    )
    return out


def test_adapter_config_describes_the_adapter_for_peft(
    finished_run: Path, small_checkpoint: Path
) -> None:
    config = json.loads((finished_run / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert config["target_modules"] == DEFAULT_TARGETS
    assert config["use_dora"] is False
    assert config["base_model_name_or_path"] == str(small_checkpoint)


def test_adapter_weights_have_peft_key_names_and_shapes(finished_run: Path) -> None:
    tensors = load_file(finished_run / "adapter" / ADAPTER_WEIGHTS)
    head_dim = SMALL_MODEL.head_dim
    out_features = {
        "q_proj": SMALL_MODEL.n_heads * head_dim,
        "k_proj": SMALL_MODEL.n_kv_heads * head_dim,
        "v_proj": SMALL_MODEL.n_kv_heads * head_dim,
        "o_proj": SMALL_MODEL.dim,
    }
    expected = {}
    for layer in range(SMALL_MODEL.n_layers):
        for target, out in out_features.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            in_features = SMALL_MODEL.dim if target != "o_proj" else SMALL_MODEL.n_heads * head_dim
            expected[f"{prefix}.lora_A.weight"] = (RANK, in_features)
            expected[f"{prefix}.lora_B.weight"] = (out, RANK)
    assert {key: tuple(t.shape) for key, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # B starts at zero; four steps must have moved every one of them.
    assert all(t.abs().max() > 0 for key, t in tensors.items() if "lora_B" in key)


def test_params_yaml_records_the_lora_section(finished_run: Path) -> None:
    saved = yaml.safe_load((finished_run / "params.yaml").read_text())
    assert set(saved) == set(LoraFinetuneParams.__dataclass_fields__)
    assert saved["lora"]["rank"] == RANK and saved["lora"]["alpha"] == ALPHA
    assert saved["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert saved["lora"]["use_dora"] is False
    assert saved["adapter"] == "" and saved["save_merged"] is True and saved["lr"] == 1e-2


def test_metrics_and_loss_plot_are_written(finished_run: Path) -> None:
    rows = metrics_rows(finished_run)
    assert [r["step"] for r in rows] == [2, 4]
    # No warmup: the cosine decay from 1e-2 has begun by the first logged step.
    assert all(0 < r["lr"] < 1e-2 and r["grad_norm"] > 0 and 0 < r["loss"] < 20 for r in rows)
    assert (finished_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merged_model_is_a_hugging_face_llama(finished_run: Path) -> None:
    model_dir = finished_run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == SMALL_MODEL.dim and config["torch_dtype"] == "float32"
    for name in ["model.safetensors", "generation_config.json", "tokenizer.model"]:
        assert (model_dir / name).is_file(), name
    # Merged means plain Llama weights: no adapter tensors, no `base` wrapper in the names.
    keys = load_file(model_dir / "model.safetensors").keys()
    assert not [k for k in keys if "lora" in k or ".base." in k]


def test_save_merged_false_writes_the_adapter_but_no_model(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    lora_recipe.run(
        small_lora_params(small_checkpoint, tmp_path, "max_steps=1", "save_merged=false")
    )
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not (tmp_path / "model").exists()


def test_peft_on_the_transformers_base_matches_our_adapted_model(
    finished_run: Path, small_checkpoint: Path
) -> None:
    params = small_lora_params(small_checkpoint, finished_run)
    ours = our_adapted_logits(params, finished_run / "adapter")
    theirs = peft_logits(small_checkpoint, finished_run / "adapter")
    base = transformers_logits(small_checkpoint)
    assert max_abs_diff(ours, base) > 1e-3  # the adapter does change the output
    assert max_abs_diff(ours, theirs) <= 1e-4


def test_merged_model_in_transformers_matches_peft(
    finished_run: Path, small_checkpoint: Path
) -> None:
    merged = transformers_logits(finished_run / "model")
    theirs = peft_logits(small_checkpoint, finished_run / "adapter")
    assert max_abs_diff(merged, theirs) <= 1e-4


def test_merging_changes_only_the_adapted_layers(
    finished_run: Path, small_checkpoint: Path
) -> None:
    base = load_file(small_checkpoint / "model.safetensors")
    merged = load_file(finished_run / "model" / "model.safetensors")
    assert base.keys() == merged.keys()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    adapted = {
        hf_key(f"layers.{layer}.self_attn.{target}.weight")
        for layer in range(SMALL_MODEL.n_layers)
        for target in DEFAULT_TARGETS
    }
    # Embedding, norms, the MLP and lm_head are bit-identical to the base.
    assert changed == adapted


def test_bf16_run_keeps_the_base_in_bf16_and_optimizes_only_fp32_adapters(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe's own `run`, with `train` and `build_optimizer` watched: what they were given
    and what the model holds once training is done (before merging changes it)."""
    seen: dict[str, Any] = {}

    def watch_build_optimizer(real: Callable) -> Callable:
        def build_optimizer(model: torch.nn.Module, *args: Any) -> torch.optim.Optimizer:
            seen["optimizer"] = real(model, *args)
            return seen["optimizer"]

        return build_optimizer

    def watch_train(real: Callable) -> Callable:
        def train(model: Llama, *args: Any) -> float:
            loss = real(model, *args)
            seen["adapters"] = adapter_state_dict(model)
            seen["frozen"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
            return loss

        return train

    monkeypatch.setattr(
        training, "build_optimizer", watch_build_optimizer(training.build_optimizer)
    )
    monkeypatch.setattr(lora_recipe, "train", watch_train(lora_recipe.train))
    params = small_lora_params(
        small_checkpoint, tmp_path, "max_steps=2", "dtype=bf16", "output_dtype=bf16", *FAST
    )
    loss = lora_recipe.run(params)
    assert 0 < loss < 20

    optimized = [p for group in seen["optimizer"].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in seen["adapters"].values()}
    assert all(p.dtype == torch.float32 for p in optimized)
    assert len(seen["trainable"]) == len(seen["adapters"]) == 2 * 4 * SMALL_MODEL.n_layers

    base = load_checkpoint(params.model, small_checkpoint, CPU, torch.bfloat16)
    frozen = {n: t for n, t in seen["frozen"].items() if n not in seen["trainable"]}
    # Every frozen tensor is the checkpoint's, in bf16, unchanged by training; wrapped layers
    # hold theirs as `<layer>.base.weight`.
    assert {n.replace(".base.", ".") for n in frozen} == set(base.state_dict())
    for name, tensor in frozen.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, base.get_parameter(name.replace(".base.", "."))), name

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    adapter = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert all(t.dtype == torch.float32 for t in adapter.values())


def test_adapter_override_continues_from_a_saved_adapter(
    finished_run: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    """Same seed, same first batch: the continued run starts from adapters already trained on it,
    so its first loss is lower than a fresh run's."""
    fresh, continued = tmp_path / "fresh", tmp_path / "continued"
    lora_recipe.run(small_lora_params(small_checkpoint, fresh, "max_steps=1", *FAST))
    lora_recipe.run(
        small_lora_params(
            small_checkpoint,
            continued,
            "max_steps=1",
            f"adapter={finished_run / 'adapter'}",
            *FAST,
        )
    )
    assert first_logged_loss(continued) < first_logged_loss(fresh) - 0.01
    saved = yaml.safe_load((continued / "params.yaml").read_text())
    assert saved["adapter"] == str(finished_run / "adapter")


def test_adapter_of_another_rank_is_a_user_error_naming_the_file_and_key(
    finished_run: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    adapter = finished_run / "adapter"
    params = small_lora_params(small_checkpoint, tmp_path, "lora.rank=8", f"adapter={adapter}")
    message = f"{adapter / ADAPTER_CONFIG}: r is {RANK} but this run's adapter has 8"
    with pytest.raises(UserError, match=re.escape(message)):
        lora_recipe.run(params)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "overrides",
    [["lora.use_dora=true"], ["lora.targets=[q_proj,v_proj,lm_head]"]],
    ids=["dora", "lm_head"],
)
def test_peft_loads_the_adapter_of_a_variant_with_equal_logits(
    small_checkpoint: Path, tmp_path: Path, overrides: list[str]
) -> None:
    params = small_lora_params(small_checkpoint, tmp_path, "max_steps=2", *FAST, *overrides)
    lora_recipe.run(params)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["use_dora"] is params.lora.use_dora
    assert config["target_modules"] == sorted(params.lora.targets)
    ours = our_adapted_logits(params, tmp_path / "adapter")
    theirs = peft_logits(small_checkpoint, tmp_path / "adapter")
    assert max_abs_diff(ours, transformers_logits(small_checkpoint)) > 1e-3
    assert max_abs_diff(ours, theirs) <= 1e-4
    assert max_abs_diff(transformers_logits(tmp_path / "model"), theirs) <= 1e-4


@pytest.mark.slow
def test_multirun_sweep_over_rank_and_lr_gives_each_job_its_adapter(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "recipe=lora",
        "lora.rank=4,8",
        "lr=1e-4,3e-4",
        "max_steps=1",
        "warmup_steps=0",
        *model_overrides(SMALL_MODEL),
        "max_seq_len=128",
        f"checkpoint={small_checkpoint}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    runs = set()
    for job in jobs:
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        rank, lr = int(overrides["lora.rank"]), float(overrides["lr"])
        adapter_config = json.loads((job / "adapter" / ADAPTER_CONFIG).read_text())
        assert adapter_config["r"] == rank, job
        assert (job / "adapter" / ADAPTER_WEIGHTS).is_file()
        assert json.loads((job / "metrics.jsonl").read_text())["lr"] == lr
        runs.add((rank, lr))
    assert runs == {(4, 1e-4), (4, 3e-4), (8, 1e-4), (8, 3e-4)}
