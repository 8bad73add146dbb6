"""What every flow that evaluates models leaves behind: results, summary, report, plots, card, artifacts.

The files come from ``evaluation.build`` (no Prefect there, so ``distillflow report`` rebuilds
them the same way); this module adds the Prefect artifacts and then applies the gates: a gate that
is not met raises ``GateFailed`` after everything is written, which marks the flow run Failed with
a message naming the metric and both values.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from compress.gates import GateFailed
from compress.lineage import read_json
from compress.models import checkpoint_params
from evaluation.build import build_report, failed_gates, write_run_files
from evaluation.report import table_rows, tokens_trained


def publish(
    run_name: str,
    run_dir: Path,
    evaluated: dict[str, dict[str, Any]],
    stages: dict[str, dict[str, Any]],
    data: dict[str, Any] | None = None,
    artifact_prefix: str = "compress",
) -> dict[str, Any]:
    """Write the run's report files, publish them as artifacts, then enforce ``evaluate.gates``.

    ``evaluated`` maps a model name to its evaluate stage's result (``path``, ``scores``, ``n``,
    ``backend``, ``throughput``); ``stages`` is the runner's record of this run's stages (seconds,
    peak RSS). Each model's ``tokens_trained`` comes from its distill stage's record in the manifest.
    """
    trained = tokens_trained(read_json(Path(run_dir) / "manifest.json", default={}) or {})
    models: dict[str, dict[str, Any]] = {}
    for name, res in evaluated.items():
        path = Path(res["path"])
        models[name] = {
            "params": checkpoint_params(path),
            "scores": res["scores"],
            "n": res["n"],
            "path": str(path),
            "backend": res.get("backend", "hf"),
            "serving": res.get("throughput"),
            "tokens_trained": trained.get(name),
        }
    write_run_files(run_dir, models, stages, data)
    summary = build_report(run_dir)
    report = (run_dir / "report.md").read_text()
    create_markdown_artifact(
        markdown=_inline_images(report, run_dir), key=f"{artifact_prefix}-report", description=f"run {run_name}"
    )
    create_table_artifact(
        table=table_rows(summary),
        key=f"{artifact_prefix}-results",
        description=f"run {run_name}: every model on every task (lm-eval, ± stderr; ↑ higher / ↓ lower is better), "
        "parameters, tokens trained, vLLM tokens/s",
    )
    failed = failed_gates(summary)
    if failed:
        raise GateFailed(failed)
    return summary


def _inline_images(markdown: str, run_dir: Path) -> str:
    """Plots as data URIs: the dashboard shows them without access to the run directory."""

    def inline(m: re.Match) -> str:
        png = run_dir / m.group(2)
        if not png.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, markdown)
