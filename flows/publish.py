"""What every flow that evaluates models leaves behind: results, summary, report, plot, artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from compress.config import EvaluateConfig
from compress.lineage import write_json
from compress.models import checkpoint_params
from evaluation.harness import headline
from evaluation.report import build_summary, markdown_report, plot_scores, results_rows


def publish(
    run_name: str,
    run_dir: Path,
    evaluated: dict[str, dict[str, Any]],
    stages: dict[str, dict[str, Any]],
    evaluate: EvaluateConfig,
    data: dict[str, Any] | None = None,
    artifact_prefix: str = "compress",
) -> dict[str, Any]:
    """Write ``eval/results.json``, ``summary.json``, ``report.md`` and the plot; publish the artifacts.

    ``evaluated`` maps a model name to its evaluate stage's result (``path``, ``scores``, ``n``);
    the headline is ``evaluate.headline`` or the first model's first task and metric.
    """
    models: dict[str, dict[str, Any]] = {}
    for name, res in evaluated.items():
        path = Path(res["path"])
        models[name] = {"params": checkpoint_params(path), "scores": res["scores"], "n": res["n"], "path": str(path)}
    task, metric = headline(next(iter(models.values()))["scores"], evaluate)
    for m in models.values():
        best = m["scores"].get(task, {}).get(metric, {})
        m["score"], m["stderr"] = best.get("value"), best.get("stderr")
    write_json(run_dir / "eval" / "results.json", models)
    summary = build_summary(metric, models, stages, headline={"task": task, "metric": metric}, data=data)
    write_json(run_dir / "summary.json", summary)
    plot_scores(summary, run_dir / "plots" / "scores.png")
    report = markdown_report(summary, run_dir)
    (run_dir / "report.md").write_text(report)
    create_markdown_artifact(markdown=report, key=f"{artifact_prefix}-report", description=f"run {run_name}")
    create_table_artifact(table=results_rows(summary), key=f"{artifact_prefix}-results", description=f"run {run_name}")
    return summary
