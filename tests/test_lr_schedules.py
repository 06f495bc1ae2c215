"""Learning-rate schedules after the warmup (cosine, linear, constant) with their floor
(min_lr_ratio): the values, what a run logs and plots, and resuming on them."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.metrics import metrics_figure, read_metrics
from finetune.recipes import full
from finetune.schedule import lr_multiplier, lr_schedule
from tests.conftest import logged_losses, small_params
from tests.test_resume import interrupt_at_step

WARMUP, TOTAL = 2, 12  # 10 steps of decay after the warmup


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_every_schedule_warms_up_linearly_to_the_peak(schedule: str) -> None:
    warmup = [lr_multiplier(step, WARMUP, TOTAL, schedule, 0.0) for step in range(WARMUP + 1)]
    assert warmup == [0.5, 1.0, 1.0]


def test_cosine_and_linear_decay_to_the_floor_and_constant_stays_at_the_peak() -> None:
    def decay(schedule: str, floor: float) -> list[float]:
        return [lr_multiplier(s, WARMUP, TOTAL, schedule, floor) for s in range(WARMUP, TOTAL + 1)]

    cosine, linear = decay("cosine", 0.1), decay("linear", 0.1)
    for values in (cosine, linear):
        assert all(later < earlier for earlier, later in itertools.pairwise(values))
        assert values[0] == 1.0
        assert values[-1] == pytest.approx(0.1)
    # Half-way (step 7): both at the middle of [0.1, 1].
    assert cosine[5] == pytest.approx(0.55) and linear[5] == pytest.approx(0.55)
    # A fifth of the way: linear has fallen by a fifth of 0.9, cosine by less.
    assert linear[2] == pytest.approx(1 - 0.2 * 0.9)
    assert cosine[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert decay("constant", 0.0) == [1.0] * (TOTAL - WARMUP + 1)


def test_the_default_schedule_is_the_cosine_to_zero_it_always_was(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    params = small_params(small_checkpoint, tmp_path, f"warmup_steps={WARMUP}")
    assert (params.lr_schedule, params.min_lr_ratio) == ("cosine", 0.0)
    schedule = lr_schedule(params, TOTAL)
    # Bit for bit the formula before schedules could be chosen: the stored losses depend on it.
    earlier = [0.5 * (1.0 + math.cos(math.pi * (s - WARMUP) / 10)) for s in range(WARMUP, TOTAL)]
    assert [schedule(s) for s in range(WARMUP, TOTAL)] == earlier


# A linear decay to a fifth of lr over 6 steps, one of them warmup, with a checkpoint every 2.
LINEAR = (
    "lr_schedule=linear",
    "min_lr_ratio=0.2",
    "warmup_steps=1",
    "max_steps=6",
    "lr=1e-3",
    "save_every_n_steps=2",
)


def expected_lrs(schedule: str, floor: float) -> list[float]:
    return [1e-3 * lr_multiplier(step, 1, 6, schedule, floor) for step in range(6)]


def test_a_run_logs_and_plots_the_chosen_schedule(small_checkpoint: Path, tmp_path: Path) -> None:
    full.run(small_params(small_checkpoint, tmp_path, *LINEAR))
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if "loss" in row]
    lrs = [row["lr"] for row in rows]
    assert lrs == pytest.approx(expected_lrs("linear", 0.2), rel=1e-12)
    assert lrs[1] == 1e-3 and lrs[-1] == pytest.approx(1e-3 * (0.2 + 0.8 * 0.2))
    # loss.png's lr curve is these logged values.
    lr_axis = metrics_figure(read_metrics(tmp_path / "metrics.jsonl")).axes[1]
    assert list(lr_axis.lines[0].get_ydata()) == lrs
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_resume_continues_the_chosen_schedule_exactly(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    full.run(small_params(small_checkpoint, straight, *LINEAR))
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            full.run(small_params(small_checkpoint, resumed, *LINEAR))
    full.run(small_params(small_checkpoint, resumed, *LINEAR, "resume=true"))

    assert logged_losses(resumed) == logged_losses(straight)
    rows = [read_metrics(d / "metrics.jsonl") for d in (straight, resumed)]
    assert [r["lr"] for r in rows[1]] == [r["lr"] for r in rows[0]]


def test_resume_with_another_schedule_names_what_changed(
    small_checkpoint: Path, tmp_path: Path
) -> None:
    full.run(small_params(small_checkpoint, tmp_path, *LINEAR))
    checkpoint = tmp_path / "checkpoints" / "step_000006"
    other = small_params(
        small_checkpoint,
        tmp_path / "resumed",
        *LINEAR,
        "lr_schedule=cosine",
        "min_lr_ratio=0.1",
        f"resume={checkpoint}",
    )
    with pytest.raises(UserError) as error:
        full.run(other)
    assert str(error.value) == (
        f"{checkpoint}: saved with lr_schedule=linear, min_lr_ratio=0.2, but this run has "
        "lr_schedule=cosine, min_lr_ratio=0.1; resume with the settings of the run it continues"
    )
