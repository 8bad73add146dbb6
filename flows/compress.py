"""``compress_pipeline``: prune -> generate (vLLM) -> distill (KD + SFT baseline) -> evaluate (lm-eval).

Run it from Python (``compress_pipeline(config)`` with a ``PipelineConfig``, a dict or a YAML
path), from the CLI (``distillflow run CONFIG``) or as a Prefect deployment. It needs no Prefect
server (ephemeral mode) and works against a real one.

Every stage is a cached task whose key is computed here from content: the stage's config, the
sha256 of its inputs and a hash of the library source. The run directory ``runs/<name>/`` holds
the checkpoints, data, logits, evaluation results, ``manifest.json`` (lineage) and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from pydantic import BaseModel

from compress.config import PipelineConfig, coerce_config, config_hash
from compress.data.taskworld import make_splits
from compress.lineage import code_version, package_versions, record_stage, sha256_path, write_json
from compress.models import checkpoint_params
from evaluation.harness import METRIC, write_task
from evaluation.report import build_summary, markdown_report, plot_scores, results_rows
from tasks.stages import distill_task, evaluate_task, generate_task, prune_task

# Fields that change how generation runs, not what it produces: kept out of the cache key.
GENERATE_RUNTIME_FIELDS = {
    "vllm_python",
    "concurrency",
    "prompts_per_request",
    "startup_timeout_s",
    "request_timeout_s",
}
_SOURCE_ROOTS = ("compress", "evaluation", "tasks")


class PipelineResult(BaseModel):
    """What ``compress_pipeline`` returns: where the run lives and its headline figures."""

    run_dir: str
    summary: dict[str, Any]


def source_hash() -> str:
    """sha256 over the library source (``compress/``, ``evaluation/``, ``tasks/``): the code part of cache keys."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in _SOURCE_ROOTS:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def stage_key(stage: str, *parts: Any) -> str:
    """Cache key of a stage: sha256 over its name and the given config hashes / input hashes."""
    h = hashlib.sha256(stage.encode())
    for p in parts:
        h.update(b"\0" + (config_hash(p) if isinstance(p, BaseModel) else str(p)).encode())
    return f"distillflow-{stage}-{h.hexdigest()[:32]}"


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
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    code, code_ver, versions = source_hash(), code_version(), package_versions()
    teacher_dir = Path(cfg.teacher.path).resolve()
    teacher_sha = sha256_path(teacher_dir)
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
                "seconds": seconds,
                "result": {k: v for k, v in result.items() if not isinstance(v, list | dict)},
            },
        )
        logger.info("stage %s: %s in %.1fs", stage, "cache hit" if cached else "ran", seconds)
        return out_hashes

    # 1. prune
    pruned_dir = run_dir / "pruned"
    key = stage_key("prune", cfg.prune, cfg.taskworld, teacher_sha, code)
    res, cached, secs = _run_stage(
        prune_task,
        [pruned_dir],
        teacher_dir=str(teacher_dir),
        world=cfg.taskworld,
        cfg=cfg.prune,
        out_dir=str(pruned_dir),
        cache_key=key,
    )
    pruned_sha = record("prune", key, cfg.prune, {"teacher": teacher_sha}, {"pruned": pruned_dir}, res, cached, secs)[
        "pruned"
    ]

    # 2. generate
    data_dir, logits_dir = run_dir / "data", run_dir / "logits"
    key = stage_key(
        "generate", config_hash(cfg.generate, exclude=GENERATE_RUNTIME_FIELDS), cfg.taskworld, teacher_sha, code
    )
    res, cached, secs = _run_stage(
        generate_task,
        [data_dir / "train.jsonl", logits_dir / "ids.npy"],
        teacher_dir=str(teacher_dir),
        world=cfg.taskworld,
        cfg=cfg.generate,
        run_dir=str(run_dir),
        cache_key=key,
    )
    gen_hashes = record(
        "generate",
        key,
        cfg.generate,
        {"teacher": teacher_sha},
        {"data": data_dir, "logits": logits_dir},
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
        key = stage_key(f"distill-{name}", cfg.distill, use_logits, pruned_sha, data_sha, code)
        res, cached, secs = _run_stage(
            distill_task,
            [out / "config.json"],
            student_dir=str(pruned_dir),
            data_dir=str(data_dir),
            logits_dir=str(logits_dir),
            cfg=cfg.distill,
            out_dir=str(out),
            use_teacher_logits=use_logits,
            cache_key=key,
        )
        model_shas[name] = record(
            f"distill_{name}",
            key,
            cfg.distill,
            {"pruned": pruned_sha, "data": data_sha},
            {name: out},
            res,
            cached,
            secs,
        )[name]
        model_dirs[name] = out

    # 4. evaluate every model on the held-out split
    _, heldout = make_splits(cfg.taskworld.tasks, cfg.taskworld.n_train, cfg.taskworld.n_heldout, cfg.taskworld.seed)
    tasks_dir = write_task(heldout, run_dir / "eval" / "tasks", cfg.evaluate.max_gen_toks).parent
    heldout_sha = sha256_path(tasks_dir / "heldout.jsonl")
    models: dict[str, dict[str, Any]] = {}
    for name, mdir in model_dirs.items():
        msha = model_shas[name]
        key = stage_key(f"evaluate-{name}", cfg.evaluate, heldout_sha, msha, code)
        res, cached, secs = _run_stage(
            evaluate_task,
            [],
            model_dir=str(mdir),
            tasks_dir=str(tasks_dir),
            cfg=cfg.evaluate,
            label=name,
            cache_key=key,
        )
        record(f"evaluate_{name}", key, cfg.evaluate, {"model": msha, "heldout": heldout_sha}, {}, res, cached, secs)
        models[name] = {
            "params": checkpoint_params(mdir),
            "score": res["score"],
            "stderr": res["stderr"],
            "n": res["n"],
            "path": str(mdir),
        }
    write_json(run_dir / "eval" / "results.json", models)

    summary = build_summary(METRIC, models, stages)
    write_json(run_dir / "summary.json", summary)
    plot_scores(summary, run_dir / "plots" / "scores.png")
    report = markdown_report(summary, run_dir)
    (run_dir / "report.md").write_text(report)
    create_markdown_artifact(markdown=report, key="compress-report", description=f"run {cfg.name}")
    create_table_artifact(table=results_rows(summary), key="compress-results", description=f"run {cfg.name}")
    return PipelineResult(run_dir=str(run_dir), summary=summary)
