"""The generate stage: every training prompt through the teacher, with its top-k log-probs for KD.

The teacher is served by vLLM (a server of ours from its own virtualenv, or ``generate.endpoint``) or
run by transformers; answers are completions or, with ``generate.mode: self_distill``, the teacher's
rewrites of the training answers. Writes ``data/train.jsonl`` and ``logits/`` in resumable shards
(``compress.generate``). Pre-flight: the endpoint's key variable, or the vLLM virtualenv.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.config import ConfigError, PipelineConfig
from compress.jobs import GenerateJob
from stages.pipeline import Context, StageSpec
from stages.runner import Done, Stage

if TYPE_CHECKING:
    from stages.preflight import Preflight


def declare(cfg: PipelineConfig, ctx: Context, done: dict[str, Done]) -> list[Stage]:
    prompts, prompts_sha = done["prepare"].output("prompts")
    # Log-probs cost the server half its speed: ask for them only when a student reads the cache.
    need_logits = cfg.distill.teacher_source == "cached"
    job = GenerateJob(
        generate=cfg.generate,
        need_logits=need_logits,
        teacher=ctx.teacher,
        prompts=prompts,
        prompts_sha=prompts_sha,
        device=ctx.device,
        run_dir=ctx.run_dir,
    )
    outputs = {"data": ctx.run_dir / "data" / "train.jsonl", "logits": ctx.run_dir / "logits"}
    inputs = {"teacher": ctx.teacher.identity, "prompts": prompts_sha}
    return [Stage(name="generate", job=job, body=generate, inputs=inputs, outputs=outputs)]


def generate(job: GenerateJob) -> dict[str, Any]:
    """Every training prompt through the teacher (vLLM, an endpoint, or transformers), in resumable shards."""
    from prefect.artifacts import create_table_artifact

    from compress.generate.generate import generate_data
    from stages.prefect_task import log, progress

    stats = generate_data(job, progress("generate", "generate"), log)
    log(
        "generated %d rows, %d tokens at %.0f tokens/s (%d of %d shards resumed, %d server restarts)",
        stats["rows"], stats["tokens"], stats["tokens_per_s"] or 0, stats["shards_resumed"], stats["shards"],
        stats["server_restarts"],
    )  # fmt: skip
    if job.generate.mode == "self_distill":
        log("self-distillation: %d of %d rewrites accepted", stats["rewrites_accepted"], stats["rows"])
    create_table_artifact(
        key="generate-stats",
        table=[{"what": k, "value": json.dumps(v) if isinstance(v, dict) else v} for k, v in stats.items()],
        description="Generate stage: rows, tokens, speed, resume, self-distillation acceptance, cache size",
    )
    return {"data": str(job.run_dir / "data"), "logits": str(job.run_dir / "logits"), **stats}


def check(cfg: PipelineConfig, pf: Preflight) -> None:
    """The generate stage's outside needs: the endpoint's key variable, or the vLLM virtualenv."""
    from compress.generate.generate import endpoint_key

    gen = cfg.generate
    try:
        endpoint_key(gen)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if gen.backend == "vllm" and gen.endpoint is None and not Path(gen.vllm_python).is_file():
        raise ConfigError(
            f"generate.vllm_python: '{gen.vllm_python}' not found (create the vLLM venv with `make venvs`, "
            "or set generate.backend: hf)"
        )


STAGE = StageSpec(
    name="generate",
    summary="the teacher's answers to every training prompt (served by vLLM) and its top-k log-probs",
    declare=declare,
    check=check,
)
