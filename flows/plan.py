"""``distillflow plan``: what a run would do, checked and predicted, running nothing.

``describe`` prints the checked config (``stages.preflight``): the teacher, the student's size, the
data, the evaluation, and per stage whether an earlier run in the same directory makes it a cache
hit. ``cache_status`` hands the flow's own stage declarations (``stages.pipeline``) to a runner that
runs nothing and compares each stage's key and outputs with the run directory's manifest.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from compress.config import PipelineConfig
from compress.hub import text_config
from compress.lineage import source_hash
from stages.evaluate import pipeline_models
from stages.preflight import Preflight, context, planned_device


def cache_status(cfg: PipelineConfig, pf: Preflight) -> list[tuple[str, str]]:
    """(stage, "cache hit" | "will run") per stage, predicted from the run directory.

    The same stage declarations as the flow's (``stages.pipeline``), handed to a runner that only
    compares keys and output hashes with ``manifest.json``.
    """
    from stages.pipeline import run_pipeline
    from stages.runner import PlanRunner, Provenance

    device = planned_device(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = context(cfg, pf, Path(tmp), device)
    ctx.tasks_dir = ctx.run_dir / "eval" / "tasks"
    runner = PlanRunner(ctx.run_dir, Provenance(source_hash(), device), cfg.force)
    run_pipeline(cfg, ctx, runner)
    return runner.status


def generate_line(cfg: PipelineConfig, model_config: dict[str, Any]) -> str:
    """How the teacher answers: where, how long, where it stops, and which prompts are dropped as too long."""
    gen = cfg.generate
    ctx = gen.context_length(model_config)
    sized = "" if gen.max_model_len is not None else " (sized from the teacher)"
    stop = f"stop {gen.stop}" if gen.stop else "stops at the teacher's EOS / end of turn"
    where = "endpoint " + gen.endpoint.url if gen.endpoint else gen.backend
    return (
        f"generate  {where}, context {ctx} tokens{sized}, answers up to {gen.max_tokens} tokens, {stop}; "
        f"prompts over {gen.max_prompt_tokens(model_config)} tokens are dropped (counted in the run's data report)"
    )


def describe(cfg: PipelineConfig, source: str, pf: Preflight) -> str:
    """The plan as text: config, teacher, data, evaluation, student size, device and stages."""
    tc = text_config(pf.model_config)
    arch = ",".join(pf.model_config.get("architectures") or [tc.get("model_type", "?")])
    where = f"hub {pf.teacher.hub_id}@{pf.teacher.commit[:12]}" if pf.teacher.hub_id else "local"
    if pf.teacher.gguf_file is not None:
        where = f"gguf {pf.teacher.gguf_file.name}, sha256 {pf.teacher.gguf_sha256[:12]}... -> {pf.teacher.path}"
    exact = "" if pf.layout["exact"] else " (estimated from config.json)"
    st, shape = pf.student, pf.student["student"]
    how = (
        f"given checkpoint {cfg.student.path} (no pruning)"
        if cfg.student is not None
        else f"{cfg.prune.method} pruning ({cfg.prune.selection}) to"
    )
    lines = [
        f"config    {source}: valid",
        f"teacher   {cfg.teacher.path} ({where}): {arch}, {tc['num_hidden_layers']} layers, "
        f"hidden {tc['hidden_size']}, {pf.layout['params']:,} params{exact}",
        f"student   {how} {shape['num_layers']} layers, hidden "
        f"{shape['hidden_size']}, FFN {shape['intermediate_size']}, heads {shape['num_attention_heads']}/"
        f"{shape['num_key_value_heads']} KV: {st['params_after']:,} params ({st['ratio']:.1%} of the teacher)",
        f"device    {cfg.device} ({planned_device(cfg)})",
        generate_line(cfg, pf.model_config),
        "data",
        *(f"  {line}" for line in pf.data),
        f"evaluate  backend {cfg.evaluate.backend}"
        + (", vLLM serving throughput" if cfg.evaluate.measures_throughput else "")
        + f"; models {', '.join(pipeline_models(cfg))}",
        *(
            f"  {t['task']}" + (f" -> {t['lm_eval']}" if t["lm_eval"] != t["task"] else "") + f": {t['data']}"
            for t in pf.tasks
        ),
        *(f"  gate: {g}" for g in cfg.evaluate.gates),
        f"stages    (run directory {cfg.run_dir})",
        *(f"  {stage:<20}{status}" for stage, status in cache_status(cfg, pf)),
    ]
    lines += [f"warning   {w}" for w in pf.warnings]
    return "\n".join(lines)
