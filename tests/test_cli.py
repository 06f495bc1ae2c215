"""The command line as a user meets it: help, fast start-up, typing mistakes, runs, sweeps.

The matrix of bad inputs (one line, exit code 2, earlier outputs kept) is tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.overrides import command_line, split_flags
from tests.conftest import SMALL_MODEL, run_cli

TYPING_MISTAKES = [
    (
        ["lr=1e-3,"],
        "lr=1e-3,: a value cannot end with a comma: write lr=1e-3 (a sweep is -m lr=A,B)",
    ),
    (
        ["dataset.path=~/x"],
        """dataset.path=~/x: '~' needs quotes in a value; write 'dataset.path="~/x"'""",
    ),
    (
        ["recipe=lora", "lora.targets=[q_proj,", "v_proj]"],
        "lora.targets=[q_proj,: a list is one argument, without spaces: "
        "write 'lora.targets=[q_proj,v_proj]'",
    ),
    (
        ["dataset=/data/file.jsonl"],
        "dataset=/data/file.jsonl: dataset= picks an option (alpaca, chat, preference, "
        "preference_sample, sample); "
        "a file goes in dataset.path=/data/file.jsonl",
    ),
    (
        ["model=/ckpt/llama"],
        "model=/ckpt/llama: model= picks an option (auto, llama2, llama2_13b, llama2_70b, tiny); "
        "a checkpoint goes in checkpoint=/ckpt/llama",
    ),
    (["lr=abc", "--help"], "lr: Value 'abc' of type 'str' could not be converted to Float"),
    (
        ["recipe=nosuch", "--help"],
        "recipe=nosuch: no such option; available: dpo, eval, full, generate, lora",
    ),
]


@pytest.mark.parametrize(("args", "message"), TYPING_MISTAKES)
def test_a_mistyped_override_names_itself_and_the_fix(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("argv", "flags", "overrides"),
    [
        (["max_steps=2", "-m", "lr=1,2"], ["-m"], ["max_steps=2", "lr=1,2"]),
        (["lr=1", "--cfg", "job", "--resolve"], ["--cfg", "job", "--resolve"], ["lr=1"]),
        (["--info", "defaults", "lr=1"], ["--info", "defaults"], ["lr=1"]),
        (
            ["a=1", "--config-path", "/r/.hydra", "-cn", "config"],
            ["--config-path", "/r/.hydra", "-cn", "config"],
            ["a=1"],
        ),
    ],
)
def test_flags_move_ahead_of_overrides_with_their_values(
    argv: list[str], flags: list[str], overrides: list[str]
) -> None:
    assert split_flags(argv) == (flags, overrides)


def test_full_hydra_error_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("lr=-1", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError: lr: must be > 0" in result.stderr


def test_help_lists_groups_options_and_every_field(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    out = result.stdout
    assert re.search(r"\n  model +auto, llama2, llama2_13b, llama2_70b, tiny\*\n", out)
    assert re.search(r"\n  recipe +dpo, eval, full\*, generate, lora\n", out)
    # The default dataset is the default recipe's (recipes that read data pick it).
    assert re.search(r"\n  dataset +alpaca, chat, preference, preference_sample, sample\*\n", out)
    for field in ["lr ", "batch_size", "model.n_kv_heads", "dataset.column_map", "dtype"]:
        assert f"  {field}" in out
    assert "peak learning rate" in out and "(fp32|bf16)" in out
    # The tuning is picked by the model and recipe, and shown with the values a run would use:
    # tuning/tiny_full sets lr, tiny_lora another lr, and overrides win.
    assert re.search(
        r"\n  tuning +tiny_dpo, tiny_full, tiny_lora \(default: <model>_<recipe>, where", out
    )
    assert re.search(
        r"\n  lr +0\.001 +peak learning rate, reached after the warmup \(float, > 0\)", out
    )
    assert re.search(r"\n  batch_size +8 +sequences per micro-batch \(int, >= 1\)", out)
    lora = run_cli("--help", "recipe=lora", cwd=tmp_path).stdout
    assert re.search(r"\n  lr +0\.003 ", lora) and re.search(r"\n  lora\.rank +8 ", lora)
    assert re.search(r"\n  dtype +'fp32' +fp32, or bf16", out)
    overridden = run_cli("--help", "model=llama2", "lr=2e-5", cwd=tmp_path).stdout
    assert "values with model=llama2 lr=2e-5:" in overridden
    assert re.search(r"\n  lr +2e-05 ", overridden)
    assert re.search(r"\n  model\.dim +4096 ", overridden)


@pytest.mark.parametrize(
    "flags",
    [
        ["--help"],
        ["--cfg", "job"],
        ["--info"],
        ["--cfg", "job", "recipe=lora"],
        ["--help", "recipe=generate"],
        ["--cfg", "job", "recipe=eval"],
    ],
)
def test_cli_answers_without_importing_torch(flags: list[str], tmp_path: Path) -> None:
    code = (
        "import sys; from finetune.__main__ import main; "
        f"sys.argv = ['finetune', *{flags!r}]; main(); "
        "print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO TORCH")


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    result = run_cli("--cfg", "job", "lr=3e-4", "model=llama2_13b", cwd=tmp_path)
    assert result.returncode == 0
    assert "lr: 0.0003" in result.stdout and "dim: 5120" in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "finetune"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: finetune [GROUP=OPTION")


@pytest.mark.slow
def test_default_job_prints_plain_progress_and_writes_outputs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("max_steps=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("training started")
    steps = [line for line in lines[start + 1 :] if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"]
    pattern = r"step \d+/3 loss \d+\.\d{4} lr \S+e-\d\d grad_norm \d+\.\d\d tok/s \d+"
    assert all(re.fullmatch(pattern, s) for s in steps), steps
    for name in ["params.yaml", "metrics.jsonl", "loss.png", ".hydra/config.yaml"]:
        assert (run_dir / name).is_file(), name
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.model"]:
        assert (run_dir / "model" / name).is_file(), name


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_directory(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # -m after an override: Hydra's own parser takes flags only before them.
    result = run_cli(
        "max_steps=1",
        "-m",
        "lr=1e-4,3e-4",
        "warmup_steps=0",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lrs = []
    for job in ["0", "1"]:
        assert (sweep_dir / job / "model" / "model.safetensors").is_file()
        lrs.append(json.loads((sweep_dir / job / "metrics.jsonl").read_text())["lr"])
    assert lrs == [1e-4, 3e-4]


@pytest.mark.parametrize(
    ("overrides", "added"),
    [
        (["checkpoint=/ckpt/llama"], ["model=auto"]),
        (["checkpoint=/ckpt/llama", "model=llama2"], []),
        (["checkpoint=/ckpt/llama", "experiment=alpaca_lora_7b"], []),
        (["lr=1e-3"], []),
    ],
)
def test_a_checkpoint_without_a_model_option_takes_its_own_architecture(
    overrides: list[str], added: list[str]
) -> None:
    groups = {"model": ["auto", "llama2", "tiny"], "experiment": ["alpaca_lora_7b"]}
    assert command_line(overrides, groups) == [*overrides, *added]


def test_a_run_on_another_checkpoint_needs_no_model_option(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        f"checkpoint={small_checkpoint}",
        "max_steps=1",
        "max_seq_len=128",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((run_dir / "params.yaml").read_text())["model"]
    assert saved["name"] == ""  # model=auto: no option set these fields
    assert (saved["dim"], saved["n_layers"], saved["n_kv_heads"]) == (
        SMALL_MODEL.dim,
        SMALL_MODEL.n_layers,
        SMALL_MODEL.n_kv_heads,
    )
