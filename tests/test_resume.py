"""Training-state checkpoints: exact resume, retention, atomic saves, resume errors, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import model as llama
from finetune import training
from finetune.config import FullFinetuneParams
from finetune.errors import UserError
from finetune.recipes import full, lora
from finetune.schedule import lr_multiplier
from tests.conftest import (
    SAMPLE_DATA,
    SMALL_MODEL,
    logged_losses,
    metrics_rows,
    model_overrides,
    run_cli,
    run_cli_signalled,
    small_params,
)

# 14 examples in micro-batches of 2, two per optimizer step: 4 steps an epoch, the last of one
# micro-batch. Step 3 stops mid-epoch; step 4 ends epoch 0, so 6 steps cross into epoch 1.
N_EXAMPLES = 14
RECIPES: dict[str, tuple[Callable[[FullFinetuneParams], float], list[str], str]] = {
    "full": (full.run, ["lr=1e-3"], "model/model.safetensors"),
    # Dropout > 0 so the RNG state decides the masks after the resume.
    "lora": (
        lora.run,
        ["recipe=lora", "lora.dropout=0.2", "save_merged=false"],
        "adapter/adapter_model.safetensors",
    ),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = SAMPLE_DATA.read_text().splitlines(keepends=True)[:N_EXAMPLES]
    path.write_text("".join(lines))
    return path


# 6 steps of two micro-batches, shuffled, over 2 epochs, with a checkpoint every 3.
SCHEDULE = (
    "gradient_accumulation_steps=2",
    "shuffle=true",
    "epochs=2",
    "max_steps=6",
    "save_every_n_steps=3",
)


def params_for(
    recipe: str, checkpoint: Path, data: Path, out: Path, *overrides: str
) -> FullFinetuneParams:
    # model=auto: what the CLI reads `checkpoint=` without a model option as (cli_args).
    return small_params(
        checkpoint,
        out,
        "model=auto",
        f"dataset.path={data}",
        *SCHEDULE,
        *RECIPES[recipe][1],
        *overrides,
    )


def steps_on_disk(run_dir: Path) -> list[str]:
    return sorted(d.name for d in (run_dir / "checkpoints").iterdir())


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the run die as step `step` begins, like a killed process (its checkpoints stay)."""
    real_step = training.train_step
    calls = []

    def dying_step(*args: object, **kwargs: object) -> training.StepResult:
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", dying_step)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_three_steps_then_resume_matches_six_straight_steps_bit_for_bit(
    recipe: str,
    small_checkpoint: Path,
    small_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, _, weights_file = RECIPES[recipe]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(params_for(recipe, small_checkpoint, small_data, straight))

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run(params_for(recipe, small_checkpoint, small_data, resumed))
    assert steps_on_disk(resumed) == ["step_000003"]
    # What a kill -9 during the next save leaves behind: a partial temporary directory.
    partial = resumed / "checkpoints" / "step_000006.tmp"
    partial.mkdir()
    (partial / "training.json").write_bytes(b"truncated")
    run(params_for(recipe, small_checkpoint, small_data, resumed, "resume=true"))

    assert logged_losses(resumed) == logged_losses(straight)
    assert [step for step, _ in logged_losses(resumed)] == [1, 2, 3, 4, 5, 6]
    expected, actual = load_file(straight / weights_file), load_file(resumed / weights_file)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # Epoch 0 ended at step 4; keep_last_n=2 dropped step 3; the partial save is gone.
    assert steps_on_disk(straight) == steps_on_disk(resumed) == ["step_000004", "step_000006"]


def test_a_checkpoint_written_in_the_background_resumes_as_a_synchronous_one(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    """async_save: DCP writes a copy of the state while the next steps change the weights."""
    sync, background = tmp_path / "sync", tmp_path / "background"
    full.run(params_for("full", small_checkpoint, small_data, sync, "keep_last_n=0"))
    overrides = ("keep_last_n=0", "async_save=true")
    full.run(params_for("full", small_checkpoint, small_data, background, *overrides))
    assert steps_on_disk(background) == ["step_000003", "step_000004", "step_000006"]
    assert logged_losses(background) == logged_losses(sync)

    checkpoint = background / "checkpoints" / "step_000003"
    resumed = tmp_path / "resumed"
    full.run(params_for("full", small_checkpoint, small_data, resumed, f"resume={checkpoint}"))
    assert logged_losses(resumed) == logged_losses(sync)[3:]
    expected = load_file(sync / "model" / "model.safetensors")
    actual = load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_resume_from_a_given_checkpoint_directory(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    full.run(params_for("full", small_checkpoint, small_data, first, "keep_last_n=0"))
    assert steps_on_disk(first) == ["step_000003", "step_000004", "step_000006"]
    checkpoint = first / "checkpoints" / "step_000003"
    full.run(params_for("full", small_checkpoint, small_data, second, f"resume={checkpoint}"))
    assert logged_losses(second) == logged_losses(first)[3:]


def test_resume_without_a_checkpoint_names_the_directory(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=r"^resume=true: no checkpoint found in") as error:
        full.run(params_for("full", small_checkpoint, small_data, tmp_path, "resume=true"))
    assert str(tmp_path / "checkpoints") in str(error.value)
    assert "hydra.run.dir" in str(error.value) and "\n" not in str(error.value)


def test_resume_from_another_recipe_is_refused_by_path(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    full_run = tmp_path / "full"
    full.run(params_for("full", small_checkpoint, small_data, full_run, "max_steps=3"))
    lora_params = params_for("lora", small_checkpoint, small_data, tmp_path, f"resume={full_run}")
    with pytest.raises(UserError, match="recipe=full, not recipe=lora") as error:
        lora.run(lora_params)
    assert str(full_run / "checkpoints" / "step_000003" / "training.json") in str(error.value)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [
        *model_overrides(SMALL_MODEL),
        f"checkpoint={small_checkpoint}",
        f"dataset.path={small_data}",
        f"hydra.run.dir={run_dir}",
        "max_seq_len=128",
        "batch_size=2",
        "epochs=50",
        "max_steps=200",
    ]
    returncode, output = run_cli_signalled(args, signal.SIGTERM, "step 2/")

    assert returncode == 128 + signal.SIGTERM, output
    saved = steps_on_disk(run_dir)
    assert len(saved) == 1 and int(saved[0].removeprefix("step_")) < 200, output
    # The command that continues the run, with its own overrides, ready to paste.
    # model=auto: added to a command line that names a checkpoint but no model option.
    overrides = " ".join(a for a in args if not a.startswith("hydra.run.dir="))
    command = f"python -m finetune {overrides} model=auto hydra.run.dir={run_dir} resume=true"
    assert f"resume with: {command}\n" in (output)
    assert "SIGTERM: stopping after this step to save a checkpoint; send SIGTERM again" in output
    assert not (run_dir / "model").exists()


def poison_loss_of_step_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in the loss of step 2's first micro-batch (the 3rd loss call: two a step)."""
    real_loss = llama.chunked_cross_entropy
    calls = []

    def loss(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        value = real_loss(*args)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(llama, "chunked_cross_entropy", loss)


def test_a_nan_loss_stops_the_run_naming_the_step(
    small_checkpoint: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_loss_of_step_2(monkeypatch)
    with pytest.raises(UserError, match=r"^step 2: loss nan, grad_norm nan is not finite; stopped"):
        full.run(params_for("full", small_checkpoint, small_data, tmp_path))


def test_skip_nonfinite_steps_skips_the_update_and_says_so(
    small_checkpoint: Path,
    small_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    poison_loss_of_step_2(monkeypatch)
    full.run(params_for("full", small_checkpoint, small_data, tmp_path, "skip_nonfinite_steps=1"))
    assert "step 2: loss nan, grad_norm nan is not finite; skipped the update (1/1 allowed)" in (
        capsys.readouterr().out
    )
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# Run as `python -c KILLING_RUN WHERE NTH ARGS...`: the CLI, killed with SIGKILL during its NTH
# checkpoint save, either halfway through writing its rng.pt or just before the rename.
KILLING_RUN = """
import os, signal, sys
import torch
where, nth = sys.argv[1], int(sys.argv[2])
saves = 0
real_save, real_replace = torch.save, os.replace

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def save(obj, f, *args, **kwargs):
    global saves
    if not str(getattr(f, "name", "")).endswith("rng.pt"):  # DCP's own use of torch.save
        return real_save(obj, f, *args, **kwargs)
    saves += 1
    if where == "write" and saves == nth:
        f.write(b"half a checkpoint")
        f.flush()
        kill()
    return real_save(obj, f, *args, **kwargs)

def replace(src, dst):
    if where == "rename" and saves == nth:
        kill()
    return real_replace(src, dst)

torch.save, os.replace = save, replace
sys.argv = ["finetune", *sys.argv[3:]]
from finetune.__main__ import main
main()
"""


def cli_args(checkpoint: Path, data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """The CLI form of `params_for("full", ...)`."""
    return [
        *model_overrides(SMALL_MODEL),
        f"checkpoint={checkpoint}",
        f"dataset.path={data}",
        f"hydra.run.dir={run_dir}",
        "max_seq_len=128",
        "batch_size=2",
        *SCHEDULE,
        *RECIPES["full"][1],
        *overrides,
    ]


@pytest.mark.parametrize("where", ["write", "rename"])
def test_kill_9_during_a_save_then_resume_matches_an_uninterrupted_run(
    where: str, small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    full.run(params_for("full", small_checkpoint, small_data, straight))

    args = cli_args(small_checkpoint, small_data, killed)
    # Saves come after steps 3, 4 (the end of epoch 0) and 6; the kill hits the second.
    dead = subprocess.run(
        [sys.executable, "-c", KILLING_RUN, where, "2", *args], capture_output=True, text=True
    )
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    assert steps_on_disk(killed) == ["step_000003", "step_000004.tmp"]
    assert [step for step, _ in logged_losses(killed)] == [1, 2, 3, 4]

    resumed = run_cli(*args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed / 'checkpoints' / 'step_000003'} at step 3" in resumed.stdout
    # Step 4's rows were redone, not repeated; the weights are those of the run never killed.
    assert logged_losses(killed) == logged_losses(straight)
    expected = load_file(straight / "model" / "model.safetensors")
    actual = load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert steps_on_disk(killed) == ["step_000004", "step_000006"]


# Run as `python -c DOUBLE_CTRL_C ARGS...`: the CLI, sent SIGINT twice during its third step.
DOUBLE_CTRL_C = """
import os, signal, sys, time
from finetune import training
real_step, calls = training.train_step, []

def step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the first handler runs; two pending signals would count as one
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    return real_step(*args, **kwargs)

training.train_step = step
sys.argv = ["finetune", *sys.argv[1:]]
from finetune.__main__ import main
main()
"""


def test_a_second_ctrl_c_exits_at_once_without_saving(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = cli_args(small_checkpoint, small_data, run_dir, "save_every_n_steps=1")
    result = subprocess.run(
        [sys.executable, "-c", DOUBLE_CTRL_C, *args], capture_output=True, text=True
    )

    assert result.returncode == 128 + signal.SIGINT, result.stderr
    latest = run_dir / "checkpoints" / "step_000002"
    assert result.stderr.splitlines()[-2:] == [
        "SIGINT: stopping after this step to save a checkpoint; press Ctrl-C again to stop at once",
        f"SIGINT, a second signal: stopped at once; the latest complete checkpoint is {latest}",
    ]
    assert "Traceback" not in result.stderr
    # Step 3 never finished: no checkpoint, metrics row or model of it.
    assert steps_on_disk(run_dir) == ["step_000001", "step_000002"]
    assert [step for step, _ in logged_losses(run_dir)] == [1, 2]
    assert not (run_dir / "model").exists()


def test_resume_keeps_validation_and_early_stopping_where_they_were(
    small_checkpoint: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With this high an lr, val_loss is best at step 2 and worse at 3 and 4: patience 2 stops
    # the run after step 4, one evaluation after the checkpoint of step 3.
    overrides = (
        "lr=0.1",
        "warmup_steps=0",
        "dataset.val_split=0.25",
        "eval_every_n_steps=1",
        "early_stopping_patience=2",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight_loss = full.run(params_for("full", small_checkpoint, small_data, straight, *overrides))

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            full.run(params_for("full", small_checkpoint, small_data, resumed, *overrides))
    resumed_loss = full.run(
        params_for("full", small_checkpoint, small_data, resumed, *overrides, "resume=true")
    )

    def rows(run_dir: Path) -> list[dict]:
        timings = ("elapsed_s", "tokens_per_s")
        return [{k: v for k, v in row.items() if k not in timings} for row in metrics_rows(run_dir)]

    assert rows(resumed) == rows(straight)
    assert [r["step"] for r in rows(straight) if "val_loss" in r] == [1, 2, 3, 4]
    assert resumed_loss == straight_loss == rows(straight)[-1]["val_loss"]
    # The clock runs on from the checkpoint's time instead of restarting at 0.
    elapsed = [row["elapsed_s"] for row in metrics_rows(resumed)]
    assert elapsed == sorted(elapsed)


def test_resume_with_other_batches_or_schedule_names_what_changed(
    small_checkpoint: Path, small_data: Path, tmp_path: Path
) -> None:
    full.run(params_for("full", small_checkpoint, small_data, tmp_path, "max_steps=3"))
    checkpoint = tmp_path / "checkpoints" / "step_000003"
    changed = params_for(
        "full",
        small_checkpoint,
        small_data,
        tmp_path / "resumed",
        "max_steps=3",
        "batch_size=1",
        "lr=2e-3",
        f"resume={checkpoint}",
    )
    with pytest.raises(UserError) as error:
        full.run(changed)
    assert str(error.value) == (
        f"{checkpoint}: saved with global_batch_size=4, lr=0.001, but this run has "
        "global_batch_size=2 (batch_size x gradient_accumulation_steps x processes), lr=0.002; "
        "resume with the settings of the run it continues"
    )


def rows_of(run_dir: Path) -> list[dict]:
    return [row for row in metrics_rows(run_dir) if "loss" in row]


@pytest.mark.parametrize(
    ("first", "longer", "steps"),
    [
        (("max_steps=3",), ("max_steps=6",), (3, 6)),
        # 4 steps an epoch: a finished 1-epoch run continued into a second epoch.
        (("epochs=1", "max_steps=0"), ("epochs=2", "max_steps=0"), (4, 8)),
    ],
    ids=["max_steps", "epochs"],
)
def test_a_finished_run_trains_for_longer_on_the_schedule_of_the_new_length(
    first: tuple[str, ...],
    longer: tuple[str, ...],
    steps: tuple[int, int],
    small_checkpoint: Path,
    small_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended, total = steps
    schedule = ("warmup_steps=1", "save_every_n_steps=5")
    full.run(params_for("full", small_checkpoint, small_data, tmp_path, *schedule, *first))
    # The last step leaves a checkpoint even where save_every_n_steps does not fall on it.
    assert steps_on_disk(tmp_path) == [f"step_{ended:06d}"]
    finished = rows_of(tmp_path)

    with caplog.at_level("INFO", logger="finetune.resume"):
        full.run(
            params_for(
                "full", small_checkpoint, small_data, tmp_path, *schedule, *longer, "resume=true"
            )
        )
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert rows[:ended] == finished
    # From the resumed step on, the lr of a run that was this long from the start: the cosine
    # decay recomputed over the new length (the finished run's own schedule had reached 0).
    lr = 1e-3
    expected = [lr * lr_multiplier(step - 1, 1, total) for step in range(ended + 1, total + 1)]
    assert [r["lr"] for r in rows[ended:]] == expected
    assert expected[0] > 0
    was = ", ".join(o for o in first if o not in longer)
    now = ", ".join(o for o in longer if o not in first)
    assert (
        f"{now} (the checkpoint's run had {was}): training runs to step {total}; the learning "
        f"rate follows the cosine schedule of a {total}-step run, lr {expected[0]:.3e} at step "
        f"{ended + 1}"
    ) in caplog.messages
    assert steps_on_disk(tmp_path)[-1] == f"step_{total:06d}"
    # Resuming the longer run's last checkpoint with its own length changes nothing.
    caplog.clear()
    with caplog.at_level("INFO", logger="finetune.resume"):
        full.run(
            params_for(
                "full", small_checkpoint, small_data, tmp_path, *schedule, *longer, "resume=true"
            )
        )
    assert not [m for m in caplog.messages if "the checkpoint's run had" in m]
    assert rows_of(tmp_path) == rows


def test_a_run_the_data_cannot_fill_says_so_at_the_start(
    small_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "three.jsonl"
    data.write_text("".join(SAMPLE_DATA.read_text().splitlines(keepends=True)[:3]))
    params = small_params(
        small_checkpoint, tmp_path, f"dataset.path={data}", "batch_size=8", "max_steps=5"
    )
    with caplog.at_level("WARNING", logger="finetune.schedule"):
        full.run(params)
    assert (
        "3 examples, batch_size=8: 1 step per epoch, so epochs=1 ends after 1 step; "
        "max_steps=5 needs epochs=5"
    ) in caplog.messages
    assert [r["step"] for r in rows_of(tmp_path)] == [1]

    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune.schedule"):
        full.run(
            small_params(small_checkpoint, tmp_path / "one", f"dataset.path={data}", "max_steps=1")
        )
    assert not [m for m in caplog.messages if "per epoch" in m]
