"""The run's summary, text tables and markdown report, from the per-model evaluation results.

Pure functions of the summary dict (no files, no Prefect): ``evaluation.build`` assembles the
summary from the run directory and writes the files; ``flows.publish`` turns them into artifacts.

Direction: every metric is marked ``↑`` (higher is better) or ``↓`` (lower is better), as
``compress.metrics`` decides (lm-eval's recorded ``higher_is_better`` first, then the name). The
ratio to the teacher is oriented so that 1.0 is "as good as the teacher" and below 1.0 is worse,
whichever way the metric points, and its header says which ratio it is: ``score / teacher`` for a
``↑`` metric, ``teacher / score`` for a ``↓`` one (a word perplexity of 360 against the teacher's
20 shows as 0.056, never as 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.gates import format_value
from compress.metrics import arrow, models_lower_is_better, retention

MODEL_ORDER = ("teacher", "pruned", "sft", "student")
LABELS = {"teacher": "teacher", "pruned": "pruned (no training)", "sft": "SFT baseline", "student": "KD student"}
RATIO_LEGEND = (
    "Relative to the teacher, 1.0 is as good as the teacher and below 1.0 is worse, whichever way the metric "
    "points: score / teacher for a metric where higher is better (↑), teacher / score where lower is better (↓); "
    "'-' where the ratio means nothing (a teacher value of 0, such as the teacher's KL to itself)."
)
TOKENS_LEGEND = (
    "Tokens trained: completion tokens seen by the distill stage's loss (prompt and padding tokens not counted; "
    "from the resumed step on when a stage resumed); 0 for the pruned model, '-' for the teacher (trained before "
    "this run)."
)
RSS_LEGEND = (
    "Peak RSS: the largest resident memory of the flow process and all its children (torchrun ranks, vLLM "
    "servers) sampled while the stage ran, MiB; pages shared between processes count in each."
)


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
    ``{task: {metric: {"value", "stderr", "higher_is_better"?}}}``; ``throughput`` is vLLM serving
    tokens/s (or None); ``tokens_trained`` the distill stage's count (or None). ``lower_is_better``
    is the headline metric's direction.
    """
    ordered = {m: models[m] for m in MODEL_ORDER if m in models} | {m: v for m, v in models.items()}
    task = (headline or {}).get("task") or ""
    out: dict[str, Any] = {
        "metric": metric,
        "headline": headline,
        "lower_is_better": models_lower_is_better(ordered, task, metric),
        "models": ordered,
        "stages": stages,
        "gates": gates or [],
    }
    if data is not None:
        out["data"] = {k: v for k, v in data.items() if k != "sources"} | {"sources": data.get("sources", [])}
    return out


def tokens_trained(manifest: dict[str, Any]) -> dict[str, int | None]:
    """Tokens each model was trained on in this run, from the manifest's stage results.

    ``distill_<model>``'s ``train_tokens`` (completion tokens seen by the loss; None when the stage
    was recorded before it was counted); 0 for ``pruned`` when the run pruned (pruning trains nothing).
    """
    stages = manifest.get("stages") or {}
    out: dict[str, int | None] = {"pruned": 0} if "prune" in stages else {}
    for name, rec in stages.items():
        if name.startswith("distill_"):
            out[name.removeprefix("distill_")] = ((rec or {}).get("result") or {}).get("train_tokens")
    return out


def headline_lower(summary: dict) -> bool:
    """Whether the headline metric is lower-is-better."""
    if "lower_is_better" in summary:
        return bool(summary["lower_is_better"])
    head = summary.get("headline") or {}
    return models_lower_is_better(summary["models"], head.get("task") or "", summary["metric"])


def column_lower(summary: dict, task: str, metric: str) -> bool:
    """Whether ``task``/``metric`` is lower-is-better (recorded direction first, then the name)."""
    return models_lower_is_better(summary["models"], task, metric)


def ratio_header(lower: bool, sep: str = " / ") -> str:
    """The ratio column's header: which ratio it is (see the module docstring)."""
    return f"teacher{sep}score" if lower else f"score{sep}teacher"


def score_columns(summary: dict) -> list[tuple[str, str]]:
    """Every (task, metric) that some model has, in first-seen order."""
    cols: list[tuple[str, str]] = []
    for m in summary["models"].values():
        for task, metrics in (m.get("scores") or {}).items():
            cols += [(task, name) for name in metrics if (task, name) not in cols]
    return cols


def _score(m: dict[str, Any], task: str, metric: str) -> dict[str, Any] | None:
    return (m.get("scores") or {}).get(task, {}).get(metric)


def column_retention(summary: dict, task: str, metric: str) -> dict[str, float | None]:
    """Each model's ``task``/``metric`` relative to the teacher's, in the metric's direction."""
    lower = column_lower(summary, task, metric)
    teacher = _score(summary["models"].get("teacher", {}), task, metric) or {}
    out = {}
    for name, m in summary["models"].items():
        value = (_score(m, task, metric) or {}).get("value")
        out[name] = retention(value, teacher.get("value"), lower)
    return out


def scores_table(summary: dict) -> str:
    """Models x (task, metric) as plain text, with lm-eval's stderr: one row per task and metric (↑/↓)."""
    cols = score_columns(summary)
    names = [f"{t}/{m} {arrow(column_lower(summary, t, m))}" for t, m in cols]
    width = max([22, *(len(n) + 2 for n in names)])
    lines = [f"{'task/metric':<{width}}" + "".join(f"{LABELS.get(n, n):>22}" for n in summary["models"])]
    lines.append("-" * len(lines[0]))
    for (task, metric), label in zip(cols, names, strict=True):
        cells = []
        for m in summary["models"].values():
            v = _score(m, task, metric)
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


def _with_stderr(v: dict[str, Any]) -> str:
    return f"{v['value']:.4f}" + (f" ± {v['stderr']:.4f}" if v.get("stderr") is not None else "")


def results_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per model: headline score, parameters, tokens trained and both relative to the teacher.

    ``score_vs_teacher`` is oriented by the headline's direction (1.0 = teacher, < 1.0 worse).
    """
    teacher = summary["models"].get("teacher", {})
    lower = headline_lower(summary)
    rows = []
    for name, m in summary["models"].items():
        rel_score = retention(m.get("score"), teacher.get("score"), lower)
        rel_params = m["params"] / teacher["params"] if teacher.get("params") else None
        rows.append(
            {
                "model": name,
                summary["metric"]: None if m.get("score") is None else round(m["score"], 4),
                "stderr": None if m.get("stderr") is None else round(m["stderr"], 4),
                "params": m["params"],
                "tokens_trained": m.get("tokens_trained"),
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
    lower = headline_lower(summary)
    tps = any(r["tokens_per_s"] is not None for r in rows)
    nll = any(r["nll"] is not None for r in rows)
    tokens = any(r["tokens_trained"] is not None for r in rows)
    head = f"{'model':<22}{metric + ' ' + arrow(lower):>15}{'params':>12}" + (f"{'tokens':>14}" if tokens else "")
    head += f"{ratio_header(lower, '/'):>15}{'params/teacher':>16}"
    head += (f"{'NLL ↓':>9}" if nll else "") + (f"{'tokens/s':>10}" if tps else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{LABELS.get(r['model'], r['model']):<22}{_num(r[metric]):>15}{r['params']:>12,}"
            + (f"{_count(r['tokens_trained']):>14}" if tokens else "")
            + f"{_fmt(r['score_vs_teacher']):>15}{_fmt(r['params_vs_teacher']):>16}"
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
    """One line per stage: cached or ran, how long it took, its peak RSS, and both when a cached stage ran."""
    return "\n".join(f"  {name:<18}{_stage_line(s)}" for name, s in summary["stages"].items())


def format_gates(summary: dict) -> str:
    """One line per gate: met or not, with the values it compared."""
    return "\n".join(f"  {'PASS' if g['passed'] else 'FAIL'}  {g['message']}" for g in summary.get("gates") or [])


def _stage_line(s: dict[str, Any]) -> str:
    rss = s.get("peak_rss_mb")
    line = f"{'cache hit' if s['cached'] else 'ran':<10}{s['seconds']:>8.1f}s" + (
        f"{_mib(rss):>12} MiB" if rss is not None else ""
    )
    if not s["cached"]:
        return line
    ran, ran_rss = s.get("ran_seconds"), s.get("ran_peak_rss_mb")
    when = [f"{ran:.1f}s" if ran is not None else None, f"peak {_mib(ran_rss)} MiB" if ran_rss is not None else None]
    when = [w for w in when if w]
    return line + (f"  (ran in {', '.join(when)})" if when else "")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _count(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table_rows(summary: dict) -> list[dict[str, Any]]:
    """Models x (task, metric) with lm-eval's stderr, parameters, tokens trained and throughput: the
    results table artifact (each metric's header carries ↑ or ↓)."""
    rows = []
    cols = [(t, m, arrow(column_lower(summary, t, m))) for t, m in score_columns(summary)]
    for name, m in summary["models"].items():
        row: dict[str, Any] = {"model": name, "params": m["params"], "tokens trained": _count(m.get("tokens_trained"))}
        for task, metric, way in cols:
            v = _score(m, task, metric)
            row[f"{task}/{metric} {way}"] = "-" if v is None else _with_stderr(v)
        row["vLLM tokens/s"] = _rate(m.get("throughput"))
        rows.append(row)
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_report(summary: dict, run_dir: Path, plots: list[str] | None = None) -> str:
    """The run report as markdown (also published as a Prefect artifact); ``plots`` are run-dir paths."""
    metric = summary["metric"]
    lower = headline_lower(summary)
    rows = results_rows(summary)
    head = summary.get("headline") or {}
    where = f" on `{head['task']}`" if head.get("task") else ""
    tps = any(r["tokens_per_s"] is not None for r in rows)
    nll = any(r["nll"] is not None for r in rows)
    way = "lower is better" if lower else "higher is better"
    out = [f"# distillflow run `{Path(run_dir).name}`", "", f"Headline metric: **{metric}**{where} (lm-eval, {way})."]
    backends = sorted({m.get("backend") or "hf" for m in summary["models"].values()})
    out += [f"Backend: {', '.join(backends)}." + (" Throughput: vLLM serving, generated tokens/s." if tps else ""), ""]
    cols = (
        f"| model | {metric} {arrow(lower)} | ± stderr | params | tokens trained | {ratio_header(lower)} "
        "| params / teacher |"
    )
    out.append(cols + (" NLL ↓ |" if nll else "") + (" tokens/s ↑ |" if tps else ""))
    out.append("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if nll else "") + ("---:|" if tps else ""))
    for r in rows:
        out.append(
            f"| {LABELS.get(r['model'], r['model'])} | {_num(r[metric])} | {_num(r['stderr'])} | {r['params']:,} "
            f"| {_count(r['tokens_trained'])} | {_fmt(r['score_vs_teacher'])} | {_fmt(r['params_vs_teacher'])} |"
            + (f" {_num(r['nll'])} |" if nll else "")
            + (f" {_rate(r['tokens_per_s'])} |" if tps else "")
        )
    out += ["", RATIO_LEGEND + " " + TOKENS_LEGEND]
    if summary.get("language_floor"):
        out += ["", floor_line(summary["language_floor"]) + "."]
    gates = summary.get("gates") or []
    if gates:
        out += ["", "## Gates", "", "| gate | result | values |", "|---|---|---|"]
        for g in gates:
            # A gate that could not be judged (a missing metric, a refused direction) has no values: say why.
            values = ", ".join(f"{k} = {format_value(v)}" for k, v in g["values"].items()) or g.get("message", "")
            out.append(f"| `{g['gate']}` | {'pass' if g['passed'] else '**FAIL**'} | {values} |")
    out += _every_task(summary)
    data = summary.get("data")
    if data:
        out += ["", "## Data", "", data_line(data) + "."]
    out += _stages(summary)
    for plot in plots or []:
        out += ["", f"![{Path(plot).stem}]({plot})"]
    out.append("")
    return "\n".join(out)


def _every_task(summary: dict) -> list[str]:
    """Every metric of every task for every model (± stderr), then each relative to the teacher."""
    cols = score_columns(summary)
    if not cols:
        return []
    names = [LABELS.get(n, n) for n in summary["models"]]
    out = ["", "## Every task", "", "| task / metric | " + " | ".join(names) + " |"]
    out.append("|---|" + "---:|" * len(names))
    for task, metric in cols:
        cells = [_score(m, task, metric) for m in summary["models"].values()]
        label = f"{task} / {metric} {arrow(column_lower(summary, task, metric))}"
        out.append(f"| {label} | " + " | ".join("-" if c is None else _with_stderr(c) for c in cells) + " |")
    if "teacher" not in summary["models"]:
        return out
    out += ["", "Relative to the teacher (1.0 = as good as the teacher, below 1.0 worse):", ""]
    out += ["| task / metric | ratio | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for task, metric in cols:
        lower = column_lower(summary, task, metric)
        rel = column_retention(summary, task, metric)
        label = f"{task} / {metric} {arrow(lower)}"
        out.append(f"| {label} | {ratio_header(lower)} | " + " | ".join(_fmt(rel[n]) for n in summary["models"]) + " |")
    return out


def _stages(summary: dict) -> list[str]:
    """The stage table: wall time and peak RSS of this run, and of the run that made a cache hit's outputs."""
    out = ["", "## Stages", ""]
    out += [
        "| stage | status | seconds | peak RSS (MiB) | seconds when it ran | peak RSS when it ran (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, s in summary["stages"].items():
        ran = s.get("ran_seconds") if s["cached"] else s["seconds"]
        ran_rss = s.get("ran_peak_rss_mb") if s["cached"] else s.get("peak_rss_mb")
        out.append(
            f"| {name} | {'cache hit' if s['cached'] else 'ran'} | {s['seconds']:.1f} | {_mib(s.get('peak_rss_mb'))} "
            f"| {'-' if ran is None else f'{ran:.1f}'} | {_mib(ran_rss)} |"
        )
    out += ["", RSS_LEGEND]
    return out
