"""The bad-input matrix: every kind of wrong input (an override, a file, a data row, a checkpoint,
a tokenizer) stops the CLI with exit code 2 and one line naming the key or file, and leaves an
earlier run's outputs in the run directory exactly as they were."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import tokenizers
from omegaconf import OmegaConf

from finetune.errors import UserError
from finetune.outputs import check_no_finished_run
from finetune.recipes import full
from tests.conftest import (
    SMALL_MODEL,
    TINY_TOKENIZER,
    compose_config,
    model_overrides,
    run_cli,
    small_params,
    write_adapter,
    write_jsonl,
)

SMALL = [*model_overrides(SMALL_MODEL), "max_seq_len=128"]
ROW = {"instruction": "Say hi.", "input": "", "output": "Hi."}
CHAT_USER = {"role": "user", "content": "Say hi."}
CHAT_ASSISTANT = {"role": "assistant", "content": "Hi."}
PAIR = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Go away."}
# An earlier run's outputs, which a failed run must neither delete nor overwrite: those of a run
# stopped before its end, and of a finished one, which also left its model and adapter.
UNFINISHED_RUN = {
    "params.yaml": "lr: 0.001\n",
    "metrics.jsonl": '{"step": 1, "loss": 2.5}\n',
    "loss.png": "\x89PNG earlier plot\n",
}
FINISHED_RUN = {
    **UNFINISHED_RUN,
    "model/config.json": '{"hidden_size": 64}\n',
    "adapter/adapter_config.json": '{"r": 8}\n',
}


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    # A substring of the one error line; `{tmp}` stands for the case's files, `{run}` for the run
    # directory.
    message: str
    # A case that gets as far as reading the data, checkpoint or tokenizer runs where an unfinished
    # run was: in a finished run's directory a new run stops before it reads anything (the
    # `finished_run` case).
    reads_inputs: bool = False


def _files(tmp: Path, small_checkpoint: Path) -> None:
    """The bad files the cases name, all under `tmp`."""
    (tmp / "notes.txt").write_text("hello\n")
    write_jsonl(tmp / "missing_field.jsonl", [ROW, {"instruction": "a"}])
    nested = {"data": {"question": "Say hi."}, "output": "Hi."}
    write_jsonl(tmp / "missing_nested.jsonl", [nested, {"data": {"q": "a"}, "output": "b"}])
    (tmp / "bad_json.jsonl").write_text(json.dumps(ROW) + "\n{not json\n")
    (tmp / "not_a_list.json").write_text('{"instruction": "a"}')
    write_jsonl(tmp / "number_row.jsonl", [ROW])
    (tmp / "number_row.jsonl").write_text(json.dumps(ROW) + "\n42\n")
    (tmp / "dup_column.csv").write_text("instruction,instruction,output\na,b,c\n")
    write_jsonl(tmp / "good.jsonl", [ROW, ROW])
    (tmp / "empty_dir").mkdir()
    (tmp / "garbage.model").write_bytes(b"this is not a sentencepiece model")
    (tmp / "garbage.json").write_text("{not json")
    # A checkpoint whose weights file is not safetensors, beside a valid config.json.
    corrupt = tmp / "corrupt_checkpoint"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((small_checkpoint / "config.json").read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    (corrupt / "tokenizer.model").write_bytes(TINY_TOKENIZER.read_bytes())
    # Weights without their config.json.
    no_config = tmp / "no_config_checkpoint"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(
        (small_checkpoint / "model.safetensors").read_bytes()
    )
    # A valid model with no tokenizer beside it (or above it).
    no_tok = tmp / "parent" / "no_tokenizer_checkpoint"
    no_tok.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((small_checkpoint / name).read_bytes())
    (tmp / "latin1.jsonl").write_bytes(json.dumps(ROW).replace("hi", "h\xe9").encode("latin-1"))
    # A checkpoint whose config.json asks for scaled rotary embeddings.
    scaled = tmp / "rope_scaled_checkpoint"
    scaled.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (scaled / name).write_bytes((small_checkpoint / name).read_bytes())
    config = json.loads((small_checkpoint / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    # Checkpoints whose config.json describes what finetune cannot compute, or ties lm_head.
    for name, change in [
        ("gelu", {"hidden_act": "gelu"}),
        ("mistral", {"model_type": "mistral", "sliding_window": 4096}),
        ("tied", {"tie_word_embeddings": True}),
    ]:
        shutil.copytree(small_checkpoint, tmp / f"{name}_checkpoint")
        config = json.loads((small_checkpoint / "config.json").read_text())
        (tmp / f"{name}_checkpoint" / "config.json").write_text(json.dumps({**config, **change}))
    # A directory of runs, each with its checkpoint.
    for run in ("a", "b"):
        shutil.copytree(small_checkpoint, tmp / "runs" / run)
    # A tokenizer of four tokens.
    (tmp / "small_vocab").mkdir()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")).save(
        str(tmp / "small_vocab" / "tokenizer.json")
    )
    rank4 = tmp / "rank4_adapter"
    rank4.mkdir()
    (rank4 / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    # A past run's saved config (rerun with `--config-path <run>/.hydra`), edited to hold a key
    # no recipe has.
    saved = tmp / "saved_run" / ".hydra"
    saved.mkdir(parents=True)
    (saved / "config.yaml").write_text(OmegaConf.to_yaml(compose_config([])) + "epoch: 3\n")
    # A finished run of 2 steps, with the checkpoint of its last step; model=auto, as the CLI
    # reads `checkpoint=` without a model option.
    finished = tmp / "finished_run"
    full.run(
        small_params(
            small_checkpoint, finished, "model=auto", "max_steps=2", "save_every_n_steps=5"
        )
    )
    bad_adapter = tmp / "bad_json_adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text("{oops")
    # An adapter trained on a model of another width, and prompts files generation cannot read.
    narrow = dataclasses.replace(SMALL_MODEL, dim=32, n_heads=2, n_kv_heads=1)
    write_adapter(tmp / "narrow_adapter", Path("/models/narrow"), narrow)
    write_jsonl(tmp / "answered_chat.jsonl", [{"messages": [CHAT_USER, CHAT_ASSISTANT]}])
    # Preference pairs (recipe=dpo) that cannot be read as such.
    write_jsonl(tmp / "pair_no_rejected.jsonl", [PAIR, {"prompt": "Say hi.", "chosen": "Hi."}])
    (tmp / "pair_bad_json.jsonl").write_text(json.dumps(PAIR) + "\n{not json\n")
    write_jsonl(tmp / "pair_mixed.jsonl", [{**PAIR, "rejected": [CHAT_ASSISTANT]}])
    write_jsonl(tmp / "pair_list_prompt.jsonl", [{**PAIR, "prompt": [CHAT_USER]}])
    other_user = {"role": "user", "content": "Say bye."}
    write_jsonl(
        tmp / "pair_unshared.jsonl",
        [{"chosen": [CHAT_USER, CHAT_ASSISTANT], "rejected": [other_user, CHAT_ASSISTANT]}],
    )
    write_jsonl(tmp / "pair_unanswered.jsonl", [{"chosen": [CHAT_USER], "rejected": [CHAT_USER]}])


def good_run_args(ckpt: Path, inputs: Path) -> tuple[str, ...]:
    """The arguments of a run that would succeed, on the good data of `inputs`."""
    return (f"checkpoint={ckpt}", *SMALL, f"dataset.path={inputs}/good.jsonl")


def cases(ckpt: Path) -> list[Case]:
    good = ("dataset.path={tmp}/good.jsonl",)
    run = (f"checkpoint={ckpt}", *SMALL)
    lora = ("recipe=lora", *run, *good)
    generate = ("recipe=generate", "model=auto", f"checkpoint={ckpt}", "max_new_tokens=4")
    dpo = ("recipe=dpo", *run)
    reads = partial(Case, reads_inputs=True)
    return [
        # Overrides: caught while composing or validating the config, before anything is read.
        Case(
            "float_not_a_number",
            ("lr=abc",),
            "lr: Value 'abc' of type 'str' could not be converted to Float",
        ),
        Case(
            "int_not_a_number",
            ("recipe=lora", "lora.rank=abc"),
            "lora.rank: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        Case("negative_lr", ("lr=-1",), "lr: must be > 0, got -1.0"),
        Case("zero_batch", ("batch_size=0",), "batch_size: must be >= 1, got 0"),
        Case(
            "unknown_key",
            ("+nosuchkey=1",),
            "nosuchkey: unknown key; valid keys: model, checkpoint, tokenizer",
        ),
        Case(
            "unknown_model_key",
            ("+model.typo=1",),
            "model.typo: unknown key; valid keys: name, vocab_size, dim, n_layers",
        ),
        Case(
            "bad_enum", ("dtype=fp64",), "dtype: Invalid value 'fp64', expected one of [fp32, bf16]"
        ),
        Case(
            "bad_device",
            ("device=tpu",),
            "device: Invalid value 'tpu', expected one of [auto, cpu, cuda]",
        ),
        Case(
            "unknown_model",
            ("model=nosuch",),
            "model=nosuch: no such option; available: auto, llama2, llama2_13b, llama2_70b, tiny",
        ),
        Case(
            "unknown_recipe",
            ("recipe=nosuch",),
            "recipe=nosuch: no such option; available: dpo, eval, full, generate, lora",
        ),
        # The default tuning is skipped when absent; one given on the command line is not.
        Case(
            "unknown_tuning", ("tuning=nosuch",), "tuning=nosuch: no such option; available: tiny"
        ),
        Case("seq_over_context", ("max_seq_len=100000",), "max_seq_len: must be <= model."),
        Case("eval_without_val", ("eval_every_n_steps=5",), "eval_every_n_steps: needs valid"),
        Case(
            "samples_of_trained_prompts",
            ("sample_prompts=2", "dataset.train_on_input=true"),
            "sample_prompts: needs the prompts left out of the loss, which tells them from the "
            "answers; set dataset.train_on_input=false or sample_prompts=0",
        ),
        Case(
            "unknown_lr_schedule",
            ("lr_schedule=step",),
            "lr_schedule: unknown lr_schedule 'step'; expected one of: cosine, linear, constant",
        ),
        Case(
            "min_lr_ratio_of_one", ("min_lr_ratio=1",), "min_lr_ratio: must be in [0, 1), got 1.0"
        ),
        Case(
            "floor_of_a_constant_schedule",
            ("lr_schedule=constant", "min_lr_ratio=0.1"),
            "min_lr_ratio: a constant schedule does not decay; set lr_schedule=cosine or linear, "
            "or leave min_lr_ratio out",
        ),
        Case(
            "unknown_optimizer",
            ("optimizer=sgd",),
            "optimizer: unknown optimizer 'sgd'; expected one of: adamw, adamw8bit, adamw_offload",
        ),
        Case(
            "in_backward_clipping",
            ("optimizer_in_backward=true",),
            "optimizer_in_backward: updates each weight during backward: the norm to clip by is "
            "known only once every gradient is; set max_grad_norm=0",
        ),
        Case(
            "in_backward_accumulation",
            ("optimizer_in_backward=true", "max_grad_norm=0", "gradient_accumulation_steps=2"),
            "optimizer_in_backward: updates each weight during backward: the update cannot wait "
            "for later micro-batches; set gradient_accumulation_steps=1",
        ),
        Case(
            "in_backward_sharded",
            ("optimizer_in_backward=true", "max_grad_norm=0", "nproc_per_node=2"),
            "optimizer_in_backward: runs on one process: a sharded run's gradients are complete "
            "only once reduced over the processes, after backward; set nproc_per_node=1 and "
            "nnodes=1",
        ),
        Case(
            "in_backward_offload",
            ("optimizer_in_backward=true", "max_grad_norm=0", "optimizer=adamw_offload"),
            "optimizer_in_backward: works with optimizer=adamw or adamw8bit",
        ),
        Case(
            "offload_sharded",
            ("optimizer=adamw_offload", "nproc_per_node=2"),
            "optimizer: adamw_offload runs on one GPU; a sharded run keeps its optimizer state in "
            "CPU memory with cpu_offload=true",
        ),
        Case(
            "offload_checkpoints",
            ("optimizer=adamw_offload", "save_every_n_steps=10"),
            "optimizer: adamw_offload's state (on the CPU, apart from the model) is not saved in "
            "training-state checkpoints; set save_every_n_steps=0 and no resume, or use adamw8bit",
        ),
        reads(
            "offload_on_cpu",
            (*run, *good, "optimizer=adamw_offload", "device=cpu"),
            "optimizer: adamw_offload moves the optimizer state off a GPU into CPU memory, but the "
            "model is on the cpu: use optimizer=adamw (or adamw8bit) there",
        ),
        Case("lora_rank_zero", ("recipe=lora", "lora.rank=0"), "lora.rank: must be >= 1, got 0"),
        Case(
            "lora_target",
            ("recipe=lora", "lora.targets=[q_proj,nope]"),
            "lora.targets: unknown 'nope'; valid names: q_proj, k_proj",
        ),
        Case(
            "lora_dropout",
            ("recipe=lora", "lora.dropout=1.5"),
            "lora.dropout: must be in [0, 1), got 1.5",
        ),
        Case(
            "lora_alpha_zero", ("recipe=lora", "lora.alpha=0"), "lora.alpha: must be > 0, got 0.0"
        ),
        Case("lora_key_in_full", ("recipe=full", "lora.rank=8"), "lora: Key 'lora' not in"),
        Case(
            "dpo_loss",
            ("recipe=dpo", "dpo.loss=kl"),
            "dpo.loss: unknown loss 'kl'; expected one of: sigmoid, ipo, hinge",
        ),
        Case("dpo_beta_zero", ("recipe=dpo", "dpo.beta=0"), "dpo.beta: must be > 0, got 0.0"),
        Case(
            "dpo_smoothing_ipo",
            ("recipe=dpo", "dpo.loss=ipo", "dpo.label_smoothing=0.1"),
            "dpo.label_smoothing: applies to dpo.loss=sigmoid only, not ipo",
        ),
        Case(
            "dpo_samples",
            ("recipe=dpo", "sample_prompts=2"),
            "sample_prompts: recipe=dpo writes no samples; set sample_prompts=0",
        ),
        Case(
            "dpo_instruction_data",
            ("recipe=dpo", "dataset=alpaca"),
            "Merge error: DatasetConfig is not a subclass of PreferenceDatasetConfig",
        ),
        Case(
            "rerun_unknown_key",
            # A rerun logs under Hydra's default job name unless given the one finetune uses.
            (
                "--config-path",
                "{tmp}/saved_run/.hydra",
                "--config-name",
                "config",
                "hydra.job.name=finetune",
            ),
            "epoch: unknown key; valid keys: model, checkpoint, tokenizer, output_dir",
        ),
        # Files named by the config.
        Case("ckpt_empty_value", ("checkpoint=",), "checkpoint: is required (a directory)"),
        # A model option with no shipped checkpoint needs checkpoint=.
        Case("ckpt_not_given", ("model=llama2",), "checkpoint: is required (a directory)"),
        Case(
            "data_not_given",
            ("dataset=alpaca",),
            "dataset.path: is required (a .json, .jsonl, .csv or .parquet file)",
        ),
        Case("data_missing", ("dataset.path=/no/such.json",), "dataset.path: file not found"),
        Case("data_suffix", ("dataset.path={tmp}/notes.txt",), "dataset.path: expected a .json"),
        Case("val_missing", ("dataset.val_path=/no/v.jsonl",), "dataset.val_path: file not found"),
        Case(
            "chat_csv",
            ("dataset.format=chat", "dataset.path={tmp}/dup_column.csv"),
            "dataset.path: a CSV file holds Alpaca records only",
        ),
        Case("ckpt_missing", ("checkpoint=/no/such/dir",), "checkpoint: directory not found"),
        Case("adapter_missing", ("recipe=lora", "adapter=/no/d"), "adapter: directory not found"),
        Case("resume_missing", ("resume=/no/run",), "resume: directory not found: /no/run"),
        Case(
            "resume_shorter",
            (*run, "batch_size=2", "max_steps=1", "resume={tmp}/finished_run"),
            "step_000002: saved at step 2, after the 1 step of this run (max_steps=1); resume "
            "with a larger max_steps or epochs",
        ),
        # Data rows: found while reading the data, before the model is loaded.
        reads(
            "row_field", (*run, "dataset.path={tmp}/missing_field.jsonl"), "missing_field.jsonl:2"
        ),
        reads(
            "row_nested_field",
            (
                *run,
                "dataset.path={tmp}/missing_nested.jsonl",
                "dataset.column_map.instruction=data.question",
            ),
            "missing_nested.jsonl:2: missing field 'data.question'",
        ),
        reads(
            "row_json",
            (*run, "dataset.path={tmp}/bad_json.jsonl"),
            "bad_json.jsonl:2: invalid JSON",
        ),
        reads("row_type", (*run, "dataset.path={tmp}/number_row.jsonl"), "number_row.jsonl:2"),
        reads("json_not_list", (*run, "dataset.path={tmp}/not_a_list.json"), "not_a_list.json"),
        reads("csv_dup_column", (*run, "dataset.path={tmp}/dup_column.csv"), "dup_column.csv:1"),
        reads("not_utf8", (*run, "dataset.path={tmp}/latin1.jsonl"), "latin1.jsonl: not UTF-8"),
        # The model, refused by every process as it is built (after the data is read): QLoRA's
        # 4-bit base splits over the processes evenly or not at all.
        reads(
            "qlora_sharded_uneven",
            (*lora, "lora.quantize_base=true", "nproc_per_node=2"),
            "lora.quantize_base: layers.0.self_attn.q_proj has 4096 weights (64x64), which do not "
            "split over 2 processes into equal parts of whole rows, each a multiple of 16384",
        ),
        # Checkpoints.
        reads(
            "ckpt_empty",
            ("checkpoint={tmp}/empty_dir", "tokenizer=" + str(TINY_TOKENIZER), *SMALL, *good),
            "empty_dir",
        ),
        Case(
            "ckpt_empty_dir", ("checkpoint={tmp}/empty_dir",), "checkpoint: {tmp}/empty_dir is an"
        ),
        Case(
            "ckpt_arch",
            ("model=tiny", f"checkpoint={ckpt}", *good),
            "config.json: hidden_size=64 but model=tiny has model.dim=256; leave out model= "
            "(or model=auto) to take the checkpoint's architecture",
        ),
        Case(
            "ckpt_arch_llama2",
            ("model=llama2", f"checkpoint={ckpt}", *good),
            "config.json: vocab_size=4096 but model=llama2 has model.vocab_size=32000",
        ),
        Case(
            "ckpt_vocab_override",
            (*run, "model.vocab_size=1000", *good),
            "config.json: vocab_size=4096 but model.vocab_size=1000; leave model.vocab_size out",
        ),
        Case(
            "ckpt_hidden_act",
            ("model=auto", "checkpoint={tmp}/gelu_checkpoint", *good),
            'gelu_checkpoint/config.json: hidden_act="gelu" is not supported',
        ),
        Case(
            "ckpt_model_type",
            ("model=auto", "checkpoint={tmp}/mistral_checkpoint", *good),
            'mistral_checkpoint/config.json: model_type="mistral" is not supported',
        ),
        Case(
            "ckpt_context",
            ("model=auto", f"checkpoint={ckpt}", "model.context_length=8192", *good),
            "model.context_length: 8192 is longer than the checkpoint's "
            "max_position_embeddings=256",
        ),
        Case(
            "ckpt_folder",
            ("model=auto", "checkpoint={tmp}/runs", *good),
            "checkpoint: {tmp}/runs holds no checkpoint, but its subfolders do: {tmp}/runs/a, "
            "{tmp}/runs/b; point checkpoint= at one",
        ),
        Case(
            "lora_lm_head_tied",
            (*lora, "checkpoint={tmp}/tied_checkpoint", "lora.targets=[lm_head]"),
            "lora.targets: lm_head is tied to the embedding",
        ),
        reads(
            "ckpt_corrupt",
            ("checkpoint={tmp}/corrupt_checkpoint", *SMALL, *good),
            "model.safetensors: not a readable",
        ),
        reads(
            "ckpt_no_config",
            (
                "checkpoint={tmp}/no_config_checkpoint",
                "tokenizer=" + str(TINY_TOKENIZER),
                *SMALL,
                *good,
            ),
            "no config.json",
        ),
        reads(
            "ckpt_rope_scaling",
            ("checkpoint={tmp}/rope_scaled_checkpoint", *SMALL, *good),
            'config.json: rope_scaling={"type": "linear", "factor": 2.0} is not supported',
        ),
        reads(
            "adapter_rank", (*lora, "adapter={tmp}/rank4_adapter"), "adapter_config.json: r is 4"
        ),
        reads(
            "adapter_json",
            (*lora, "adapter={tmp}/bad_json_adapter"),
            "adapter_config.json: not valid JSON",
        ),
        # Tokenizers.
        Case("tok_missing", ("tokenizer=/no/such.model",), "tokenizer: file not found"),
        Case("tok_suffix", ("tokenizer={tmp}/notes.txt",), "tokenizer: expected a .model or .json"),
        Case(
            "tok_absent",
            ("checkpoint={tmp}/parent/no_tokenizer_checkpoint", *SMALL),
            "tokenizer: no tokenizer.model or tokenizer.json",
        ),
        reads(
            "tok_garbage",
            (*run, *good, "tokenizer={tmp}/garbage.model"),
            "garbage.model: not a SentencePiece model",
        ),
        reads("tok_json_garbage", (*run, *good, "tokenizer={tmp}/garbage.json"), "garbage.json"),
        reads(
            "tok_vocab",
            (*run, *good, "tokenizer={tmp}/small_vocab/tokenizer.json"),
            "tokenizer.json: tokenizer has 4 tokens but the model's embedding has 4096",
        ),
        # Generation and evaluation.
        Case("gen_no_checkpoint", ("recipe=generate", "checkpoint="), "checkpoint: is required"),
        Case(
            "gen_temperature",
            (*generate, "temperature=-0.5"),
            "temperature: must be >= 0, got -0.5",
        ),
        Case("gen_top_p", (*generate, "top_p=1.5"), "top_p: must be in (0, 1], got 1.5"),
        Case("gen_top_p_zero", (*generate, "top_p=0"), "top_p: must be in (0, 1], got 0.0"),
        Case("gen_top_k", (*generate, "top_k=-1"), "top_k: must be >= 0, got -1"),
        Case(
            "gen_max_new_tokens",
            ("recipe=generate", "model=auto", f"checkpoint={ckpt}", "max_new_tokens=256"),
            "max_new_tokens: must be below model.context_length=256, which holds the prompt too, "
            "got 256",
        ),
        Case(
            "gen_prompt_and_prompts",
            (*generate, "prompt=Hi", "prompts={tmp}/good.jsonl"),
            "prompts: set either prompt or prompts, not both",
        ),
        Case("gen_prompts_missing", (*generate, "prompts=/no/p.jsonl"), "prompts: file not found"),
        Case(
            "gen_compare_without_prompts",
            (*generate, "prompt=Hi", "compare_base=true", "adapter={tmp}/narrow_adapter"),
            "compare_base: needs prompts=FILE: the base's answers go in generations.jsonl",
        ),
        Case(
            "gen_compare_without_base",
            (*generate, "prompts={tmp}/good.jsonl", "compare_base=true"),
            "compare_base: needs adapter=DIR (compared with the checkpoint alone) or base=DIR",
        ),
        Case(
            "gen_one_process",
            (*generate, "prompt=Hi", "nproc_per_node=2"),
            "nproc_per_node: Key 'nproc_per_node' not in 'GenerateParams'",
        ),
        Case(
            "eval_without_data",
            ("recipe=eval", "dataset=alpaca"),
            "dataset.path: is required (a .json, .jsonl, .csv or .parquet file)",
        ),
        Case(
            "gen_no_prompt",
            generate,
            "prompt: nothing to answer: set prompt=TEXT or prompts=FILE, pipe messages to stdin "
            "(one a line), or run on a terminal to chat",
        ),
        reads(
            "gen_prompts_row",
            (*generate, "prompts={tmp}/bad_json.jsonl"),
            "bad_json.jsonl:2: invalid JSON",
        ),
        reads(
            "gen_prompts_chat_answered",
            (*generate, "template=chat", "prompts={tmp}/answered_chat.jsonl"),
            "answered_chat.jsonl:1: messages: the last message must be the user's, for the model "
            "to answer",
        ),
        reads(
            "gen_prompt_too_long",
            (*generate, "max_new_tokens=250", "prompt=Say hi."),
            "prompt: 51 prompt tokens + max_new_tokens=250 exceed the model's context length of "
            "256; lower max_new_tokens or shorten it",
        ),
        reads(
            "gen_adapter_of_another_base",
            (*generate, "prompt=Hi", "adapter={tmp}/narrow_adapter"),
            "narrow_adapter/adapter_model.safetensors: base_model.model.model.layers.0.self_attn."
            "q_proj.lora_A.weight has shape (4, 32), expected (4, 64) (the adapter's base model: "
            "/models/narrow)",
        ),
        reads(
            "eval_adapter_of_another_base",
            ("recipe=eval", *run, *good, "adapter={tmp}/narrow_adapter"),
            "has shape (4, 32), expected (4, 64) (the adapter's base model: /models/narrow)",
        ),
        reads(
            "pair_missing_field",
            (*dpo, "dataset.path={tmp}/pair_no_rejected.jsonl"),
            "pair_no_rejected.jsonl:2: missing field 'rejected'",
        ),
        reads(
            "pair_mixed_answers",
            (*dpo, "dataset.path={tmp}/pair_mixed.jsonl"),
            "pair_mixed.jsonl:1: fields 'chosen' and 'rejected' must both be strings or both "
            "lists of messages, got str and list",
        ),
        reads(
            "pair_list_prompt",
            (*dpo, "dataset.path={tmp}/pair_list_prompt.jsonl"),
            "pair_list_prompt.jsonl:1: field 'prompt' must be a string, as the answers are, got "
            "list",
        ),
        reads(
            "pair_unshared_prefix",
            (*dpo, "dataset.path={tmp}/pair_unshared.jsonl"),
            "pair_unshared.jsonl:1: 'chosen' and 'rejected' must share every message but the last "
            "(the answers)",
        ),
        reads(
            "pair_unanswered",
            (*dpo, "dataset.path={tmp}/pair_unanswered.jsonl"),
            "pair_unanswered.jsonl:1: chosen: the last message must be the assistant's answer",
        ),
        reads(
            "pair_bad_json",
            (*dpo, "dataset.path={tmp}/pair_bad_json.jsonl"),
            "pair_bad_json.jsonl:2: invalid JSON",
        ),
        # The output directory, checked before anything is read.
        Case(
            "finished_run",
            (*run, *good),
            "{run}/adapter: holds the adapter of a finished run; choose another hydra.run.dir "
            "(with adapter={run}/adapter to train it further)",
        ),
        Case(
            "output_not_a_dir",
            (*run, *good, "output_dir={tmp}/notes.txt/out"),
            "output_dir={tmp}/notes.txt/out: not a writable directory (Not a directory)",
        ),
    ]


CASE_IDS = [c.id for c in cases(Path("/ckpt"))]


@pytest.fixture(scope="module")
def inputs(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    _files(tmp, small_checkpoint)
    return tmp


def write_files(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_exits_2_naming_the_problem_and_keeps_earlier_outputs(
    index: int, inputs: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    case = cases(small_checkpoint)[index]
    run_dir = tmp_path / "run"
    write_files(run_dir, UNFINISHED_RUN if case.reads_inputs else FINISHED_RUN)
    before = snapshot(run_dir)

    args = [a.replace("{tmp}", str(inputs)) for a in case.args]
    result = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)

    message = case.message.replace("{tmp}", str(inputs)).replace("{run}", str(run_dir))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (args, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    after = snapshot(run_dir)
    # What a failed run may write is Hydra's record of it (.hydra/, an empty finetune.log).
    # Every earlier output stays byte for byte, and no model/, metrics or params appear.
    assert {
        k: v for k, v in after.items() if not k.startswith(".hydra/") and k != "finetune.log"
    } == before


def test_a_new_run_where_a_finished_run_left_its_model_is_refused_and_told_how_to_go_on(
    small_checkpoint: Path, inputs: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = good_run_args(small_checkpoint, inputs)
    first = run_cli(*args, "max_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    earlier = snapshot(run_dir)

    rerun = run_cli(*args, "max_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert rerun.returncode == 2
    assert rerun.stderr.strip() == (
        f"error: {run_dir}/model: holds the model of a finished run; choose another "
        f"hydra.run.dir (with checkpoint={run_dir}/model to train it further)"
    )
    assert {k: v for k, v in snapshot(run_dir).items() if not k.startswith(".hydra/")} == {
        k: v for k, v in earlier.items() if not k.startswith(".hydra/")
    }

    # The way forward the message gives works.
    further = tmp_path / "further"
    go_on = run_cli(
        *args,
        f"checkpoint={run_dir}/model",
        "max_steps=1",
        f"hydra.run.dir={further}",
        cwd=tmp_path,
    )
    assert go_on.returncode == 0, go_on.stderr
    assert (further / "model" / "model.safetensors").is_file()


def test_a_new_run_where_a_finished_run_left_only_its_adapter_is_refused(
    small_checkpoint: Path, inputs: Path, tmp_path: Path
) -> None:
    """A LoRA run with save_merged=false leaves adapter/ and no model/."""
    run_dir = tmp_path / "run"
    write_files(run_dir, {"adapter/adapter_config.json": '{"r": 8}\n'})
    result = run_cli(
        "recipe=lora",
        *good_run_args(small_checkpoint, inputs),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {run_dir}/adapter: holds the adapter of a finished run; choose another "
        f"hydra.run.dir (with adapter={run_dir}/adapter to train it further)"
    )
    assert snapshot(run_dir / "adapter") == {"adapter_config.json": b'{"r": 8}\n'}


def test_a_finished_run_with_step_checkpoints_is_offered_a_longer_resume(tmp_path: Path) -> None:
    write_files(
        tmp_path, {"model/config.json": "{}\n", "checkpoints/step_000004/training.json": ""}
    )
    with pytest.raises(UserError) as caught:
        check_no_finished_run(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}/model: holds the model of a finished run; choose another hydra.run.dir "
        f"(with checkpoint={tmp_path}/model to train it further), or resume=true with a larger "
        "max_steps"
    )
