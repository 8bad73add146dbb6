"""The evaluate stage: teacher, pruned, KD student and SFT baseline through lm-eval, one run each.

Each model is one ``evaluate_<name>`` run keyed by the checkpoint's content, so an unchanged model
on unchanged tasks is a cache hit; ``evaluate.fidelity`` adds its KL and top-1 agreement with the
teacher (``evaluation.harness``). The evaluate-only flow declares its runs here too
(``evaluate_stage``). Pre-flight: every task is found and described, the headline and the gates name
evaluated models and tasks, and the vLLM virtualenv is there when evaluation serves the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.config import ConfigError, EvaluateConfig, PipelineConfig
from compress.data.prepare import HELDOUT_PROMPTS
from compress.jobs import Checkpoint, EvaluateJob, FidelityJob
from stages.pipeline import Context, StageSpec
from stages.runner import Done, Stage

if TYPE_CHECKING:
    from stages.preflight import Preflight


def declare(cfg: PipelineConfig, ctx: Context, done: dict[str, Done]) -> list[Stage]:
    remote = ctx.teacher.trust_remote_code
    models = {"teacher": ctx.teacher}
    for name, stage in {"pruned": "prune", "student": "distill_student", "sft": "distill_sft"}.items():
        if stage in done:  # distill_sft only with distill.sft_baseline
            path, sha = done[stage].output(name)
            models[name] = Checkpoint(path=path, identity=sha, trust_remote_code=remote)
    fidelity = None
    if cfg.evaluate.fidelity is not None:
        # Every model is scored along the teacher's greedy answers to the prompts a source held out.
        prompts = ctx.run_dir / "data" / HELDOUT_PROMPTS
        fidelity = FidelityJob(
            teacher=ctx.teacher,
            prompts=prompts,
            prompts_sha=done["prepare"].hashes.get("heldout"),
            cache_dir=ctx.run_dir / "eval" / "fidelity",
        )
    return [
        evaluate_stage(
            EvaluateJob(
                label=name,
                model=model,
                evaluate=cfg.evaluate,
                tasks_dir=ctx.tasks_dir,
                eval_id=ctx.eval_id,
                dtype=cfg.teacher.dtype,
                device=ctx.device,
                log_dir=ctx.run_dir / "logs",
                fidelity=fidelity,
            )
        )
        for name, model in models.items()
    ]


def evaluate_stage(job: EvaluateJob) -> Stage:
    """The run of one model's evaluation: the pipeline's and the evaluate-only flow's."""
    inputs = {"model": job.model.identity, "eval_sets": job.eval_id}
    if job.fidelity is not None:
        inputs["heldout"] = job.fidelity.prompts_sha
    return Stage(name=f"evaluate_{job.label}", job=job, body=evaluate, inputs=inputs)


def evaluate(job: EvaluateJob) -> dict[str, Any]:
    """lm-eval of one checkpoint on every configured task (in process or served by vLLM), and its
    fidelity to the teacher when ``evaluate.fidelity`` is set."""
    from evaluation.harness import evaluate_checkpoint
    from stages.prefect_task import log

    result = evaluate_checkpoint(job)
    for task_name, metrics in result["scores"].items():
        shown = ", ".join(f"{m} {v['value']:.4f}" for m, v in metrics.items())
        log("%s (%s): %s: %s", job.label, result["backend"], task_name, shown)
    if result["throughput"]:
        log("%s: vLLM serving throughput %.0f tokens/s", job.label, result["throughput"]["tokens_per_s"])
    return {"path": str(job.model.path), "label": job.label, **result}


def check(cfg: PipelineConfig, pf: Preflight) -> None:
    """``pf.tasks``: every task described; the headline, the gates and the serving venv checked."""
    from evaluation.tasks import check_tasks

    if cfg.evaluate.apply_chat_template and not pf.chat_template():
        raise ConfigError("evaluate.apply_chat_template: the teacher's tokenizer has no chat template")
    pf.tasks = check_tasks(cfg.evaluate, list(cfg.taskworld.tasks)) + check_fidelity(cfg)
    check_headline(cfg.evaluate, pf.tasks)
    check_evaluation(cfg.evaluate, pipeline_models(cfg), pf.tasks)


def pipeline_models(cfg: PipelineConfig) -> list[str]:
    """The names of the models a pipeline run evaluates (what gates may name)."""
    return ["teacher", "pruned", "student", *(["sft"] if cfg.distill.sft_baseline else [])]


def check_fidelity(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The fidelity measurement's description, or []; it needs a source that holds prompts out."""
    fid = cfg.evaluate.fidelity
    if fid is None:
        return []
    held = sum(getattr(s, "heldout", 0) or 0 for s in cfg.effective_data().sources)
    if not held:
        raise ConfigError(
            "evaluate.fidelity: no data source holds prompts out (give a self_instruct source a 'heldout' count)"
        )
    data = f"{min(fid.prompts, held)} held-out prompts, the teacher's greedy answers of {fid.max_new_tokens} tokens"
    return [{"task": "fidelity", "lm_eval": "fidelity", "data": data}]


def check_headline(evaluate: EvaluateConfig, tasks: list[dict[str, Any]]) -> None:
    """``evaluate.headline`` must name an evaluated task (its metric is checked once results exist)."""
    from evaluation.tasks import evaluated_names

    if not evaluate.headline:
        return
    task, sep, metric = evaluate.headline.partition("/")
    if not sep or not metric:
        raise ConfigError(f"evaluate.headline: '{evaluate.headline}' must be 'task/metric'")
    if task not in evaluated_names(tasks):
        raise ConfigError(f"evaluate.headline: task '{task}' is not in evaluate.tasks")


def check_evaluation(evaluate: EvaluateConfig, models: list[str], tasks: list[dict[str, Any]]) -> None:
    """Gates name evaluated models and tasks; the vLLM venv is there when evaluation serves models."""
    from compress.gates import GateError, check_gate_models, parse_gate
    from evaluation.tasks import evaluated_names

    try:
        check_gate_models(evaluate.gates, models)
    except GateError as e:
        raise ConfigError(str(e)) from None
    names = evaluated_names(tasks)
    for i, text in enumerate(evaluate.gates):
        for ref in parse_gate(text).refs():
            if ref.task is not None and ref.task not in names:
                raise ConfigError(f"evaluate.gates[{i}]: '{text}' names task '{ref.task}', not in evaluate.tasks")
            if ref.metric == "throughput" and ref.task is None and not evaluate.measures_throughput:
                raise ConfigError(
                    f"evaluate.gates[{i}]: '{text}' needs throughput: set evaluate.throughput or backend vllm"
                )
    if evaluate.uses_vllm and not Path(evaluate.vllm.vllm_python).is_file():
        why = "backend vllm" if evaluate.backend == "vllm" else "throughput"
        raise ConfigError(
            f"evaluate.vllm.vllm_python: '{evaluate.vllm.vllm_python}' not found ({why} serves each model with vLLM; "
            "create the venv with `make venvs`)"
        )


STAGE = StageSpec(
    name="evaluate",
    summary="teacher, pruned, KD student and SFT baseline on the same lm-eval tasks, and their fidelity",
    declare=declare,
    check=check,
)
