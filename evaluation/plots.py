"""The run's PNG plots: score against parameters for every model, and the training loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluation.report import LABELS

COLORS = {"teacher": "#333333", "pruned": "#cc5555", "sft": "#4477bb", "student": "#2a9a4a"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_params(summary: dict[str, Any], path: Path) -> Path:
    """Headline score (with lm-eval's stderr as error bars) against parameters, one point per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    models = summary["models"]
    for name, m in models.items():
        if m.get("score") is None:
            continue
        x, y = m["params"] / 1e6, m["score"]
        # A legend, not labels by the points: students of one size sit on top of each other.
        ax.errorbar(
            x, y, yerr=m.get("stderr") or 0.0, fmt="o", ms=8, capsize=4, alpha=0.85,
            color=COLORS.get(name, "#888888"), label=f"{LABELS.get(name, name)}: {y:.3f}",
        )  # fmt: skip
    teacher = models.get("teacher", {})
    if teacher.get("score") is not None:
        ax.axhline(teacher["score"], color="#999999", lw=0.8, ls="--", zorder=0)
    head = summary.get("headline") or {}
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"{head.get('task', '')} {summary['metric']}".strip())
    ax.set_title("score against size (error bars: lm-eval stderr)")
    xs = [m["params"] / 1e6 for m in models.values()]
    ax.set_xlim(0, max(xs, default=1.0) * 1.25)
    ys = [m["score"] for m in models.values() if m.get("score") is not None]
    lo = min(ys, default=0.0)
    ax.set_ylim(min(0.0, lo) if lo < 0.5 else lo - 0.1 * (1.05 - lo) - 0.05, max(1.02, max(ys, default=1.0) * 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
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
