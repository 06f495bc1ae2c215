"""The architecture comes from the checkpoint: `model=auto` fills every field from config.json or
params.json, a field that is set must match it, what finetune cannot compute exactly is refused,
tied embeddings train and save as one weight, and the model is saved in the checkpoint's dtype."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.checkpoint import load_checkpoint, stored_dtype
from finetune.config import ModelConfig, build_params
from finetune.errors import UserError
from finetune.recipes import full, lora
from tests.conftest import (
    SMALL_MODEL,
    TINY_CHECKPOINT,
    TINY_TOKENIZER,
    compose_config,
    random_tokens,
    write_checkpoint,
    write_jsonl,
)
from tests.test_checkpoint_formats import META_MODEL, random_meta_weights, write_meta
from tests.test_model import hf_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CPU = torch.device("cpu")
# Not transformers' defaults, so a field that is not read from the checkpoint shows.
ODD_MODEL = dataclasses.replace(SMALL_MODEL, norm_eps=1e-4, rope_theta=500.0, context_length=512)
ROWS = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
    for i in range(8)
]


def auto_params(checkpoint: Path, out: Path, *overrides: str) -> object:
    """The params of a short `model=auto` run of `checkpoint` on eight records."""
    recipe = [o for o in overrides if o.startswith("recipe=")]
    rest = [o for o in overrides if not o.startswith("recipe=")]
    out.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(out.parent / f"{out.name}_data.jsonl", ROWS)
    return build_params(
        compose_config(
            [
                *recipe,
                "model=auto",
                f"checkpoint={checkpoint}",
                f"output_dir={out}",
                f"dataset.path={data}",
                "max_seq_len=128",
                "batch_size=2",
                *rest,
            ]
        )
    )


def with_config(checkpoint: Path, directory: Path, **changes: object) -> Path:
    """A copy of `checkpoint` whose config.json has `changes` (None removes a key)."""
    shutil.copytree(checkpoint, directory)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


@torch.no_grad()
def logits_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    tokens = random_tokens((2, 17))
    return (ours.eval()(tokens) - theirs.eval()(tokens).logits).abs().max().item()


def transformers_model(directory: Path, **kwargs: object) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)


# --------------------------------------------------------------------------------------------
# model=auto: every field from the checkpoint
# --------------------------------------------------------------------------------------------


def test_model_auto_takes_every_field_from_config_json(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt", ODD_MODEL)
    params = auto_params(checkpoint, tmp_path / "out")
    assert params.model == ODD_MODEL


def test_an_absent_config_key_means_what_it_means_to_transformers(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = with_config(
        small_checkpoint, tmp_path / "ckpt", rms_norm_eps=None, max_position_embeddings=None
    )
    params = auto_params(checkpoint, tmp_path / "out")
    assert (params.model.norm_eps, params.model.context_length) == (1e-6, 2048)


def test_model_auto_reads_meta_params_json_and_the_tokenizer_gives_its_vocabulary(
    tmp_path: Path,
) -> None:
    cfg = dataclasses.replace(META_MODEL, vocab_size=4096)  # the shipped tokenizer's
    write_meta(tmp_path / "meta", random_meta_weights(cfg))  # vocab_size -1
    shutil.copyfile(TINY_TOKENIZER, tmp_path / "meta" / "tokenizer.model")
    params = auto_params(tmp_path / "meta", tmp_path / "out", "max_steps=1")
    # Llama-2's context, since params.json names none; the vocabulary is left to the tokenizer.
    assert params.model == dataclasses.replace(cfg, vocab_size=0, context_length=4096)

    full.run(params)
    saved = yaml.safe_load((tmp_path / "out" / "params.yaml").read_text())["model"]
    assert saved == {**dataclasses.asdict(cfg), "context_length": 4096}


def test_a_named_option_that_differs_says_how_to_take_the_checkpoints_architecture(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError) as error:
        build_params(
            compose_config(
                ["model=llama2", f"checkpoint={small_checkpoint}", f"output_dir={tmp_path}"]
            )
        )
    assert str(error.value) == (
        f"{small_checkpoint}/config.json: vocab_size=4096 but model=llama2 has "
        "model.vocab_size=32000; leave out model= (or model=auto) to take the checkpoint's "
        "architecture"
    )


def test_an_override_that_differs_names_the_override(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError) as error:
        auto_params(small_checkpoint, tmp_path / "out", "model.dim=128")
    assert str(error.value) == (
        f"{small_checkpoint}/config.json: hidden_size=64 but model.dim=128; leave model.dim out "
        "to take the checkpoint's"
    )


def test_a_negative_architecture_field_is_refused(small_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        auto_params(small_checkpoint, tmp_path / "out", "model.dim=-64")
    assert str(error.value) == "model.dim: must be >= 0 (0 takes the checkpoint's), got -64"


def test_a_folder_of_checkpoints_lists_them(small_checkpoint: Path, tmp_path: Path) -> None:
    for run in ("b", "a"):
        shutil.copytree(small_checkpoint, tmp_path / "runs" / run)
    (tmp_path / "runs" / "notes.txt").write_text("two runs\n")
    with pytest.raises(UserError) as error:
        auto_params(tmp_path / "runs", tmp_path / "out")
    runs = tmp_path / "runs"
    assert str(error.value) == (
        f"checkpoint: {runs} holds no checkpoint, but its subfolders do: {runs}/a, {runs}/b; "
        "point checkpoint= at one"
    )


# --------------------------------------------------------------------------------------------
# What finetune cannot compute exactly is refused
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"hidden_act": "gelu"},
            'hidden_act="gelu" is not supported: finetune\'s feed-forward is SwiGLU',
        ),
        (
            {"model_type": "mistral", "sliding_window": 4096},
            'model_type="mistral" is not supported: finetune computes Llama models',
        ),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        (
            {"head_dim": 32},
            "head_dim=32 is not supported: finetune's heads are hidden_size / "
            "num_attention_heads = 16 wide",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
            'rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0} is not '
            "supported",
        ),
        (
            {"sliding_window": 64},
            "sliding_window=64 is not supported below max_seq_len=128: finetune attends to the "
            "whole sequence; set max_seq_len<=64",
        ),
        ({"hidden_size": "64"}, 'hidden_size is "64", expected an integer'),
        ({"torch_dtype": "float64"}, "torch_dtype='float64', expected one of float32, bfloat16"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_a_config_json_finetune_cannot_compute_exactly_is_refused(
    small_checkpoint: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    checkpoint = with_config(small_checkpoint, tmp_path / "ckpt", **changes)
    with pytest.raises(UserError) as error:
        auto_params(checkpoint, tmp_path / "out")
    assert str(error.value).startswith(f"{checkpoint}/config.json: {message}"), str(error.value)


def test_a_sliding_window_no_shorter_than_max_seq_len_changes_nothing(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = with_config(small_checkpoint, tmp_path / "ckpt", sliding_window=128)
    assert auto_params(checkpoint, tmp_path / "out").model.dim == SMALL_MODEL.dim


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"use_scaled_rope": True},
            "use_scaled_rope=true is not supported: finetune trains with Llama-2's unscaled",
        ),
        ({"moe_args": {"num_experts": 16}}, 'moe_args={"num_experts": 16} is not supported'),
    ],
    ids=["use_scaled_rope", "unknown_key"],
)
def test_a_params_json_finetune_cannot_compute_exactly_is_refused(
    tmp_path: Path, extra: dict, message: str
) -> None:
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
    write_meta(
        tmp_path / "meta",
        random_meta_weights(META_MODEL),
        params={**params, "norm_eps": 1e-5, "vocab_size": -1, **extra},
    )
    shutil.copyfile(TINY_TOKENIZER, tmp_path / "meta" / "tokenizer.model")
    with pytest.raises(UserError) as error:
        auto_params(tmp_path / "meta", tmp_path / "out")
    assert str(error.value).startswith(f"{tmp_path}/meta/params.json: {message}"), str(error.value)


# --------------------------------------------------------------------------------------------
# Context length
# --------------------------------------------------------------------------------------------


def test_a_context_beyond_the_checkpoints_needs_extend_context(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError) as error:
        auto_params(small_checkpoint, tmp_path / "out", "model.context_length=8192")
    assert str(error.value) == (
        "model.context_length: 8192 is longer than the checkpoint's max_position_embeddings=256 "
        f"({small_checkpoint}/config.json); set extend_context=true to train beyond it"
    )
    params = auto_params(
        small_checkpoint, tmp_path / "out", "model.context_length=8192", "extend_context=true"
    )
    assert params.model.context_length == 8192


def test_a_context_shorter_than_the_checkpoints_is_refused(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        UserError, match=r"max_position_embeddings=256 but model\.context_length=128"
    ):
        auto_params(small_checkpoint, tmp_path / "out", "model.context_length=128")


def test_max_seq_len_stays_within_the_checkpoints_context(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=r"max_seq_len: must be <= model.context_length=256"):
        auto_params(small_checkpoint, tmp_path / "out", "max_seq_len=512")


# --------------------------------------------------------------------------------------------
# A run of an fp16 checkpoint with a longer context: what it saves
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp16 checkpoint of ODD_MODEL (no dtype in its config.json) trained for two steps with
    its context doubled, saved in both formats with output_dtype=auto."""
    root = tmp_path_factory.mktemp("fp16_run")
    checkpoint = write_checkpoint(root / "ckpt", ODD_MODEL)
    weights = tensors(checkpoint / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, checkpoint / "model.safetensors")
    with_config(checkpoint, root / "fp16", torch_dtype=None)
    params = auto_params(
        root / "fp16",
        root / "out",
        "max_steps=2",
        "lr=1e-3",
        "model.context_length=1024",
        "extend_context=true",
        "output_format=meta",
    )
    full.run(params)
    return root


def test_params_yaml_records_the_checkpoints_architecture(fp16_run: Path) -> None:
    saved = yaml.safe_load((fp16_run / "out" / "params.yaml").read_text())
    assert saved["model"] == {**dataclasses.asdict(ODD_MODEL), "context_length": 1024}
    assert (saved["output_dtype"], saved["extend_context"]) == ("auto", True)


def test_the_saved_config_records_the_context_that_was_trained(fp16_run: Path) -> None:
    config = json.loads((fp16_run / "out" / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-4, 500.0)


def test_an_fp16_checkpoint_comes_back_fp16_in_both_formats(fp16_run: Path) -> None:
    model_dir = fp16_run / "out" / "model"
    assert stored_dtype(fp16_run / "fp16") == torch.float16  # from the weights: no torch_dtype
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "float16"
    assert {t.dtype for t in tensors(model_dir / "model.safetensors").values()} == {torch.float16}
    reference = transformers_model(model_dir)  # in the dtype its config names
    assert reference.config.dtype == torch.float16
    assert {p.dtype for p in reference.parameters()} == {torch.float16}
    meta = torch.load(fp16_run / "out" / "model_meta" / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in meta.values()} == {torch.float16}


def test_an_output_dtype_that_is_named_wins(small_checkpoint: Path, tmp_path: Path) -> None:
    params = auto_params(small_checkpoint, tmp_path / "out", "max_steps=1", "output_dtype=bf16")
    full.run(params)
    model_dir = tmp_path / "out" / "model"
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert transformers_model(model_dir).config.dtype == torch.bfloat16
    assert {t.dtype for t in tensors(model_dir / "model.safetensors").values()} == {torch.bfloat16}


def test_the_shipped_tiny_model_is_stored_in_bf16() -> None:
    assert stored_dtype(TINY_CHECKPOINT) == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Tied embeddings
# --------------------------------------------------------------------------------------------


TIED_MODEL = dataclasses.replace(SMALL_MODEL, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied Llama as transformers writes it: no lm_head.weight in the file."""
    directory = tmp_path_factory.mktemp("tied")
    torch.manual_seed(3)
    hf_llama(TIED_MODEL).save_pretrained(directory)
    shutil.copyfile(TINY_TOKENIZER, directory / "tokenizer.model")
    return directory


def test_a_tied_transformers_checkpoint_loads_as_one_weight_with_equal_logits(
    tied_checkpoint: Path, tmp_path: Path
) -> None:
    assert "lm_head.weight" not in tensors(tied_checkpoint / "model.safetensors")
    params = auto_params(tied_checkpoint, tmp_path / "out")
    assert params.model == TIED_MODEL
    model = load_checkpoint(params.model, tied_checkpoint, CPU, torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight
    theirs = transformers_model(tied_checkpoint, dtype=torch.float32)
    assert logits_diff(model, theirs) <= 1e-5


def with_lm_head(
    tied_checkpoint: Path, directory: Path, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> Path:
    """A copy of the tied checkpoint whose file holds lm_head.weight = lm_head(the embedding)."""
    shutil.copytree(tied_checkpoint, directory)
    weights = tensors(directory / "model.safetensors")
    weights["lm_head.weight"] = lm_head(weights["model.embed_tokens.weight"])
    save_file(weights, directory / "model.safetensors")
    return directory


def test_a_tied_checkpoint_holding_a_copy_of_the_embedding_as_lm_head_loads_tied(
    tied_checkpoint: Path, tmp_path: Path
) -> None:
    directory = with_lm_head(tied_checkpoint, tmp_path / "ckpt", torch.clone)
    model = load_checkpoint(TIED_MODEL, directory, CPU, torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight
    theirs = transformers_model(directory, dtype=torch.float32)
    assert logits_diff(model, theirs) <= 1e-5


def test_a_tied_checkpoint_with_a_different_lm_head_is_refused(
    tied_checkpoint: Path, tmp_path: Path
) -> None:
    directory = with_lm_head(tied_checkpoint, tmp_path / "ckpt", torch.randn_like)
    with pytest.raises(UserError) as error:
        load_checkpoint(TIED_MODEL, directory, CPU, torch.float32)
    assert str(error.value) == (
        f"{directory}/config.json: tie_word_embeddings=true but model.safetensors holds an "
        "lm_head.weight that differs from the embedding; set tie_word_embeddings to false to "
        "train both, or remove lm_head.weight to tie them"
    )


def check_saved_tied_model(out: Path) -> None:
    """`out/model` is tied as transformers writes it, trained, and gives finetune's logits."""
    model_dir = out / "model"
    saved = tensors(model_dir / "model.safetensors")
    assert "lm_head.weight" not in saved
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is True
    ours = load_checkpoint(TIED_MODEL, model_dir, CPU, torch.float32)
    theirs = transformers_model(model_dir, dtype=torch.float32)
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert logits_diff(ours, theirs) <= 1e-5


def test_full_training_of_a_tied_model_trains_one_weight_and_saves_it_tied(
    tied_checkpoint: Path, tmp_path: Path
) -> None:
    params = auto_params(
        tied_checkpoint, tmp_path / "out", "max_steps=3", "lr=1e-2", "output_format=meta"
    )
    full.run(params)
    before = load_checkpoint(TIED_MODEL, tied_checkpoint, CPU, torch.float32)
    after = load_checkpoint(TIED_MODEL, tmp_path / "out" / "model", CPU, torch.float32)
    assert not torch.equal(before.embed_tokens.weight, after.embed_tokens.weight)
    check_saved_tied_model(tmp_path / "out")
    # Meta's layout has a separate output layer: it holds the embedding.
    meta = torch.load(tmp_path / "out" / "model_meta" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(meta["output.weight"], meta["tok_embeddings.weight"])


def test_lora_on_a_tied_model_saves_it_tied_and_peft_agrees(
    tied_checkpoint: Path, tmp_path: Path
) -> None:
    params = auto_params(
        tied_checkpoint,
        tmp_path / "out",
        "recipe=lora",
        "max_steps=3",
        "lr=1e-2",
        "lora.dropout=0",
        "lora.targets=[q_proj,v_proj,down_proj]",
    )
    lora.run(params)
    check_saved_tied_model(tmp_path / "out")
    base = transformers_model(tied_checkpoint, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    merged = load_checkpoint(TIED_MODEL, tmp_path / "out" / "model", CPU, torch.float32)
    assert logits_diff(merged, adapted) <= 1e-4


def test_lora_on_lm_head_of_a_tied_model_is_refused(tied_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        auto_params(tied_checkpoint, tmp_path / "out", "recipe=lora", "lora.targets=[lm_head]")
    assert str(error.value) == (
        "lora.targets: lm_head is tied to the embedding (tie_word_embeddings), so an adapter on "
        "it would change the input embedding too; leave lm_head out"
    )


def test_model_config_fields_left_unset_are_not_a_buildable_model() -> None:
    from finetune.model import Llama

    with pytest.raises(ValueError, match="fields left to a checkpoint"):
        Llama(ModelConfig(dim=64))
