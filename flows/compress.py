"""``compress_pipeline``: prune -> generate (vLLM) -> distill (KD + SFT baseline) -> evaluate (lm-eval).

Run it from Python (``compress_pipeline(config)`` with a ``PipelineConfig``, a dict or a YAML
path), from the CLI (``distillflow run CONFIG``) or as a Prefect deployment. It needs no Prefect
server (ephemeral mode) and works against a real one.

Every stage is a cached task whose key is computed here from content: the stage's config, the
sha256 of its inputs and a hash of the library source. The run directory ``runs/<name>/`` holds
the checkpoints, data, logits, evaluation results, ``manifest.json`` (lineage) and ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from pydantic import BaseModel

from compress.config import PipelineConfig, coerce_config, config_hash
from compress.lineage import code_version, package_versions, record_stage, sha256_path, source_hash, write_json
from compress.models import checkpoint_params, resolve_device
from evaluation.harness import headline
from evaluation.report import build_summary, markdown_report, plot_scores, results_rows
from flows.plan import StageKeys, preflight, teacher_identity, write_eval_tasks
from tasks.stages import distill_task, evaluate_task, generate_task, prepare_task, prune_task


class PipelineResult(BaseModel):
    """What ``compress_pipeline`` returns: where the run lives and its headline figures."""

    run_dir: str
    summary: dict[str, Any]


def _run_stage(task_fn, outputs: list[Path], **kwargs) -> tuple[dict, bool, float]:
    """Call a task, re-running it if its cached outputs are gone; return (result, cached, seconds)."""
    t0 = time.time()
    fn = task_fn if all(p.exists() for p in outputs) else task_fn.with_options(refresh_cache=True)
    state = fn(**kwargs, return_state=True)
    result = state.result()
    return result, state.name == "Cached", round(time.time() - t0, 2)


@flow(name="compress-pipeline", log_prints=True)
def compress_pipeline(config: PipelineConfig | dict | str = "configs/tiny.yaml") -> PipelineResult:
    """Compress the teacher of ``config`` and benchmark teacher, pruned, SFT baseline and KD student."""
    cfg = coerce_config(config)
    logger = get_run_logger()
    pf = preflight(cfg, full=True)  # one-line ConfigError on bad input, before any stage
    for w in pf.warnings:
        logger.warning(w)
    device = resolve_device(cfg.device)
    dtype, remote = cfg.teacher.dtype, cfg.teacher.trust_remote_code
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    code, code_ver, versions = source_hash(), code_version(), package_versions()
    teacher_dir = pf.teacher.path
    teacher_sha = teacher_identity(cfg, pf.teacher)
    tasks_dir = run_dir / "eval" / "tasks"
    keys = StageKeys(cfg, teacher_sha, write_eval_tasks(cfg, tasks_dir), device, code)
    stages: dict[str, dict[str, Any]] = {}

    def record(
        stage: str,
        key: str,
        conf: BaseModel | None,
        inputs: dict[str, str],
        outputs: dict[str, Path],
        result: dict,
        cached: bool,
        seconds: float,
    ) -> dict[str, str]:
        """Record a stage in the manifest; return the sha256 of its outputs (hashed once, here)."""
        stages[stage] = {"cached": cached, "seconds": seconds}
        out_hashes = {name: sha256_path(p) for name, p in outputs.items()}
        record_stage(
            run_dir,
            stage,
            {
                "status": "cached" if cached else "completed",
                "cache_key": key,
                "config_hash": config_hash(conf) if conf is not None else None,
                "inputs": inputs,
                "outputs": out_hashes,
                "code_hash": code,
                "code_version": code_ver,
                "packages": versions,
                "device": device,
                "seconds": seconds,
                "result": {k: v for k, v in result.items() if not isinstance(v, list | dict)},
            },
        )
        logger.info("stage %s: %s in %.1fs", stage, "cache hit" if cached else "ran", seconds)
        return out_hashes

    # 0. prepare: training prompts and calibration texts
    data_dir = run_dir / "data"
    prompts, calibration = data_dir / "prompts.jsonl", data_dir / "calibration.jsonl"
    key = keys.prepare()
    data_report, cached, secs = _run_stage(
        prepare_task,
        [prompts, calibration],
        cfg=cfg,
        teacher_dir=str(teacher_dir),
        tasks_dir=str(tasks_dir),
        out_dir=str(data_dir),
        cache_key=key,
    )
    prep = record(
        "prepare",
        key,
        cfg.effective_data(),
        {"teacher": teacher_sha, "eval_sets": keys.eval_id},
        {"prompts": prompts, "calibration": calibration},
        data_report,
        cached,
        secs,
    )

    # 1. prune
    pruned_dir = run_dir / "pruned"
    key = keys.prune(prep["calibration"])
    res, cached, secs = _run_stage(
        prune_task,
        [pruned_dir],
        teacher_dir=str(teacher_dir),
        calibration=str(calibration),
        cfg=cfg.prune,
        out_dir=str(pruned_dir),
        device=device,
        dtype=dtype,
        trust_remote_code=remote,
        cache_key=key,
    )
    inputs = {"teacher": teacher_sha, "calibration": prep["calibration"]}
    pruned_sha = record("prune", key, cfg.prune, inputs, {"pruned": pruned_dir}, res, cached, secs)["pruned"]

    # 2. generate
    logits_dir = run_dir / "logits"
    key = keys.generate(prep["prompts"])
    res, cached, secs = _run_stage(
        generate_task,
        [data_dir / "train.jsonl", logits_dir / "ids.npy"],
        teacher_dir=str(teacher_dir),
        prompts=str(prompts),
        cfg=cfg.generate,
        run_dir=str(run_dir),
        trust_remote_code=remote,
        cache_key=key,
    )
    gen_hashes = record(
        "generate",
        key,
        cfg.generate,
        {"teacher": teacher_sha, "prompts": prep["prompts"]},
        {"data": data_dir / "train.jsonl", "logits": logits_dir},
        res,
        cached,
        secs,
    )
    data_sha = gen_hashes["data"] + gen_hashes["logits"]

    # 3. distill: KD student, and the SFT baseline on the same data
    students = {"student": True} | ({"sft": False} if cfg.distill.sft_baseline else {})
    model_dirs = {"teacher": teacher_dir, "pruned": pruned_dir}
    model_shas = {"teacher": teacher_sha, "pruned": pruned_sha}
    for name, use_logits in students.items():
        out = run_dir / name
        key = keys.distill(name, use_logits, pruned_sha, data_sha)
        res, cached, secs = _run_stage(
            distill_task,
            [out / "config.json"],
            student_dir=str(pruned_dir),
            data_dir=str(data_dir),
            logits_dir=str(logits_dir),
            cfg=cfg.distill,
            out_dir=str(out),
            use_teacher_logits=use_logits,
            device=device,
            cache_key=key,
        )
        inputs = {"pruned": pruned_sha, "data": data_sha}
        model_shas[name] = record(f"distill_{name}", key, cfg.distill, inputs, {name: out}, res, cached, secs)[name]
        model_dirs[name] = out

    # 4. evaluate every model on every task
    models: dict[str, dict[str, Any]] = {}
    for name, mdir in model_dirs.items():
        key = keys.evaluate(name, model_shas[name])
        res, cached, secs = _run_stage(
            evaluate_task,
            [],
            model_dir=str(mdir),
            tasks_dir=str(tasks_dir),
            cfg=cfg.evaluate,
            label=name,
            device=device,
            dtype=dtype,
            trust_remote_code=remote,
            cache_key=key,
        )
        inputs = {"model": model_shas[name], "eval_sets": keys.eval_id}
        record(f"evaluate_{name}", key, cfg.evaluate, inputs, {}, res, cached, secs)
        models[name] = {"params": checkpoint_params(mdir), "scores": res["scores"], "n": res["n"], "path": str(mdir)}
    task, metric = headline(models["teacher"]["scores"], cfg.evaluate)
    for m in models.values():
        best = m["scores"].get(task, {}).get(metric, {})
        m["score"], m["stderr"] = best.get("value"), best.get("stderr")
    write_json(run_dir / "eval" / "results.json", models)

    summary = build_summary(metric, models, stages, headline={"task": task, "metric": metric}, data=data_report)
    write_json(run_dir / "summary.json", summary)
    plot_scores(summary, run_dir / "plots" / "scores.png")
    report = markdown_report(summary, run_dir)
    (run_dir / "report.md").write_text(report)
    create_markdown_artifact(markdown=report, key="compress-report", description=f"run {cfg.name}")
    create_table_artifact(table=results_rows(summary), key="compress-results", description=f"run {cfg.name}")
    return PipelineResult(run_dir=str(run_dir), summary=summary)
