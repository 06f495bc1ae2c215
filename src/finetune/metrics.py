"""What a run reports: progress on stdout, `metrics.jsonl` rows, and the `loss.png` plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.figure import Figure
    from tqdm import tqdm

    from finetune.trackers import Tracker


class MetricsLog:
    """Writes one metrics.jsonl row per logged step and shows progress.

    On a terminal progress is a bar; otherwise (logs, CI, pipes) it is one flushed line per logged
    step, after a `training started` line, so a harness can time a run from its output.
    """

    def __init__(
        self,
        path: Path,
        total_steps: int,
        prefix: str = "",
        writes: bool = True,
        trackers: Sequence[Tracker] = (),
    ) -> None:
        self.path = path
        self.total_steps = total_steps
        self.prefix = prefix  # e.g. "[job 2] ": parallel sweep jobs share one console
        # Every process of a multi-process run computes the same rows; one of them reports.
        self.writes = writes
        self.rows: list[dict] = []  # this run's training rows, for a process that writes no file
        self.file = path.open("a", encoding="utf-8") if writes else open(os.devnull, "w")  # noqa: SIM115
        self.bar: tqdm | None = None
        self.trackers = trackers  # experiment trackers, sent every row the file gets
        self.started = self.last_write = 0.0

    def start(self, elapsed_before: float = 0.0) -> None:
        """Start the clock; a resumed run passes the training time of the run it continues, so
        that `elapsed_s` runs on rather than restarting at 0."""
        if not self.writes:
            pass
        elif sys.stdout.isatty():
            # Imported here: the sweep report reads metrics in the CLI process, which stays lean.
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, unit="step", dynamic_ncols=True)
        else:
            print("training started", flush=True)
        self.last_write = time.perf_counter()
        self.started = self.last_write - elapsed_before

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        grad_norm: float,
        n_tokens: int,
        loss_metrics: dict[str, float] | None = None,
    ) -> None:
        """Record `step`; `n_tokens` is the count of input tokens since the previous row, and
        `loss_metrics` the loss's own metrics of the step (see `training.LossFn`)."""
        now = time.perf_counter()
        tokens_per_s = n_tokens / max(now - self.last_write, 1e-9)
        self.last_write = now
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            **(loss_metrics or {}),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1),
            "elapsed_s": round(now - self.started, 3),
        }
        self.record(row)
        self.rows.append(row)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        elif self.writes:
            print(
                f"{self.prefix}step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.1e} "
                f"grad_norm {grad_norm:.2f} tok/s {tokens_per_s:.0f}",
                flush=True,
            )

    def write_eval(
        self,
        step: int,
        epoch: int,
        val_loss: float,
        eval_s: float,
        loss_metrics: dict[str, float] | None = None,
    ) -> None:
        """Record a validation pass at `step` that took `eval_s` seconds, with the loss's own
        metrics (`val_` and their names).

        Its own row, so the training rows keep their schema; its time is left out of the next
        training row's tokens_per_s, which measures training only.
        """
        now = time.perf_counter()
        self.last_write += eval_s
        row: dict[str, float] = {"step": step, "epoch": epoch, "val_loss": val_loss}
        if loss_metrics:
            # A loss with metrics of its own is no per-token cross-entropy: no perplexity.
            row |= {f"val_{name}": value for name, value in loss_metrics.items()}
            shown = " ".join(f"val_{name} {value:.4f}" for name, value in loss_metrics.items())
        else:
            row["val_perplexity"] = perplexity(val_loss)
            shown = f"val_ppl {row['val_perplexity']:.2f}"
        row["elapsed_s"] = round(now - self.started, 3)
        self.record(row)
        self.say(f"eval step {step}/{self.total_steps} val_loss {val_loss:.4f} {shown}")

    def record(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def say(self, line: str) -> None:
        """A line of progress that is not a training step's, above the bar on a terminal."""
        if self.bar is not None:
            self.bar.write(self.prefix + line)
        elif self.writes:
            print(self.prefix + line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def perplexity(loss: float) -> float:
    """exp(loss); infinite rather than an OverflowError when a diverged run's loss is huge."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf


def drop_rows_after(path: Path, step: int) -> None:
    """Remove the rows of steps after `step`: a run resumed from step's checkpoint redoes them, and
    rows of the interrupted attempt would otherwise appear twice."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    # A kill mid-write can leave a last line without its newline; it is dropped with the rest.
    kept = [
        line
        for line in lines
        if line.strip() and line.endswith("\n") and json.loads(line)["step"] <= step
    ]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


# The share of a run's last steps whose mean training loss stands for the run (see late_loss).
LATE_FRACTION = 0.1


def late_loss(rows: list[dict]) -> float:
    """The mean training loss of the logged steps in the last 10 % of the run (at least the last
    step): one batch's loss is too noisy to compare runs by."""
    train = [r for r in rows if "loss" in r]
    if not train:
        return math.nan
    last = train[-1]["step"]
    window = max(1, round(LATE_FRACTION * last))
    late = [r["loss"] for r in train if r["step"] > last - window]
    return sum(late) / len(late)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average of `values`, debiased so the first points are not pulled
    towards 0: each point is sum(weight^k * v[i-k]) / sum(weight^k)."""
    average, norm, out = 0.0, 0.0, []
    for value in values:
        if not math.isfinite(value):  # a skipped NaN step would poison every later point
            out.append(out[-1] if out else math.nan)
            continue
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def read_metrics(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# The columns of every training row; any other is a loss's own metric (see `MetricsLog.write`).
TRAINING_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    metrics_figure(read_metrics(metrics_path)).savefig(png_path, dpi=100)


def metrics_figure(all_rows: list[dict]) -> Figure:
    """Loss (left axis; validation loss too, if any) and learning rate (right axis) by step;
    below, a panel for each group of the loss's own metrics (`rewards/...`, `logps/...`)."""
    # Figure without pyplot: no GUI backend is chosen, so it works on any headless machine.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Training and validation rows share the file; a row is one or the other.
    rows = [r for r in all_rows if "loss" in r]
    val_rows = [r for r in all_rows if "val_loss" in r]
    steps = [r["step"] for r in rows]
    groups = metric_groups(rows)
    fig = Figure(figsize=(8, 4.5 + 3 * len(groups)), layout="constrained")
    axes = fig.subplots(1 + len(groups), 1, squeeze=False)[:, 0]
    loss_ax = axes[0]
    losses = [r["loss"] for r in rows]
    # The raw loss jumps from batch to batch; the trend is the smoothed curve drawn over it.
    loss_ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="training loss")
    loss_ax.plot(steps, smoothed(losses), color="tab:blue", label="training loss (EMA 0.9)")
    if val_rows:
        loss_ax.plot(
            [r["step"] for r in val_rows],
            [r["val_loss"] for r in val_rows],
            color="tab:green",
            marker="o",
            label="validation loss",
        )
    loss_ax.set_xlabel("step")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_ylabel("loss", color="tab:blue")
    loss_ax.grid(alpha=0.3)
    lr_ax = loss_ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", linestyle="--", label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    # Below the plot: inside it, the legend would hide curves or the lr axis' scale label.
    # The loss panel's entries only: each metric panel has its own legend.
    fig.legend(*_legend_entries(loss_ax, lr_ax), loc="outside lower center", ncols=4)
    for ax, (group, names) in zip(axes[1:], groups.items(), strict=True):
        plot_metric_group(ax, group, names, rows, val_rows)
    return fig


def metric_groups(rows: list[dict]) -> dict[str, list[str]]:
    """The loss's own metrics of the training rows, by the group their name starts with."""
    groups: dict[str, list[str]] = {}
    for name in rows[0] if rows else {}:
        if name not in TRAINING_COLUMNS:
            groups.setdefault(name.split("/")[0], []).append(name)
    return groups


def plot_metric_group(
    ax: Any, group: str, names: list[str], rows: list[dict], val: list[dict]
) -> None:
    """Each metric of one group, smoothed over its raw values, and its validation values."""
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    for index, name in enumerate(names):
        color = f"C{index}"
        values = [r[name] for r in rows]
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        ax.plot(steps, smoothed(values), color=color, label=name)
        val_rows = [r for r in val if f"val_{name}" in r]
        if val_rows:
            ax.plot(
                [r["step"] for r in val_rows],
                [r[f"val_{name}"] for r in val_rows],
                color=color,
                marker="o",
                linestyle=":",
                label=f"val_{name}",
            )
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(group)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncols=2)


def _legend_entries(*axes: Any) -> tuple[list, list[str]]:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    return handles, labels
