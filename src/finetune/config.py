"""Run parameters: one dataclass per recipe, the single source of truth for a run.

The dataclasses are registered in Hydra's ConfigStore as schemas (group `schema/...`); the YAML
files in `conf/` extend them through their defaults lists, so composition type-checks every value.
`OmegaConf.to_object` then builds the dataclass, which runs `__post_init__`: all validation lives
there. A field's own bounds are declared with it (`option(4, "...", ge=1)`) and checked by one
loop, `check_bounds`; checks that relate fields or read files are written out in `__post_init__`.
This module imports no torch, so `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune.architecture import resolve_architecture
from finetune.errors import ConfigError
from finetune.fields import (
    absolute_path,
    check_bounds,
    option,
    require,
    require_dir,
    require_file,
)

ASSETS_DIR = Path(__file__).parent / "assets"


def config_dir() -> Path:
    """`conf/` inside an installed wheel, else the repository's `conf/` (editable installs)."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


class DType(Enum):
    fp32 = "fp32"
    # bf16 autocast over fp32 master weights and fp32 optimizer state.
    bf16 = "bf16"


class OutputFormat(Enum):
    hf = "hf"
    meta = "meta"


class OutputDType(Enum):
    # The dtype the checkpoint's files hold: an fp16 checkpoint comes back fp16.
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def architecture_number(default: float, doc: str) -> Any:
    """A field of the architecture: 0 (its null value) leaves it to the checkpoint."""
    return option(default, doc, ge=0, note="0 takes the checkpoint's")


@dataclass
class ModelConfig:
    """Llama architecture. A field left at its null value (0, 0.0, false) is the checkpoint's,
    read from its config.json or params.json (`architecture.resolve_architecture`); a field
    that is set must match the checkpoint."""

    name: str = option("", "the model= option that set these fields (for messages); empty: auto")
    vocab_size: int = architecture_number(0, "tokens in the embedding and output layers")
    dim: int = architecture_number(0, "width of the residual stream (hidden_size)")
    n_layers: int = architecture_number(0, "transformer blocks")
    n_heads: int = architecture_number(0, "attention (query) heads")
    n_kv_heads: int = architecture_number(
        0, "key/value heads; fewer than n_heads is grouped-query attention"
    )
    ffn_dim: int = architecture_number(
        0, "hidden width of the SwiGLU feed-forward (intermediate_size)"
    )
    norm_eps: float = architecture_number(0.0, "RMSNorm epsilon")
    rope_theta: float = architecture_number(0.0, "rotary embedding base")
    context_length: int = architecture_number(
        0, "longest sequence: the checkpoint's max_position_embeddings, more with extend_context"
    )
    tie_word_embeddings: bool = option(
        False, "the output layer is the embedding (one weight), as config.json says"
    )

    def __post_init__(self) -> None:
        check_bounds(self, "model.")
        if not self.is_complete:
            return  # checked again once the checkpoint has filled it in
        if self.dim % self.n_heads:
            raise ConfigError("model.dim", f"{self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "model.n_kv_heads", f"{self.n_kv_heads} does not divide n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError("model.dim", f"head dimension {self.head_dim} must be even (rotary)")

    @property
    def is_complete(self) -> bool:
        """Every number given: no field is left for the checkpoint to fill."""
        return all(getattr(self, name) for name in ARCHITECTURE_NUMBERS)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


ARCHITECTURE_NUMBERS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "norm_eps",
    "rope_theta",
    "context_length",
)


# adamw: fp32 state (`torch.optim.AdamW`); adamw8bit: torchao's 8-bit state; adamw_offload:
# torchao's state and step in CPU memory beside a model on a GPU (see `finetune.optimizers`).
OPTIMIZERS = ("adamw", "adamw8bit", "adamw_offload")


DATASET_FORMATS = ("alpaca", "chat")
DATASET_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class ColumnMap:
    """The record field that holds each part, e.g. `dataset.column_map.instruction=prompt`."""

    instruction: str = option("instruction", "alpaca: field holding the instruction")
    input: str = option("input", "alpaca: field holding the optional input (context)")
    output: str = option("output", "alpaca: field holding the response to train on")
    messages: str = option(
        "messages", "chat: field holding the messages; if absent, ShareGPT's `conversations`"
    )


@dataclass
class DatasetConfig:
    """A local instruction dataset: Alpaca records, or chat conversations."""

    path: str = option("", "a .json (a list of records), .jsonl, .csv or .parquet file")
    format: str = option(
        "alpaca",
        "alpaca: instruction/input/output records; chat: conversations (Llama-2 chat)",
        choices=DATASET_FORMATS,
    )
    column_map: ColumnMap = option(doc="which record field holds each part", factory=ColumnMap)
    train_on_input: bool = option(
        False, "also compute the loss on the prompt (alpaca) or the user turns (chat)"
    )
    val_path: str = option(
        "", "validation data: a second file in the same format; empty for none (or val_split)"
    )
    val_split: float = option(
        0.0,
        "hold out this fraction of `path` for validation (seeded); 0 for none (or val_path)",
        ge=0,
        lt=1,
    )
    cache: bool = option(
        True,
        "keep tokenized data in $FINETUNE_CACHE (default ~/.cache/finetune/tokenized) and reuse "
        "it while data, tokenizer and settings are unchanged",
    )
    packed: bool = option(
        False,
        "train on rows of max_seq_len tokens that each hold several examples, end to end, each "
        "attending only to itself: less padding computed; batch_size then counts rows",
    )

    def __post_init__(self) -> None:
        _check_data_files(self)
        for key, path in (("dataset.path", self.path), ("dataset.val_path", self.val_path)):
            # A CSV cell holds text, not a list of messages.
            if self.format == "chat" and Path(path).suffix == ".csv":
                raise ConfigError(
                    key,
                    f"a CSV file holds Alpaca records only, not chat conversations: {path}; "
                    "use a .json, .jsonl or .parquet file for dataset.format=chat",
                )

    @property
    def has_validation(self) -> bool:
        return bool(self.val_path) or self.val_split > 0


def _check_data_files(cfg: DatasetConfig | PreferenceDatasetConfig) -> None:
    """What every dataset config checks of its files: absolute paths, bounds, one validation
    source at most, and the validation file there."""
    cfg.path, cfg.val_path = absolute_path(cfg.path), absolute_path(cfg.val_path)
    check_bounds(cfg, "dataset.")
    if cfg.val_path and cfg.val_split:
        raise ConfigError(
            "dataset.val_split", f"set either val_split or val_path ({cfg.val_path}), not both"
        )
    # Unlike `path`, the default ("") is valid here, so the file can be checked right away.
    if cfg.val_path:
        require_file(cfg.val_path, "dataset.val_path", suffixes=DATASET_SUFFIXES)


# The prompt formats a preference record's prompt string is wrapped in (message lists are always
# Llama-2 chat).
PREFERENCE_TEMPLATES = ("alpaca", "chat")


@dataclass
class PreferenceColumnMap:
    """The record field that holds each part, e.g. `dataset.column_map.chosen=good`."""

    prompt: str = option(
        "prompt", "the prompt: a string, or messages the answers follow (optional then)"
    )
    chosen: str = option("chosen", "the preferred answer: a string, or a list of messages")
    rejected: str = option("rejected", "the other answer, in the same form as chosen")


@dataclass
class PreferenceDatasetConfig:
    """Preference pairs from a local file: a prompt, the answer preferred and the one rejected."""

    path: str = option(
        "", "a .json (a list of records), .jsonl, .parquet or .csv (string records) file"
    )
    template: str = option(
        "alpaca",
        "the prompt format of string records: alpaca (Stanford Alpaca's prompt) or chat "
        "(Llama-2 chat); message lists are always chat",
        choices=PREFERENCE_TEMPLATES,
    )
    column_map: PreferenceColumnMap = option(
        doc="which record field holds each part", factory=PreferenceColumnMap
    )
    val_path: str = option(
        "", "validation pairs: a second file in the same format; empty for none (or val_split)"
    )
    val_split: float = option(
        0.0,
        "hold out this fraction of `path`'s pairs for validation (seeded); 0 for none",
        ge=0,
        lt=1,
    )

    def __post_init__(self) -> None:
        _check_data_files(self)

    @property
    def format(self) -> str:
        """The prompt format a model trained on these pairs answers in (its chat template)."""
        return self.template

    @property
    def has_validation(self) -> bool:
        return bool(self.val_path) or self.val_split > 0


@dataclass
class CheckpointParams:
    """What every recipe loads and where it writes: a checkpoint and its tokenizer, in a dtype on
    a device, seeded, and the run directory. Each recipe's params extend it."""

    model: ModelConfig = option(
        doc="architecture; unset fields are the checkpoint's", factory=ModelConfig
    )
    checkpoint: str = option(
        "", "model directory: Hugging Face (safetensors or .bin) or Meta (consolidated.NN.pth)"
    )
    tokenizer: str = option(
        "", "tokenizer.model (SentencePiece) or tokenizer.json; defaults to the checkpoint's"
    )
    output_dir: str = option("", "where the run writes its files; Hydra's run directory")
    dtype: DType = option(
        DType.fp32,
        "fp32, or bf16: training and eval autocast over fp32 weights, generate holds bf16 ones",
    )
    seed: int = option(0, "seeds weights, shuffling and everything random", ge=0, lt=2**32)
    device: Device = option(Device.auto, "auto picks cuda when present, else cpu")

    def _absolute_paths(self) -> None:
        self.checkpoint = absolute_path(self.checkpoint)
        self.tokenizer = absolute_path(self.tokenizer)
        self.output_dir = absolute_path(self.output_dir)

    def _require_output_dir(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir", "is required")

    def _resolve_model(self, max_seq_len: int, extend_context: bool = False) -> None:
        """The checkpoint directory checked and its architecture read into `model`."""
        require_dir(self.checkpoint, "checkpoint")
        self.model = resolve_architecture(
            self.model,
            Path(self.checkpoint),
            max_seq_len=max_seq_len,
            extend_context=extend_context,
        )

    def _resolve_tokenizer(self) -> None:
        if not self.tokenizer:
            self.tokenizer = str(_checkpoint_tokenizer(Path(self.checkpoint)))
        require_file(self.tokenizer, "tokenizer", suffixes=TOKENIZER_SUFFIXES)


# The learning rate's course after the warmup (schedule.lr_multiplier).
LR_SCHEDULES = ("cosine", "linear", "constant")


# The experiment trackers: each is a `logger.<name>` switch, set by conf/logger/<name>.yaml, and
# the package that `pip install 'finetune[<name>]'` installs for it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class LoggerConfig:
    """Experiment trackers that receive what metrics.jsonl gets (`logger=tensorboard`, or several:
    `logger=[tensorboard,mlflow]`), and the run's parameters as hyperparameters."""

    tensorboard: bool = option(False, "TensorBoard event files in <run dir>/tensorboard")
    wandb: bool = option(False, "Weights & Biases, offline: <run dir>/wandb, for `wandb sync`")
    mlflow: bool = option(False, "MLflow: a run in mlflow_uri's store")
    project: str = option("finetune", "the W&B project and the MLflow experiment")
    mlflow_uri: str = option(
        "", "MLflow tracking URI; empty: a file store in the sweep's or the run's mlruns/"
    )

    def __post_init__(self) -> None:
        for name, package in TRACKER_PACKAGES.items():
            if getattr(self, name) and not is_installed(package):
                raise ConfigError(
                    "logger", f"{name} needs its package: pip install 'finetune[{name}]'"
                )

    @property
    def chosen(self) -> list[str]:
        return [name for name in TRACKER_PACKAGES if getattr(self, name)]


def is_installed(package: str) -> bool:
    """Whether `package` can be imported, told without importing it (the CLI stays fast)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules as None: imports of it are blocked
        return False


@dataclass
class FullFinetuneParams(CheckpointParams):
    """Full fine-tuning: every weight of the model is trained."""

    dataset: DatasetConfig = option(doc="training data", factory=DatasetConfig)
    lr: float = option(2e-5, "peak learning rate, reached after the warmup", gt=0)
    warmup_steps: int = option(0, "optimizer steps of linear warmup from 0 to lr", ge=0)
    lr_schedule: str = option(
        "cosine",
        "after the warmup: cosine or linear decay to lr x min_lr_ratio at the last step, or "
        "constant at lr",
        choices=LR_SCHEDULES,
    )
    min_lr_ratio: float = option(
        0.0, "where the decay ends, as a fraction of lr (cosine and linear)", ge=0, lt=1
    )
    weight_decay: float = option(0.01, "AdamW weight decay, on weight matrices only", ge=0)
    optimizer: str = option(
        "adamw",
        "adamw: fp32 state; adamw8bit: 8-bit state (torchao); adamw_offload: state and update in "
        "CPU memory while the model trains on a GPU (torchao)",
        choices=OPTIMIZERS,
    )
    optimizer_in_backward: bool = option(
        False,
        "update each weight as soon as its gradient is ready and free that gradient: the whole "
        "gradient never exists at once (one process, no clipping, no accumulation)",
    )
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0 disables clipping", ge=0)
    batch_size: int = option(4, "sequences per micro-batch", ge=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", ge=1)
    epochs: int = option(1, "passes over the dataset", ge=1)
    max_steps: int = option(0, "stop after this many optimizer steps; 0 means no limit", ge=0)
    max_seq_len: int = option(512, "truncate longer sequences to this many tokens", ge=2)
    pad_to_multiple_of: int = option(
        1, "round each batch's length up to a multiple of this (64 helps bf16 on the CPU)", ge=1
    )
    shuffle: bool = option(True, "shuffle the data every epoch (seeded); false keeps file order")
    log_every_n_steps: int = option(
        1, "optimizer steps between progress lines and metrics rows", ge=1
    )
    eval_every_n_steps: int = option(
        0,
        "optimizer steps between validation passes; 0: only at the end (needs validation data)",
        ge=0,
    )
    early_stopping_patience: int = option(
        0, "stop after this many validation passes without a lower val_loss; 0 disables", ge=0
    )
    sample_prompts: int = option(
        0,
        "greedy answers to the first N validation (else training) prompts at each evaluation "
        "and at the end, in samples.jsonl and the log; 0 disables",
        ge=0,
    )
    save_every_n_steps: int = option(
        0,
        "optimizer steps between training-state checkpoints (and one per epoch); 0 disables",
        ge=0,
    )
    keep_last_n: int = option(2, "training-state checkpoints kept, the newest; 0 keeps all", ge=0)
    async_save: bool = option(
        False, "write checkpoints in the background while training goes on (a copy in CPU memory)"
    )
    resume: str = option(
        "",
        "continue a run: true (newest checkpoint of output_dir; with hydra.run.dir=<old run>), "
        "or a checkpoint or run directory",
    )
    skip_nonfinite_steps: int = option(
        0, "skip (no update) up to this many steps with a NaN/inf loss or gradient; 0: stop", ge=0
    )
    max_shard_size_mb: int = option(5000, "split the saved model.safetensors above this size", ge=1)
    activation_checkpointing: bool = option(
        False, "recompute each block's activations in the backward pass: less memory, more time"
    )
    compile: bool = option(False, "run the model through torch.compile")
    output_format: OutputFormat = option(
        OutputFormat.hf, "hf: model/ in Hugging Face format; meta: also model_meta/ in Meta's"
    )
    output_dtype: OutputDType = option(
        OutputDType.auto, "dtype of the saved model; auto: the checkpoint's stored dtype"
    )
    extend_context: bool = option(
        False, "allow a model.context_length beyond the checkpoint's (saved as the new one)"
    )
    nproc_per_node: int = option(
        1, "processes (one per GPU) on each node; above 1 the model is sharded (FSDP2)", ge=1
    )
    nnodes: int = option(1, "nodes the run spans, nproc_per_node processes on each", ge=1)
    cpu_offload: bool = option(
        False, "sharded runs: keep the sharded weights and optimizer state in CPU memory"
    )
    logger: LoggerConfig = option(
        doc="experiment trackers: logger=tensorboard, wandb, mlflow, several as [a,b], or none",
        factory=LoggerConfig,
    )

    def __post_init__(self) -> None:
        self._absolute_paths()
        if self.resume.lower() not in RESUME_WORDS:
            self.resume = absolute_path(self.resume)
        check_bounds(self)
        if self.resume and self.resume.lower() not in RESUME_WORDS:
            require_dir(self.resume, "resume")
        if self.lr_schedule == "constant" and self.min_lr_ratio:
            raise ConfigError(
                "min_lr_ratio",
                "a constant schedule does not decay; set lr_schedule=cosine or linear, or leave "
                "min_lr_ratio out",
            )
        for key in ("eval_every_n_steps", "early_stopping_patience"):
            if getattr(self, key) and not self.dataset.has_validation:
                raise ConfigError(
                    key, "needs validation data: set dataset.val_path or dataset.val_split"
                )
        # A sample's prompt is what comes before the example's first label: training on the
        # prompt too would leave nothing to tell the prompt from the answer by.
        if self.sample_prompts and self.dataset.train_on_input:
            raise ConfigError(
                "sample_prompts",
                "needs the prompts left out of the loss, which tells them from the answers; "
                "set dataset.train_on_input=false or sample_prompts=0",
            )
        self._check_optimizer()
        self._require_output_dir()
        # Required fields of nested parts are checked here: OmegaConf builds a nested dataclass
        # with its defaults when it reads the schema, so its own __post_init__ must accept them.
        require_file(self.dataset.path, "dataset.path", suffixes=DATASET_SUFFIXES)
        self._resolve_model(self.max_seq_len, self.extend_context)
        _require_within_context(self.max_seq_len, "max_seq_len", self.model)
        self._resolve_tokenizer()

    def _check_optimizer(self) -> None:
        """Refuse what the chosen optimizer cannot do, naming the setting in its way: one that
        needs the whole gradient at once, a checkpoint, or more than one process."""
        processes = self.nproc_per_node * self.nnodes
        if self.optimizer == "adamw_offload":
            if processes > 1:
                raise ConfigError(
                    "optimizer",
                    "adamw_offload runs on one GPU; a sharded run keeps its optimizer state in "
                    "CPU memory with cpu_offload=true",
                )
            if self.save_every_n_steps or self.resume.lower() not in ("", "false"):
                raise ConfigError(
                    "optimizer",
                    "adamw_offload's state (on the CPU, apart from the model) is not saved in "
                    "training-state checkpoints; set save_every_n_steps=0 and no resume, or "
                    "use adamw8bit",
                )
        if not self.optimizer_in_backward:
            return
        if self.optimizer == "adamw_offload":
            raise ConfigError("optimizer_in_backward", "works with optimizer=adamw or adamw8bit")
        for key, value, why in (
            ("gradient_accumulation_steps", 1, "the update cannot wait for later micro-batches"),
            ("max_grad_norm", 0, "the norm to clip by is known only once every gradient is"),
        ):
            if getattr(self, key) != value:
                raise ConfigError(
                    "optimizer_in_backward",
                    f"updates each weight during backward: {why}; set {key}={value}",
                )
        if processes > 1:
            raise ConfigError(
                "optimizer_in_backward",
                "runs on one process: a sharded run's gradients are complete only once "
                "reduced over the processes, after backward; set nproc_per_node=1 and nnodes=1",
            )


def _require_within_context(n_tokens: int, key: str, model: ModelConfig) -> None:
    require(
        n_tokens <= model.context_length,
        key,
        f"must be <= model.context_length={model.context_length}",
        n_tokens,
    )


# The values of `resume` that are not a path.
RESUME_WORDS = ("true", "latest", "false")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
TOKENIZER_SUFFIXES = (".model", ".json")


def _checkpoint_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer shipped with a checkpoint: in its directory, or (Meta's layout) above it."""
    for directory in (checkpoint, checkpoint.parent):
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                return directory / name
    raise ConfigError(
        "tokenizer", f"no {' or '.join(TOKENIZER_FILES)} in {checkpoint}; set tokenizer=PATH"
    )


# Every linear layer of the Llama, by its Hugging Face module name (the last part of it).
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
)


@dataclass
class LoraConfig:
    """Low-rank adapters: W x + (alpha / rank) * B A x, with W frozen."""

    rank: int = option(8, "rank r of the adapters A (r x in) and B (out x r)", ge=1)
    alpha: float = option(16.0, "the update is scaled by alpha / rank", gt=0)
    dropout: float = option(0.05, "dropout on the adapters' input", ge=0, lt=1)
    targets: list[str] = option(
        doc=f"layers to adapt, any of: {', '.join(LORA_TARGETS)}",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    use_dora: bool = option(False, "DoRA: also learn each output row's magnitude")
    # Adapted or not, every linear of the blocks is quantized, as in QLoRA: they hold most of the
    # weights (96 % of Llama-2-7B's). The embedding and lm_head stay dense, see
    # `qlora.quantize_base_weights`. Works with use_dora. Needs `pip install 'finetune[qlora]'`.
    quantize_base: bool = option(
        False, "QLoRA: keep the frozen linear weights of the transformer blocks in 4-bit NF4"
    )

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("lora.targets", f"name at least one of {', '.join(LORA_TARGETS)}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError(
                "lora.targets",
                f"unknown {', '.join(map(repr, unknown))}; valid names: {', '.join(LORA_TARGETS)}",
            )
        check_bounds(self, "lora.")


def _check_lm_head_adapter(model: ModelConfig, lora: LoraConfig) -> None:
    if model.tie_word_embeddings and "lm_head" in lora.targets:
        raise ConfigError(
            "lora.targets",
            "lm_head is tied to the embedding (tie_word_embeddings), so an adapter on it "
            "would change the input embedding too; leave lm_head out",
        )


@dataclass
class LoraFinetuneParams(FullFinetuneParams):
    """LoRA fine-tuning: the base model is frozen; only low-rank adapters train."""

    lora: LoraConfig = option(doc="the adapters", factory=LoraConfig)
    # Adapters start at zero and are small: they want a larger step than full fine-tuning.
    lr: float = option(3e-4, "peak learning rate, reached after the warmup", gt=0)
    adapter: str = option("", "an adapter directory (PEFT layout) to continue training from")
    save_merged: bool = option(True, "also write model/: the base with the adapters merged in")

    def __post_init__(self) -> None:
        self.adapter = absolute_path(self.adapter)
        super().__post_init__()
        _check_lm_head_adapter(self.model, self.lora)
        if self.adapter:
            require_dir(self.adapter, "adapter")
        # The Meta copy is of the merged model; an adapter has no Meta layout.
        require(
            self.save_merged or self.output_format is not OutputFormat.meta,
            "output_format",
            "meta needs the merged model: set save_merged=true",
            self.output_format.value,
        )


DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig:
    """Direct preference optimisation: the policy's log-probability ratio to the reference model
    (the checkpoint as loaded), chosen answer over rejected, pushed up."""

    beta: float = option(
        0.1, "the inverse temperature: how far from the reference the policy may go", gt=0
    )
    loss: str = option(
        "sigmoid",
        "sigmoid (the DPO paper's), ipo (squared distance to 1/(2 beta)), hinge (SLiC's)",
        choices=DPO_LOSSES,
    )
    label_smoothing: float = option(
        0.0, "sigmoid: the assumed share of pairs labelled the wrong way (cDPO)", ge=0, lt=0.5
    )
    lora: bool = option(
        False,
        "train LoRA adapters (lora.*) instead of every weight; the reference is then the model "
        "with its adapters disabled, else log-probabilities computed before training",
    )

    def __post_init__(self) -> None:
        check_bounds(self, "dpo.")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(
                "dpo.label_smoothing", f"applies to dpo.loss=sigmoid only, not {self.loss}"
            )


@dataclass
class DPOParams(FullFinetuneParams):
    """Preference tuning (DPO) of a model on pairs of answers, full or with LoRA adapters."""

    dataset: PreferenceDatasetConfig = option(
        doc="preference pairs", factory=PreferenceDatasetConfig
    )
    dpo: DPOConfig = option(doc="the preference loss and its reference", factory=DPOConfig)
    lora: LoraConfig = option(doc="the adapters, with dpo.lora=true", factory=LoraConfig)

    def __post_init__(self) -> None:
        # Before the parent's checks, which would ask the preference data for train_on_input.
        if self.sample_prompts:
            raise ConfigError(
                "sample_prompts", "recipe=dpo writes no samples; set sample_prompts=0"
            )
        super().__post_init__()
        if self.dpo.lora:
            _check_lm_head_adapter(self.model, self.lora)


@dataclass
class InferenceParams(CheckpointParams):
    """A trained model put to use, on one process: a checkpoint, with a LoRA adapter or without."""

    adapter: str = option(
        "", "a LoRA adapter directory (PEFT layout) to apply, unmerged, on the checkpoint"
    )

    def _resolve_adapter(self) -> None:
        self.adapter = absolute_path(self.adapter)
        if self.adapter:
            require_dir(self.adapter, "adapter")


# The prompt formats of `recipe=generate`: auto is chat for a model saved from chat data (its
# tokenizer_config.json carries finetune's chat template), else alpaca; none is the raw text.
TEMPLATES = ("auto", "alpaca", "chat", "none")


@dataclass
class GenerateParams(InferenceParams):
    """Generation: answers to a prompt, a file of prompts, or a conversation on the terminal."""

    prompt: str = option("", "answer this one prompt, streamed to stdout")
    prompts: str = option(
        "",
        "a .json, .jsonl, .csv or .parquet file of prompts (Alpaca records, or chat messages "
        "ending with the user's); the answers go to generations.jsonl",
    )
    template: str = option(
        "auto",
        "the prompt format: alpaca, chat (Llama-2), none (raw text); auto: chat for a model "
        "trained on chat data, else alpaca",
        choices=TEMPLATES,
    )
    max_new_tokens: int = option(256, "stop an answer after this many tokens (or at EOS)", ge=1)
    temperature: float = option(0.0, "sampling temperature; 0 is greedy", ge=0)
    top_k: int = option(0, "sample among the k most likely tokens; 0 keeps every token", ge=0)
    top_p: float = option(
        1.0, "sample from the smallest set of tokens whose probability reaches it"
    )
    compare_base: bool = option(
        False, "prompts=: also answer with the base model, as base_response in generations.jsonl"
    )
    base: str = option(
        "", "the base model for compare_base; default: the checkpoint without the adapter"
    )

    def __post_init__(self) -> None:
        self._absolute_paths()
        self._resolve_adapter()
        self.prompts, self.base = absolute_path(self.prompts), absolute_path(self.base)
        check_bounds(self)
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        if self.prompt and self.prompts:
            raise ConfigError("prompts", "set either prompt or prompts, not both")
        self._check_comparison()
        self._require_output_dir()
        if self.prompts:
            require_file(self.prompts, "prompts", suffixes=DATASET_SUFFIXES)
        self._resolve_model(self.max_new_tokens)
        context = self.model.context_length
        require(
            self.max_new_tokens < context,
            "max_new_tokens",
            f"must be below model.context_length={context}, which holds the prompt too",
            self.max_new_tokens,
        )
        self._resolve_tokenizer()

    def _check_comparison(self) -> None:
        if self.base and not self.compare_base:
            raise ConfigError("base", "is the model compare_base=true compares with; set both")
        if not self.compare_base:
            return
        if not self.prompts:
            raise ConfigError(
                "compare_base", "needs prompts=FILE: the base's answers go in generations.jsonl"
            )
        if not (self.adapter or self.base):
            raise ConfigError(
                "compare_base",
                "needs adapter=DIR (compared with the checkpoint alone) or base=DIR",
            )
        if self.base:
            require_dir(self.base, "base")


@dataclass
class EvalParams(InferenceParams):
    """Evaluation: the loss and perplexity of a model on a dataset, as training's validation."""

    dataset: DatasetConfig = option(
        doc="the data: its validation part when val_path or val_split is set, else all of path",
        factory=DatasetConfig,
    )
    max_seq_len: int = option(512, "truncate longer sequences, as the training run did", ge=2)
    batch_size: int = option(4, "sequences per batch (the loss does not depend on it)", ge=1)
    pad_to_multiple_of: int = option(
        1, "round each batch's length up to a multiple of this (64 helps bf16 on the CPU)", ge=1
    )

    def __post_init__(self) -> None:
        self._absolute_paths()
        self._resolve_adapter()
        check_bounds(self)
        self._require_output_dir()
        require_file(self.dataset.path, "dataset.path", suffixes=DATASET_SUFFIXES)
        self._resolve_model(self.max_seq_len)
        _require_within_context(self.max_seq_len, "max_seq_len", self.model)
        self._resolve_tokenizer()


@dataclass(frozen=True)
class Recipe:
    """A `recipe=<name>` option: the dataclass of its params, and `finetune.recipes.<name>`,
    whose `run(params)` runs them; that module is imported only when run, so that `--help` and
    `--cfg job` never load torch."""

    name: str
    params: type

    def run(self, params: Any) -> float:
        return importlib.import_module(f"finetune.recipes.{self.name}").run(params)


# Every recipe, by the name of its `conf/recipe/` option.
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("full", FullFinetuneParams),
        Recipe("lora", LoraFinetuneParams),
        Recipe("dpo", DPOParams),
        Recipe("generate", GenerateParams),
        Recipe("eval", EvalParams),
    )
}


def recipe_of(params: Any) -> Recipe:
    """The recipe whose dataclass `params` are: their exact type, as one recipe's params may
    subclass another's."""
    return next(recipe for recipe in RECIPES.values() if type(params) is recipe.params)


def register_schemas() -> None:
    """Store the dataclasses under `schema/...`, for the YAML files' defaults lists to extend."""
    store = ConfigStore.instance()
    for name, recipe in RECIPES.items():
        store.store(group="schema/recipe", name=name, node=recipe.params)
    store.store(group="schema/model", name="llama", node=ModelConfig)
    store.store(group="schema/dataset", name="instruct", node=DatasetConfig)
    store.store(group="schema/dataset", name="preference", node=PreferenceDatasetConfig)
    if not OmegaConf.has_resolver("asset"):
        # `${asset:NAME}` is a file shipped with the package, e.g. the embedded tiny model.
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir)


def run_dir() -> str:
    """`${run_dir:}`: Hydra's directory for this job (a sweep job's own subdirectory).

    Hydra sets it only when a job starts, so `--cfg job --resolve`, which starts none, shows the
    run directory a run started now would get.
    """
    hydra = HydraConfig.get()
    return OmegaConf.select(hydra, "runtime.output_dir", default=None) or hydra.run.dir


def model_preset(name: str) -> ModelConfig:
    """The architecture in `conf/model/<name>.yaml`, for scripts that run without Hydra."""
    preset = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
    fields = preset.get("model", preset)  # a `@package _global_` file nests it under `model:`
    return ModelConfig(**{k: v for k, v in fields.items() if k != "defaults"})


def build_params(cfg: DictConfig) -> Any:
    """Turn a composed config into its recipe's params dataclass, validating every value."""
    if not dataclasses.is_dataclass(OmegaConf.get_type(cfg)):
        cfg = with_schema(cfg)
    reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)


def with_schema(cfg: DictConfig) -> DictConfig:
    """A config composed without a schema, typed and checked by its recipe's dataclass.

    That is a past run's `.hydra/config.yaml` (`--config-path <run>/.hydra --config-name config`):
    Hydra saves the composed values, not the schema they were composed with. The recipe is the one
    whose dataclass has the most of its keys, then the fewest fields: full fine-tuning unless
    LoRA's keys are there.
    """
    keys = set(cfg)
    recipe = min(
        (recipe.params for recipe in RECIPES.values()),
        key=lambda params: (len(keys - _names(params)), len(_names(params))),
    )
    unknown = sorted(keys - _names(recipe))
    if unknown:
        raise unknown_key(unknown[0], recipe)
    return OmegaConf.merge(OmegaConf.structured(recipe), cfg)


def _names(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def unknown_key(key: str, schema: type) -> ConfigError:
    valid = ", ".join(f.name for f in dataclasses.fields(schema))
    return ConfigError(key, f"unknown key; valid keys: {valid}")


def reject_unknown_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Hydra lets `+model.typo=1` and `+nosuchkey=1` through; a misspelt key must not be ignored."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    for key in cfg:
        if key not in _names(schema):
            raise unknown_key(f"{prefix}{key}", schema)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            reject_unknown_keys(child, f"{prefix}{key}.")
