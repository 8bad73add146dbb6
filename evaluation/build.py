"""Rebuild a run's report from its files: summary, report, plots, model card and gate verdicts.

Reads only the run directory:

- ``config.yaml``: the run's config (headline and gates come from its ``evaluate`` section);
- ``eval/results.json``: every model's lm-eval scores, parameters, backend and throughput;
- ``eval/run.json``: this run's stages (cached or ran, seconds, seconds when it ran) and data report;
- ``manifest.json``: lineage for the model card; ``logs/train-*.jsonl``: loss curves;
  ``plots/importance.png``: written by the prune stage.

and writes ``summary.json``, ``report.md``, ``plots/scores.png``, ``plots/vs_teacher.png``,
``plots/loss.png`` and, for a pipeline run, the model card ``student/README.md``. The flows call it
after the last stage; ``distillflow report RUN_DIR`` calls it on a finished run, so a report can be
rebuilt (say after changing gates) without Prefect and without re-running anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.config import EvaluateConfig
from compress.gates import GateError, check_gate
from compress.lineage import read_json, write_json
from evaluation.harness import LANGUAGE_FLOOR, headline, language_nll
from evaluation.model_card import model_card
from evaluation.plots import plot_losses, plot_score_vs_params, plot_vs_teacher
from evaluation.report import build_summary, markdown_report

RESULTS = Path("eval") / "results.json"
RUN_RECORD = Path("eval") / "run.json"


def write_run_files(
    run_dir: Path,
    models: dict[str, dict[str, Any]],
    stages: dict[str, dict[str, Any]],
    data: dict[str, Any] | None = None,
) -> None:
    """What a flow hands to ``build_report``: per-model results, and the stages and data of this run."""
    write_json(Path(run_dir) / RESULTS, models)
    write_json(Path(run_dir) / RUN_RECORD, {"stages": stages, "data": data})


def build_report(run_dir: Path) -> dict[str, Any]:
    """Write every report file of ``run_dir`` from its files (module docstring); return the summary.

    Gates are judged here: ``summary["gates"]`` lists each with ``passed`` and a one-line message
    naming the values. A gate that names a metric the results lack counts as failed, with the reason.
    """
    run_dir = Path(run_dir)
    models = read_json(run_dir / RESULTS)
    if not models:
        raise FileNotFoundError(f"{run_dir / RESULTS}: not found or empty (has the run evaluated its models?)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    # Only what judges and labels the results: the rest (an include_path, say) may not resolve
    # from where the report is rebuilt, and is not needed.
    section = (config or {}).get("evaluate") or {}
    evaluate = EvaluateConfig.model_validate({k: section[k] for k in ("tasks", "headline", "gates") if k in section})
    record = read_json(run_dir / RUN_RECORD, default={}) or {}

    for m in models.values():
        m["throughput"] = (m.get("serving") or {}).get("tokens_per_s")
    task, metric = headline(next(iter(models.values()))["scores"], evaluate)
    for m in models.values():
        best = m["scores"].get(task, {}).get(metric, {})
        m["score"], m["stderr"] = best.get("value"), best.get("stderr")
        m["nll"] = language_nll(m["scores"])
    gates = _judge(evaluate.gates, models, (task, metric))
    summary = build_summary(
        metric, models, record.get("stages") or {}, {"task": task, "metric": metric}, record.get("data"), gates
    )
    floor = read_json(run_dir / "eval" / "tasks" / LANGUAGE_FLOOR, default=None)
    if floor and any(m.get("nll") is not None for m in models.values()):
        summary["language_floor"] = floor

    plots = [plot_score_vs_params(summary, run_dir / "plots" / "scores.png")]
    vs_teacher = plot_vs_teacher(summary, run_dir / "plots" / "vs_teacher.png", evaluate.tasks)
    plots += [vs_teacher] if vs_teacher else []
    logs = {name: run_dir / "logs" / f"train-{name}.jsonl" for name in ("student", "sft")}
    loss = plot_losses(logs, run_dir / "plots" / "loss.png")
    plots += [loss] if loss else []
    if (run_dir / "plots" / "importance.png").is_file() and "pruned" in models:
        plots.append(run_dir / "plots" / "importance.png")
    summary["plots"] = [str(p.relative_to(run_dir)) for p in plots]
    (run_dir / "report.md").write_text(markdown_report(summary, run_dir, summary["plots"]))

    student = Path(models.get("student", {}).get("path", run_dir / "student"))
    if "student" in models and "distill" in (config or {}) and (student / "config.json").is_file():
        manifest = read_json(run_dir / "manifest.json", default={}) or {}
        (student / "README.md").write_text(model_card(summary, config, manifest, run_dir))
        summary["model_card"] = str(student / "README.md")
    write_json(run_dir / "summary.json", summary)
    return summary


def _judge(gates: list[str], models: dict[str, dict[str, Any]], head: tuple[str, str]) -> list[dict[str, Any]]:
    out = []
    for i, text in enumerate(gates):
        try:
            r = check_gate(text, models, head, i)
        except GateError as e:
            out.append({"gate": text, "passed": False, "values": {}, "message": str(e)})
            continue
        out.append(
            {"gate": text, "passed": r.passed, "left": r.left, "op": r.op, "right": r.right, "values": r.values}
            | {"message": r.message()}
        )
    return out


def failed_gates(summary: dict[str, Any]) -> str | None:
    """One line naming every gate that was not met, or None when all were (or there were none)."""
    failed = [g["message"] for g in summary.get("gates") or [] if not g["passed"]]
    if not failed:
        return None
    return f"{len(failed)} of {len(summary['gates'])} evaluate.gates not met: " + "; ".join(failed)
