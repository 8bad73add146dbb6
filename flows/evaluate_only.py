"""``evaluate_only``: lm-eval on existing checkpoints, with the same tasks, cache and report as a full run.

Each model is one ``evaluate_<name>`` stage keyed by the checkpoint's content, so re-evaluating an
unchanged checkpoint on unchanged tasks is a cache hit. Writes ``runs/<name>/eval/results.json``,
``summary.json``, ``report.md`` and the plots, publishes the report and the results table, and
fails the run when an ``evaluate.gates`` entry is not met.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow

from compress.config import ConfigError, EvaluateOnlyConfig
from compress.jobs import Checkpoint, EvaluateJob
from compress.lineage import code_version, hash_cache_file, package_versions, sha256_path_cached, source_hash
from compress.models import resolve_device
from compress.rundir import RunDirLock
from evaluation.tasks import check_tasks
from flows.compress import PipelineResult
from flows.publish import publish
from stages.evaluate import check_evaluation, evaluate_stage
from stages.preflight import write_eval_tasks
from stages.runner import Provenance, StageRunner


@flow(name="evaluate-only", flow_run_name="{config.name}")
def evaluate_only(config: EvaluateOnlyConfig = EvaluateOnlyConfig()) -> PipelineResult:
    """Evaluate every model of ``config`` on every task of ``config.evaluate``."""
    cfg = EvaluateOnlyConfig.model_validate(config.model_dump())
    check_evaluation(cfg.evaluate, [m.name for m in cfg.models], check_tasks(cfg.evaluate, list(cfg.taskworld.tasks)))
    for m in cfg.models:
        if not (Path(m.path) / "config.json").is_file():
            raise ConfigError(f"models[{m.name}].path: no checkpoint at '{m.path}'")
    with RunDirLock(cfg.run_dir):
        return _evaluate(cfg)


def _evaluate(cfg: EvaluateOnlyConfig) -> PipelineResult:
    device = resolve_device(cfg.device)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tasks_dir = run_dir / "eval" / "tasks"
    eval_id = write_eval_tasks(cfg.taskworld, cfg.evaluate, tasks_dir)
    runner = StageRunner(run_dir, Provenance(source_hash(), device, code_version(), package_versions()))
    evaluated = {}
    for m in cfg.models:
        path = Path(m.path).resolve()
        model = Checkpoint(
            path=path,
            identity=sha256_path_cached(path, hash_cache_file(cfg.runs_dir)),
            trust_remote_code=cfg.trust_remote_code,
        )
        job = EvaluateJob(
            label=m.name,
            model=model,
            evaluate=cfg.evaluate,
            tasks_dir=tasks_dir,
            eval_id=eval_id,
            dtype=cfg.dtype,
            device=device,
            log_dir=run_dir / "logs",
        )
        evaluated[m.name] = runner(evaluate_stage(job)).result
    summary = publish(cfg.name, run_dir, evaluated, runner.stages, artifact_prefix="evaluate")
    return PipelineResult(run_dir=str(run_dir), summary=summary)
