"""The run's summary, markdown report and plot, from the per-model evaluation results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_ORDER = ("teacher", "pruned", "sft", "student")
LABELS = {"teacher": "teacher", "pruned": "pruned (no training)", "sft": "SFT baseline", "student": "KD student"}


def build_summary(
    metric: str,
    models: dict[str, dict[str, Any]],
    stages: dict[str, dict[str, Any]],
    headline: dict[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> dict:
    """``{"metric", "headline", "models": {name: {"params", "score", "scores", ...}}, "stages", "data"}``.

    ``score`` is the headline metric; ``scores`` holds every task and metric as
    ``{task: {metric: {"value", "stderr"}}}``.
    """
    ordered = {m: models[m] for m in MODEL_ORDER if m in models} | {m: v for m, v in models.items()}
    out: dict[str, Any] = {"metric": metric, "headline": headline, "models": ordered, "stages": stages}
    if data is not None:
        out["data"] = {k: v for k, v in data.items() if k != "sources"} | {"sources": data.get("sources", [])}
    return out


def score_columns(summary: dict) -> list[tuple[str, str]]:
    """Every (task, metric) that some model has, in first-seen order."""
    cols: list[tuple[str, str]] = []
    for m in summary["models"].values():
        for task, metrics in (m.get("scores") or {}).items():
            cols += [(task, name) for name in metrics if (task, name) not in cols]
    return cols


def scores_table(summary: dict) -> str:
    """Models x (task, metric) as plain text, with lm-eval's stderr: one column per task and metric."""
    cols = score_columns(summary)
    names = [f"{t}/{m}" for t, m in cols]
    width = max([22, *(len(n) + 2 for n in names)])
    lines = [f"{'task/metric':<{width}}" + "".join(f"{LABELS.get(n, n):>22}" for n in summary["models"])]
    lines.append("-" * len(lines[0]))
    for (task, metric), label in zip(cols, names, strict=True):
        cells = []
        for m in summary["models"].values():
            v = (m.get("scores") or {}).get(task, {}).get(metric)
            cells.append("-" if v is None else _with_stderr(v))
        lines.append(f"{label:<{width}}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def data_line(data: dict[str, Any]) -> str:
    """What the prepare stage kept and dropped, in one sentence (terminal and report)."""
    return (
        f"{data['prompts']:,} training prompts; dropped {data['duplicates_dropped']:,} duplicates, "
        f"{data['eval_overlap_dropped']:,} prompts found in an evaluation set and "
        f"{data.get('too_long_dropped', 0):,} longer than {data.get('max_prompt_tokens')} tokens"
    )


def _with_stderr(v: dict[str, float | None]) -> str:
    return f"{v['value']:.4f}" + (f" ± {v['stderr']:.4f}" if v.get("stderr") is not None else "")


def results_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per model: score, parameters and both relative to the teacher."""
    teacher = summary["models"].get("teacher", {})
    rows = []
    for name, m in summary["models"].items():
        rel_score = m["score"] / teacher["score"] if teacher.get("score") else None
        rel_params = m["params"] / teacher["params"] if teacher.get("params") else None
        rows.append(
            {
                "model": name,
                summary["metric"]: round(m["score"], 4),
                "stderr": None if m.get("stderr") is None else round(m["stderr"], 4),
                "params": m["params"],
                "score_vs_teacher": None if rel_score is None else round(rel_score, 3),
                "params_vs_teacher": None if rel_params is None else round(rel_params, 3),
            }
        )
    return rows


def format_table(summary: dict) -> str:
    """A plain-text table for the terminal."""
    rows = results_rows(summary)
    metric = summary["metric"]
    head = f"{'model':<22}{metric:>13}{'params':>12}{'score/teacher':>15}{'params/teacher':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{LABELS.get(r['model'], r['model']):<22}{r[metric]:>13.4f}{r['params']:>12,}"
            f"{_fmt(r['score_vs_teacher']):>15}{_fmt(r['params_vs_teacher']):>16}"
        )
    return "\n".join(lines)


def format_stages(summary: dict) -> str:
    """One line per stage: cached or ran, and how long it took."""
    return "\n".join(
        f"  {name:<18}{'cache hit' if s['cached'] else 'ran':<10}{s['seconds']:>8.1f}s"
        for name, s in summary["stages"].items()
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_report(summary: dict, run_dir: Path, extra: dict[str, Any] | None = None) -> str:
    """The run report as markdown (also published as a Prefect artifact)."""
    metric = summary["metric"]
    rows = results_rows(summary)
    head = summary.get("headline") or {}
    where = f" on `{head['task']}`" if head.get("task") else ""
    out = [f"# distillflow run `{Path(run_dir).name}`", "", f"Headline metric: **{metric}**{where} (lm-eval).", ""]
    out.append(f"| model | {metric} | ± stderr | params | score / teacher | params / teacher |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        out.append(
            f"| {LABELS.get(r['model'], r['model'])} | {r[metric]:.4f} | {_fmt(r['stderr'])} | {r['params']:,} "
            f"| {_fmt(r['score_vs_teacher'])} | {_fmt(r['params_vs_teacher'])} |"
        )
    cols = score_columns(summary)
    if len(cols) > 1:
        out += [
            "",
            "## Every task",
            "",
            "| task / metric | " + " | ".join(LABELS.get(n, n) for n in summary["models"]) + " |",
        ]
        out.append("|---|" + "---:|" * len(summary["models"]))
        for task, metric in cols:
            cells = [(m.get("scores") or {}).get(task, {}).get(metric) for m in summary["models"].values()]
            out.append(
                f"| {task} / {metric} | " + " | ".join("-" if c is None else _with_stderr(c) for c in cells) + " |"
            )
    data = summary.get("data")
    if data:
        out += ["", "## Data", "", data_line(data) + "."]
    out += ["", "## Stages", "", "| stage | cached | seconds |", "|---|---|---:|"]
    for name, s in summary["stages"].items():
        out.append(f"| {name} | {'yes' if s['cached'] else 'no'} | {s['seconds']:.1f} |")
    for title, body in (extra or {}).items():
        out += ["", f"## {title}", "", body]
    out += ["", "![scores](plots/scores.png)", ""]
    return "\n".join(out)


def plot_scores(summary: dict, path: Path) -> Path:
    """Bar chart of score per model, annotated with parameter counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["models"])
    scores = [summary["models"][n].get("score") or 0.0 for n in names]
    params = [summary["models"][n]["params"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar([LABELS.get(n, n) for n in names], scores, color=["#444", "#c66", "#69c", "#3a6"][: len(names)])
    for bar, p in zip(bars, params, strict=True):
        ax.annotate(f"{p / 1e6:.2f}M", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel(summary["metric"])
    ax.set_ylim(0, max(1.1, 1.1 * max(scores, default=0.0)))  # most metrics are in [0, 1]; some are not
    head = summary.get("headline") or {}
    ax.set_title(f"{head.get('task', 'held-out')} score (label: parameters)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
