"""The run's PNG plots: score against parameters, every metric relative to the teacher, and the
training loss curves."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compress.config import TASKWORLD_TASK
from compress.metrics import arrow
from evaluation.report import LABELS, column_lower, column_retention, headline_lower, ratio_header, score_columns
from evaluation.tasks import LANGUAGE_TASK

COLORS = {"teacher": "#333333", "pruned": "#cc5555", "sft": "#4477bb", "student": "#2a9a4a"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_params(summary: dict[str, Any], path: Path) -> Path:
    """Headline score (with lm-eval's stderr as error bars) against parameters, one point per model.

    The y axis names the metric and its direction; a lower-is-better metric spanning more than a
    factor of 20 (a pruned model's perplexity beside the teacher's) is drawn on a log scale.
    """
    plt = _pyplot()
    lower = headline_lower(summary)
    fig, ax = plt.subplots(figsize=(8.4 if lower else 6.4, 4.0))
    models = summary["models"]
    for name, m in models.items():
        if m.get("score") is None:
            continue
        x, y = m["params"] / 1e6, m["score"]
        # A legend, not labels by the points: students of one size sit on top of each other.
        ax.errorbar(
            x, y, yerr=m.get("stderr") or 0.0, fmt="o", ms=8, capsize=4, alpha=0.85,
            color=COLORS.get(name, "#888888"), label=f"{LABELS.get(name, name)}: {y:.3f}" if abs(y) <= 1 else
            f"{LABELS.get(name, name)}: {y:.4g}",
        )  # fmt: skip
    teacher = models.get("teacher", {})
    if teacher.get("score") is not None:
        ax.axhline(teacher["score"], color="#999999", lw=0.8, ls="--", zorder=0)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(score_axis_label(summary))
    ax.set_title("score against size (error bars: lm-eval stderr)")
    xs = [m["params"] / 1e6 for m in models.values()]
    ax.set_xlim(0, max(xs, default=1.0) * 1.25)
    ys = [m["score"] for m in models.values() if m.get("score") is not None]
    lo, hi = min(ys, default=0.0), max(ys, default=1.0)
    if lo >= 0.0 and hi <= 1.0:
        # A fraction (accuracy, exact match): the whole [0, 1] range unless the points sit high.
        ax.set_ylim(0.0 if lo < 0.5 else lo - 0.1 * (1.05 - lo) - 0.05, 1.02)
    elif lower and lo > 0 and hi / lo > 20:
        ax.set_yscale("log")
        ax.margins(y=0.15)
    else:
        ax.margins(y=0.15)
    ax.grid(alpha=0.3, which="both")
    if lower:  # the points spread over decades, any corner may hold one: the legend goes beside the axes
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:  # the good corner is top left and the points sit high
        ax.legend(loc="lower right")
    return _save(fig, plt, path)


def score_axis_label(summary: dict[str, Any]) -> str:
    """The score axis: task, metric and its direction (``pydoc_ppl word_perplexity ↓ (lower is better)``)."""
    lower = headline_lower(summary)
    task = (summary.get("headline") or {}).get("task") or ""
    way = "lower is better" if lower else "higher is better"
    return f"{task} {summary['metric']} {arrow(lower)} ({way})".strip()


def headline_columns(summary: dict[str, Any], tasks: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The (task, metric) columns at the level of ``evaluate.tasks``: the task world's per-family
    breakdown (``taskworld_<family>``) is left out, and with ``tasks`` so is every task not named
    there (a group's subtasks); the task world brings its language task."""
    keep = None if tasks is None else set(tasks)
    if keep is not None and TASKWORLD_TASK in keep:
        keep.add(LANGUAGE_TASK)
    cols = []
    for task, metric in score_columns(summary):
        if task.startswith(f"{TASKWORLD_TASK}_") or (keep is not None and task not in keep):
            continue
        cols.append((task, metric))
    return cols


def vs_teacher_groups(
    summary: dict[str, Any], tasks: Iterable[str] | None = None
) -> list[tuple[str, dict[str, float | None]]]:
    """The bars of ``plot_vs_teacher``: per headline-level (task, metric), its label (task, metric,
    arrow, ratio) and each model's ratio to the teacher; metrics with no meaningful ratio are left out."""
    others = [n for n in summary["models"] if n != "teacher"]
    if "teacher" not in summary["models"] or not others:
        return []
    groups = []
    for task, metric in headline_columns(summary, tasks):
        rel = column_retention(summary, task, metric)
        if any(rel[n] is not None for n in others):
            lower = column_lower(summary, task, metric)
            groups.append((f"{task}\n{metric} {arrow(lower)}\n({ratio_header(lower)})", rel))
    return groups


def plot_vs_teacher(summary: dict[str, Any], path: Path, tasks: Iterable[str] | None = None) -> Path | None:
    """Every headline-level metric of every model relative to the teacher, as grouped bars.

    One group per (task, metric), one bar per model other than the teacher; 1.0 (the dashed line) is
    the teacher, below 1.0 worse, for either direction (``compress.metrics.retention``: score /
    teacher when higher is better, teacher / score when lower is better). A metric whose ratio means
    nothing (the teacher's own KL is 0) is left out. None when there is nothing to draw.
    """
    models = [n for n in summary["models"] if n != "teacher"]
    groups = vs_teacher_groups(summary, tasks)
    if not groups:
        return None
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(groups) + 2.5), 4.2))
    x = np.arange(len(groups))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        values = [rel[name] for _, rel in groups]
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, label=LABELS.get(name, name),
                      color=COLORS.get(name, "#888888"), alpha=0.9)  # fmt: skip
        ax.bar_label(bars, labels=["" if v is None else f"{v:.3g}" for v in values], fontsize="x-small", padding=1)
    ax.axhline(1.0, color="#333333", lw=0.9, ls="--", label="teacher (1.0)")
    ax.set_xticks(x, [label for label, _ in groups], fontsize="small")
    ax.set_ylabel("relative to the teacher (1.0 = teacher, < 1 worse)")
    ax.set_title("every metric against the teacher (↑ score / teacher, ↓ teacher / score)")
    top = max([1.0, *(v for _, rel in groups for n, v in rel.items() if n in models and v is not None)])
    ax.set_ylim(0.0, top * 1.15)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, plt, path)


def read_loss_log(path: Path) -> list[dict[str, Any]]:
    """Trainer's log history as written by the distill stage (one JSON object per logging step)."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(logs: dict[str, Path], path: Path) -> Path | None:
    """Training loss against step, one curve per trained model (KD: alpha*KD + (1-alpha)*CE [+ w*hidden
    MSE], with its terms; SFT: CE)."""
    curves = {name: read_loss_log(p) for name, p in logs.items() if Path(p).is_file()}
    curves = {n: c for n, c in curves.items() if c}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.6, 3.6))
    for name, rows in curves.items():
        kd = any("kd" in r for r in rows)
        hidden = any("hidden_mse" in r for r in rows)
        what = ("alpha*KD + (1-alpha)*CE" + (" + w*hidden MSE" if hidden else "")) if kd else "CE"
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], label=f"{LABELS.get(name, name)}: {what}", color=COLORS.get(name))
        # The KD run's terms (dashed, dotted, dash-dotted), so that their trade-off shows.
        for part, style, title in (("kd", "--", "KD"), ("ce", ":", "CE"), ("hidden_mse", "-.", "hidden MSE")):
            pts = [(r["step"], r[part]) for r in rows if part in r]
            if kd and pts:
                ax.plot(*zip(*pts, strict=True), style, color=COLORS.get(name), alpha=0.7,
                        label=f"{LABELS.get(name, name)}: {title}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("distill stage: training loss")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
    ax.grid(alpha=0.3, which="both")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
