"""The run's summary, text tables and markdown report, from the per-model evaluation results.

Pure functions of the summary dict (no files, no Prefect): ``evaluation.build`` assembles the
summary from the run directory and writes the files; ``flows.publish`` turns them into artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.gates import format_value

MODEL_ORDER = ("teacher", "pruned", "sft", "student")
LABELS = {"teacher": "teacher", "pruned": "pruned (no training)", "sft": "SFT baseline", "student": "KD student"}


def build_summary(
    metric: str,
    models: dict[str, dict[str, Any]],
    stages: dict[str, dict[str, Any]],
    headline: dict[str, str] | None = None,
    data: dict[str, Any] | None = None,
    gates: list[dict[str, Any]] | None = None,
) -> dict:
    """``{"metric", "headline", "models": {name: {"params", "score", "scores", ...}}, "stages", "gates", "data"}``.

    ``score`` is the headline metric; ``scores`` holds every task and metric as
    ``{task: {metric: {"value", "stderr"}}}``; ``throughput`` is vLLM serving tokens/s (or None).
    """
    ordered = {m: models[m] for m in MODEL_ORDER if m in models} | {m: v for m, v in models.items()}
    out: dict[str, Any] = {
        "metric": metric,
        "headline": headline,
        "models": ordered,
        "stages": stages,
        "gates": gates or [],
    }
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
        rel_score = m["score"] / teacher["score"] if teacher.get("score") and m.get("score") is not None else None
        rel_params = m["params"] / teacher["params"] if teacher.get("params") else None
        rows.append(
            {
                "model": name,
                summary["metric"]: None if m.get("score") is None else round(m["score"], 4),
                "stderr": None if m.get("stderr") is None else round(m["stderr"], 4),
                "params": m["params"],
                "score_vs_teacher": None if rel_score is None else round(rel_score, 3),
                "params_vs_teacher": None if rel_params is None else round(rel_params, 3),
                "nll": None if m.get("nll") is None else round(m["nll"], 4),
                "tokens_per_s": m.get("throughput"),
            }
        )
    return rows


def format_table(summary: dict) -> str:
    """A plain-text table for the terminal."""
    rows = results_rows(summary)
    metric = summary["metric"]
    tps = any(r["tokens_per_s"] is not None for r in rows)
    nll = any(r["nll"] is not None for r in rows)
    head = f"{'model':<22}{metric:>13}{'params':>12}{'score/teacher':>15}{'params/teacher':>16}"
    head += (f"{'NLL':>9}" if nll else "") + (f"{'tokens/s':>10}" if tps else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{LABELS.get(r['model'], r['model']):<22}{_num(r[metric]):>13}{r['params']:>12,}"
            f"{_fmt(r['score_vs_teacher']):>15}{_fmt(r['params_vs_teacher']):>16}"
            + (f"{_fmt(r['nll']):>9}" if nll else "")
            + (f"{_rate(r['tokens_per_s']):>10}" if tps else "")
        )
    floor = summary.get("language_floor")
    if floor:
        lines.append(floor_line(floor))
    return "\n".join(lines)


def floor_line(floor: dict[str, float]) -> str:
    """The language's floor in one sentence (NLL is nats per character on its held-out texts)."""
    return (
        f"NLL: nats per character on {floor['texts']} held-out texts of the language; the floor there is "
        f"{floor['entropy']:.4f} (mean exact entropy), the true language scores {floor['nll']:.4f}"
    )


def format_stages(summary: dict) -> str:
    """One line per stage: cached or ran, how long it took, and how long a cached stage took when it ran."""
    return "\n".join(f"  {name:<18}{_stage_time(s)}" for name, s in summary["stages"].items())


def format_gates(summary: dict) -> str:
    """One line per gate: met or not, with the values it compared."""
    return "\n".join(f"  {'PASS' if g['passed'] else 'FAIL'}  {g['message']}" for g in summary.get("gates") or [])


def _stage_time(s: dict[str, Any]) -> str:
    if not s["cached"]:
        return f"{'ran':<10}{s['seconds']:>8.1f}s"
    ran = s.get("ran_seconds")
    return f"{'cache hit':<10}{s['seconds']:>8.1f}s" + (f"  (ran in {ran:.1f}s)" if ran is not None else "")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table_rows(summary: dict) -> list[dict[str, Any]]:
    """Models x (task, metric) with lm-eval's stderr, parameters and throughput: the results table artifact."""
    rows = []
    for name, m in summary["models"].items():
        row: dict[str, Any] = {"model": name, "params": m["params"]}
        for task, metric in score_columns(summary):
            v = (m.get("scores") or {}).get(task, {}).get(metric)
            row[f"{task}/{metric}"] = "-" if v is None else _with_stderr(v)
        row["vLLM tokens/s"] = _rate(m.get("throughput"))
        rows.append(row)
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_report(summary: dict, run_dir: Path, plots: list[str] | None = None) -> str:
    """The run report as markdown (also published as a Prefect artifact); ``plots`` are run-dir paths."""
    metric = summary["metric"]
    rows = results_rows(summary)
    head = summary.get("headline") or {}
    where = f" on `{head['task']}`" if head.get("task") else ""
    tps = any(r["tokens_per_s"] is not None for r in rows)
    nll = any(r["nll"] is not None for r in rows)
    out = [f"# distillflow run `{Path(run_dir).name}`", "", f"Headline metric: **{metric}**{where} (lm-eval)."]
    backends = sorted({m.get("backend") or "hf" for m in summary["models"].values()})
    out += [f"Backend: {', '.join(backends)}." + (" Throughput: vLLM serving, generated tokens/s." if tps else ""), ""]
    cols = f"| model | {metric} | ± stderr | params | score / teacher | params / teacher |"
    out.append(cols + (" NLL |" if nll else "") + (" tokens/s |" if tps else ""))
    out.append("|---|---:|---:|---:|---:|---:|" + ("---:|" if nll else "") + ("---:|" if tps else ""))
    for r in rows:
        out.append(
            f"| {LABELS.get(r['model'], r['model'])} | {_num(r[metric])} | {_num(r['stderr'])} | {r['params']:,} "
            f"| {_fmt(r['score_vs_teacher'])} | {_fmt(r['params_vs_teacher'])} |"
            + (f" {_num(r['nll'])} |" if nll else "")
            + (f" {_rate(r['tokens_per_s'])} |" if tps else "")
        )
    if summary.get("language_floor"):
        out += ["", floor_line(summary["language_floor"]) + "."]
    gates = summary.get("gates") or []
    if gates:
        out += ["", "## Gates", "", "| gate | result | values |", "|---|---|---|"]
        for g in gates:
            values = ", ".join(f"{k} = {format_value(v)}" for k, v in g["values"].items())
            out.append(f"| `{g['gate']}` | {'pass' if g['passed'] else '**FAIL**'} | {values} |")
    cols_all = score_columns(summary)
    if len(cols_all) > 1:
        out += [
            "",
            "## Every task",
            "",
            "| task / metric | " + " | ".join(LABELS.get(n, n) for n in summary["models"]) + " |",
        ]
        out.append("|---|" + "---:|" * len(summary["models"]))
        for task, metric in cols_all:
            cells = [(m.get("scores") or {}).get(task, {}).get(metric) for m in summary["models"].values()]
            out.append(
                f"| {task} / {metric} | " + " | ".join("-" if c is None else _with_stderr(c) for c in cells) + " |"
            )
    data = summary.get("data")
    if data:
        out += ["", "## Data", "", data_line(data) + "."]
    out += ["", "## Stages", "", "| stage | status | seconds | seconds when it ran |", "|---|---|---:|---:|"]
    for name, s in summary["stages"].items():
        ran = s.get("ran_seconds") if s["cached"] else s["seconds"]
        out.append(
            f"| {name} | {'cache hit' if s['cached'] else 'ran'} | {s['seconds']:.1f} | "
            + ("-" if ran is None else f"{ran:.1f}")
            + " |"
        )
    for plot in plots or []:
        out += ["", f"![{Path(plot).stem}]({plot})"]
    out.append("")
    return "\n".join(out)
