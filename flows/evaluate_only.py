"""``evaluate_only``: lm-eval on existing checkpoints, with the same tasks, cache and report as a full run.

Each model is one ``evaluate_<name>`` stage keyed by the checkpoint's content, so re-evaluating an
unchanged checkpoint on unchanged tasks is a cache hit. Writes ``runs/<name>/eval/results.json``,
``summary.json``, ``report.md`` and the plot, and publishes the report and the results table.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from compress.config import EvaluateOnlyConfig, PipelineConfig, config_hash
from compress.lineage import code_version, package_versions, sha256_path_cached, source_hash
from compress.models import resolve_device
from evaluation.tasks import check_tasks
from flows.compress import PipelineResult
from flows.plan import write_eval_tasks
from flows.publish import publish
from tasks.stage import Stage, StageRunner


@flow(name="evaluate-only", flow_run_name="{config.name}")
def evaluate_only(config: EvaluateOnlyConfig = EvaluateOnlyConfig()) -> PipelineResult:
    """Evaluate every model of ``config`` on every task of ``config.evaluate``."""
    cfg = EvaluateOnlyConfig.model_validate(config.model_dump())
    check_tasks(cfg.evaluate)
    for m in cfg.models:
        if not (Path(m.path) / "config.json").is_file():
            raise FileNotFoundError(f"models[{m.name}].path: no checkpoint at '{m.path}'")
    device = resolve_device(cfg.device)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks_dir = run_dir / "eval" / "tasks"
    # write_eval_tasks reads the task world and evaluate sections only.
    as_pipeline = PipelineConfig.model_construct(taskworld=cfg.taskworld, evaluate=cfg.evaluate)
    eval_id = write_eval_tasks(as_pipeline, tasks_dir)
    runner = StageRunner(run_dir, source_hash(), code_version(), package_versions(), device)
    evaluated = {}
    for m in cfg.models:
        model_sha = sha256_path_cached(Path(m.path), run_dir.parent / ".hashcache.json")
        evaluated[m.name] = runner(
            Stage(
                name=f"evaluate_{m.name}",
                task="evaluate",
                params={
                    "model_dir": str(Path(m.path).resolve()),
                    "tasks_dir": str(tasks_dir),
                    "cfg": cfg.evaluate,
                    "label": m.name,
                    "device": device,
                    "dtype": cfg.dtype,
                    "trust_remote_code": cfg.trust_remote_code,
                },
                key=[config_hash(cfg.evaluate, exclude={"headline"}), eval_id, model_sha, cfg.dtype, device],
                inputs={"model": model_sha, "eval_sets": eval_id},
                config=cfg.evaluate,
            )
        ).result
    summary = publish(cfg.name, run_dir, evaluated, runner.stages, cfg.evaluate, artifact_prefix="evaluate")
    return PipelineResult(run_dir=str(run_dir), summary=summary)
