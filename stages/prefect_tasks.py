"""Thin Prefect tasks around the library's stage functions: retries, progress artifacts, replay.

Each task is declared with ``@stage_task``: it gains a keyword ``replay``. ``stages.runner.StageRunner``
passes the recorded result of a cache hit there, and the task then returns it as a ``Cached``
state without doing any work, so every stage shows up in the Prefect API and dashboard, hit or not.
Tasks return small dicts of paths and metrics, never models. Retries are for transient faults
only (a server that died, a reset connection); bad input fails at once.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger
from prefect.states import Completed

from compress.config import DistillConfig, EvaluateConfig, GenerateConfig, PipelineConfig, PruneConfig
from compress.data.prepare import prepare_data, uses_self_instruct
from compress.data.self_instruct import pre_query_template, self_instruct_sources, serving_config
from compress.distill.recipe import distill_student
from compress.generate.generate import generate_data, open_teacher
from compress.generate.teacher import GenerationError
from compress.hub import read_model_config
from compress.jsonl import read_jsonl
from compress.models import load_tokenizer
from compress.prune.prune import prune_model
from compress.serving.vllm_server import ServerError
from evaluation.harness import evaluate_checkpoint
from evaluation.plots import plot_losses
from evaluation.tasks import eval_texts

TRANSIENT = (ServerError, GenerationError, ConnectionError, TimeoutError)


def _retry_transient(task, task_run, state) -> bool:
    """Retry only faults that a second attempt can fix."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def _progress(key: str, description: str):
    """A progress callback that updates a Prefect progress artifact (0-100) and logs each step."""
    logger = get_run_logger()
    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    last = {"pct": -1.0}

    def report(fraction: float, message: str) -> None:
        pct = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if pct - last["pct"] >= 10 or pct == 100.0:
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
            last["pct"] = pct
        logger.info("%s: %s", description, message)

    return report


def stage_task(name: str) -> Callable:
    """``@task`` for a stage: retries on transient faults, and ``replay=<result>`` returns a Cached state."""

    def deco(fn: Callable) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, replay: dict | None = None, **kwargs: Any) -> Any:
            if replay is not None:
                return Completed(name="Cached", message="cache hit (recorded in the run directory)", data=replay)
            return fn(*args, **kwargs)

        # Prefect binds arguments by signature: show it the stage's parameters plus ``replay``.
        sig = inspect.signature(fn)
        extra = inspect.Parameter("replay", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="dict | None")
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
        # The cache is the run directory's (stages.runner), so Prefect keeps no results of its own.
        return task(
            name=name,
            retries=2,
            retry_delay_seconds=[5, 30],
            retry_condition_fn=_retry_transient,
            persist_result=False,
        )(wrapper)

    return deco


@stage_task("prepare")
def prepare_task(cfg: PipelineConfig, teacher_dir: str, tasks_dir: str, out_dir: str, device: str = "cpu") -> dict:
    """Training prompts and calibration texts: read (or draw from the teacher), render, mix, deduplicate,
    decontaminate. A self-instruct source serves the teacher as the generate stage does (``cfg.generate``)."""
    data = cfg.effective_data()
    tokenizer = load_tokenizer(Path(teacher_dir), cfg.teacher.trust_remote_code)
    texts = eval_texts(cfg.evaluate, Path(tasks_dir)) if data.decontaminate else []
    teacher = None
    if uses_self_instruct(data):
        log = Path(out_dir).parent / "logs" / "vllm-server-prepare.log"
        longest = max(len(pre_query_template(tokenizer, s.system_prompt).ids) for s in self_instruct_sources(data))
        teacher = functools.partial(
            open_teacher, serving_config(cfg.generate, longest), Path(teacher_dir), log,
            cfg.teacher.trust_remote_code, device, get_run_logger().info,
        )  # fmt: skip
    report = prepare_data(
        data,
        cfg.taskworld,
        tokenizer,
        texts,
        Path(out_dir),
        (cfg.prune.calibration_source, cfg.prune.calibration_samples),
        progress=_progress("prepare", "prepare"),
        max_prompt_tokens=cfg.generate.max_prompt_tokens(read_model_config(Path(teacher_dir))),
        teacher=teacher,
    )
    for si in report.get("self_instruct", []):
        get_run_logger().info(
            "self-instruct source %d: drew %d, kept %d (%.0f%%), dropped %s; %d training + %d held out (%s), %.1f s",
            si["index"], si["drawn"], si["kept"], 100 * si["keep_rate"],
            {k: v for k, v in si["dropped"].items() if v}, si["train"], si["heldout"],
            Path(out_dir) / report["heldout_path"], si["seconds"],
        )  # fmt: skip
    get_run_logger().info(
        "%d training prompts; dropped %d longer than %d tokens, %d duplicates and %d that appear in an evaluation "
        "set (%d eval prompts checked)",
        report["prompts"],
        report["too_long_dropped"],
        report["max_prompt_tokens"],
        report["duplicates_dropped"],
        report["eval_overlap_dropped"],
        report["eval_prompts_checked"],
    )
    return report


@stage_task("prune")
def prune_task(
    teacher_dir: str,
    calibration: str,
    cfg: PruneConfig,
    out_dir: str,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    teacher_id: str | None = None,
) -> dict:
    """Prune the teacher (depth, width or both) by importance on the calibration texts."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    rows = read_jsonl(Path(calibration))
    record = prune_model(
        Path(teacher_dir),
        [r["text"] for r in rows],
        cfg,
        Path(out_dir),
        device,
        dtype,
        trust_remote_code,
        teacher_id,
        logger.info,
        [r.get("completion_start", 0) for r in rows],
        _progress("prune", "prune"),
    )
    work = Path(out_dir).parent
    png = work / "plots" / "importance.png"
    create_markdown_artifact(
        key="prune-importance",
        description="Pruning: importance per layer and head, parameters and calibration loss",
        markdown=(work / "prune.md").read_text() + f"\nrun directory: `{work}`",
    )
    # The plot inline (a data URI), so the dashboard shows it without access to the run directory.
    create_markdown_artifact(
        key="prune-importance-plot",
        description=f"Pruning: importance plot ({png})",
        markdown=f"![importance](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})",
    )
    return {"path": out_dir, **record}


@stage_task("adopt")
def adopt_task(student_dir: str, teacher_dir: str, out_dir: str) -> dict:
    """A student of the user's own in place of pruning: copied into the run directory as it is."""
    from compress.models import checkpoint_params
    from compress.student import adopt_student

    record = adopt_student(Path(student_dir), checkpoint_params(Path(teacher_dir)), Path(out_dir))
    get_run_logger().info(
        "student %s: %s parameters (%.1f%% of the teacher), no pruning",
        student_dir, f"{record['params_after']:,}", 100 * record["ratio"],
    )  # fmt: skip
    return {"path": out_dir, **record}


@stage_task("generate")
def generate_task(
    teacher_dir: str,
    prompts: str,
    cfg: GenerateConfig,
    run_dir: str,
    trust_remote_code: bool,
    need_logits: bool = True,
    device: str = "cpu",
    teacher_id: str = "",
) -> dict:
    """Every training prompt through the teacher (vLLM, an endpoint, or transformers), in resumable shards."""
    from prefect.artifacts import create_table_artifact

    logger = get_run_logger()
    stats = generate_data(
        Path(teacher_dir),
        read_jsonl(Path(prompts)),
        cfg,
        Path(run_dir),
        need_logits,
        trust_remote_code,
        device,
        _progress("generate", "generate"),
        teacher_id,
        logger.info,
    )
    logger.info(
        "generated %d rows, %d tokens at %.0f tokens/s (%d of %d shards resumed, %d server restarts)",
        stats["rows"], stats["tokens"], stats["tokens_per_s"] or 0, stats["shards_resumed"], stats["shards"],
        stats["server_restarts"],
    )  # fmt: skip
    if cfg.mode == "self_distill":
        logger.info("self-distillation: %d of %d rewrites accepted", stats["rewrites_accepted"], stats["rows"])
    create_table_artifact(
        key="generate-stats",
        table=[{"what": k, "value": json.dumps(v) if isinstance(v, dict) else v} for k, v in stats.items()],
        description="Generate stage: rows, tokens, speed, resume, self-distillation acceptance, cache size",
    )
    return {"data": str(Path(run_dir) / "data"), "logits": str(Path(run_dir) / "logits"), **stats}


@stage_task("distill")
def distill_task(
    student_dir: str,
    data_dir: str,
    logits_dir: str,
    cfg: DistillConfig,
    out_dir: str,
    use_teacher_logits: bool,
    device: str,
    teacher_dir: str | None = None,
    trust_remote_code: bool = False,
    teacher_layers: list[int] | None = None,
) -> dict:
    """Train the pruned student: KD against the teacher + CE, or CE only (SFT baseline).

    A crash (or a retry) resumes from the last checkpoint of the same job (``distill.save_steps``).
    """
    label = "kd" if use_teacher_logits else "sft"
    logger = get_run_logger()
    loss_log = Path(out_dir).parent / "logs" / f"train-{Path(out_dir).name}.jsonl"
    metrics = distill_student(
        Path(student_dir),
        Path(data_dir),
        Path(logits_dir),
        cfg,
        Path(out_dir),
        use_teacher_logits=use_teacher_logits,
        progress=_progress(f"distill-{label}", f"distill ({label})"),
        device=device,
        log_path=loss_log,
        teacher_dir=Path(teacher_dir) if teacher_dir else None,
        trust_remote_code=trust_remote_code,
        teacher_layers=teacher_layers,
    )
    if metrics.get("resumed_from_step"):
        logger.info("distill (%s) resumed from step %d", label, metrics["resumed_from_step"])
    plot = Path(out_dir).parent / "plots" / f"loss-{Path(out_dir).name}.png"
    plot_losses({Path(out_dir).name: loss_log}, plot)
    return {"path": out_dir, "loss_log": str(loss_log), "loss_plot": str(plot), **metrics}


@stage_task("evaluate")
def evaluate_task(
    model_dir: str,
    tasks_dir: str,
    cfg: EvaluateConfig,
    label: str,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    log_dir: str,
    fidelity: dict | None = None,
) -> dict:
    """lm-eval of one checkpoint on every configured task (in process or served by vLLM), and its
    fidelity to the teacher when ``evaluate.fidelity`` is set."""
    logger = get_run_logger()
    result = evaluate_checkpoint(
        Path(model_dir), cfg, Path(tasks_dir), device, dtype, trust_remote_code, label=label, log_dir=Path(log_dir)
    )
    if fidelity is not None and cfg.fidelity is not None:
        from evaluation.fidelity import evaluate_fidelity

        fid = evaluate_fidelity(
            Path(fidelity["teacher_dir"]),
            fidelity["teacher_id"],
            Path(model_dir),
            Path(fidelity["prompts"]),
            cfg.fidelity.prompts,
            cfg.fidelity.max_new_tokens,
            Path(fidelity["cache_dir"]),
            device,
        )
        result["scores"] |= fid["scores"]
        result["n"] |= fid["n"]
    for task_name, metrics in result["scores"].items():
        shown = ", ".join(f"{m} {v['value']:.4f}" for m, v in metrics.items())
        logger.info("%s (%s): %s: %s", label, result["backend"], task_name, shown)
    if result["throughput"]:
        logger.info("%s: vLLM serving throughput %.0f tokens/s", label, result["throughput"]["tokens_per_s"])
    return {"path": model_dir, "label": label, **result}


TASKS = {
    "prepare": prepare_task,
    "prune": prune_task,
    "adopt": adopt_task,
    "generate": generate_task,
    "distill": distill_task,
    "evaluate": evaluate_task,
}
