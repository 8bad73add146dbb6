"""The model card: ``README.md`` in the student checkpoint, with its lineage, metrics and the command
that reproduces it. Hugging Face's card layout (YAML front matter, then markdown), so the hub and
``huggingface_hub.ModelCard`` read it. The checkpoint's content hash skips this file
(``compress.lineage.SIDECAR_FILES``): writing the card never invalidates the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.metrics import arrow
from evaluation.report import LABELS, RATIO_LEGEND, headline_lower, ratio_header, results_rows, score_columns


def model_card(summary: dict[str, Any], config: dict[str, Any], manifest: dict[str, Any], run_dir: Path) -> str:
    """The card of the KD student of the run in ``run_dir`` (``config``: the run's config.yaml)."""
    teacher = (config.get("teacher") or {}).get("path", "?")
    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distillflow", "pruned", "knowledge-distillation"],
    }
    if not Path(str(teacher)).exists() and "/" in str(teacher):
        front["base_model"] = str(teacher)  # a hub id
    stages = manifest.get("stages") or {}
    title = f"# {config.get('name', 'run')}: KD student"
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", title]
    out += ["", _story(summary, config, stages, str(teacher)), ""]
    out += ["## Evaluation (lm-eval)", "", *_scores(summary), ""]
    gates = summary.get("gates") or []
    if gates:
        out += ["## Gates", ""] + [f"- {'pass' if g['passed'] else 'FAIL'}: {g['message']}" for g in gates] + [""]
    out += ["## Lineage", "", "| stage | inputs (sha256) | outputs (sha256) | code | recorded |"]
    out.append("|---|---|---|---|---|")
    for name, rec in stages.items():
        out.append(
            f"| {name} | {_hashes(rec.get('inputs'))} | {_hashes(rec.get('outputs'))} | "
            f"{rec.get('code_version', '-')} | {rec.get('recorded_at', '-')} |"
        )
    packages = next((rec.get("packages") for rec in stages.values() if rec.get("packages")), {})
    if packages:
        out += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()) + "."]
    out += [
        "",
        "## Reproduce",
        "",
        "With the config this run was made with (written into its run directory):",
        "",
        "```bash",
        f"distillflow run {Path(run_dir) / 'config.yaml'}",
        "```",
        "",
        "Every stage is cached by content: re-running it with unchanged inputs only re-checks them.",
        "",
    ]
    return "\n".join(out)


def _story(summary: dict[str, Any], config: dict[str, Any], stages: dict[str, Any], teacher: str) -> str:
    models = summary["models"]
    prune = (stages.get("prune") or {}).get("result") or {}
    distill = config.get("distill") or {}
    trained = (stages.get("distill_student") or {}).get("result") or {}
    t_params, s_params = models.get("teacher", {}).get("params"), models.get("student", {}).get("params")
    size = f"{t_params:,} to {s_params:,} parameters ({s_params / t_params:.1%})" if t_params and s_params else ""
    how = f"{prune.get('method', '?')} pruning by {prune.get('selection', '?')}" if prune else "pruning"
    kd = (
        f"white-box knowledge distillation ({distill.get('loss', '?')}, kd_weight {distill.get('kd_weight', '?')}, "
        f"temperature {distill.get('temperature', '?')}, {distill.get('teacher_source', 'cached')} teacher"
        f"{', LoRA merged' if distill.get('lora') else ''}) on {trained.get('examples', '?')} teacher completions "
        f"for {trained.get('steps', '?')} steps"
        + (f" ({trained['train_tokens']:,} completion tokens)" if trained.get("train_tokens") is not None else "")
    )
    return f"Compressed from `{teacher}` by distillflow: {how}, {size}, then {kd}."


def _scores(summary: dict[str, Any]) -> list[str]:
    metric = summary["metric"]
    lower = headline_lower(summary)
    lines = [
        f"| model | {metric} {arrow(lower)} | ± stderr | params | tokens trained | {ratio_header(lower)} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results_rows(summary):
        stderr = "-" if r["stderr"] is None else f"{r['stderr']:.4f}"
        rel = "-" if r["score_vs_teacher"] is None else f"{r['score_vs_teacher']:.3f}"
        value = "-" if r[metric] is None else f"{r[metric]:.4f}"
        tokens = "-" if r["tokens_trained"] is None else f"{r['tokens_trained']:,}"
        lines.append(
            f"| {LABELS.get(r['model'], r['model'])} | {value} | {stderr} | {r['params']:,} | {tokens} | {rel} |"
        )
    lines += ["", RATIO_LEGEND]
    if len(score_columns(summary)) > 1:
        lines += ["", "Every task and metric is in the run's `report.md`."]
    return lines


def _hashes(d: dict[str, str] | None) -> str:
    return ", ".join(f"{k} `{(v or '-')[:12]}`" for k, v in (d or {}).items()) or "-"
