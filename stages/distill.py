"""The distill stage: the student trained by white-box KD against the teacher, and an SFT baseline.

Two runs from the same pruned student and the same data: ``distill_student`` (KD + CE against the
teacher's cached top-k log-probs, or the teacher in process with ``distill.teacher_source: online``)
and, with ``distill.sft_baseline``, ``distill_sft`` (CE only). Each writes a plain checkpoint, a loss
log and a loss plot; a crash (or a retry) resumes from the last checkpoint (``compress.distill``).
"""

from __future__ import annotations

from typing import Any

from compress.config import PipelineConfig
from compress.jobs import Checkpoint, DistillJob
from stages.pipeline import Context, StageSpec
from stages.runner import Done, Stage


def declare(cfg: PipelineConfig, ctx: Context, done: dict[str, Done]) -> list[Stage]:
    pruned, gen = done["prune"], done["generate"]
    student_dir, student_sha = pruned.output("pruned")
    data_sha = _join(gen.hashes.get("data"), gen.hashes.get("logits"))
    online = cfg.distill.teacher_source == "online"
    stages = []
    for name, kd in {"student": True, **({"sft": False} if cfg.distill.sft_baseline else {})}.items():
        out_dir = ctx.run_dir / name
        job = DistillJob(
            student=Checkpoint(path=student_dir, identity=student_sha, trust_remote_code=ctx.teacher.trust_remote_code),
            data_dir=gen.paths["data"].parent,
            logits_dir=gen.paths["logits"],
            data_sha=data_sha,
            distill=cfg.distill,
            kd=kd,
            teacher=ctx.teacher if kd and online else None,
            # The hidden-state loss pairs each student layer with the teacher layer it came from.
            teacher_layers=pruned.result.get("kept_layers"),
            device=ctx.device,
            out_dir=out_dir,
            log_path=ctx.run_dir / "logs" / f"train-{name}.jsonl",
        )
        inputs = {"pruned": student_sha, "data": data_sha}
        stages.append(Stage(name=f"distill_{name}", job=job, body=distill, inputs=inputs, outputs={name: out_dir}))
    return stages


def distill(job: DistillJob) -> dict[str, Any]:
    """Train the pruned student: KD against the teacher + CE, or CE only (SFT baseline).

    A crash (or a retry) resumes from the last checkpoint of the same job (``distill.save_steps``).
    """
    from compress.distill.recipe import distill_student
    from evaluation.plots import plot_losses
    from stages.prefect_task import log, progress

    label = "kd" if job.kd else "sft"
    metrics = distill_student(job, progress(f"distill-{label}", f"distill ({label})"))
    if metrics.get("resumed_from_step"):
        log("distill (%s) resumed from step %d", label, metrics["resumed_from_step"])
    name = job.out_dir.name
    plot = job.out_dir.parent / "plots" / f"loss-{name}.png"
    plot_losses({name: job.log_path}, plot)
    return {"path": str(job.out_dir), "loss_log": str(job.log_path), "loss_plot": str(plot), **metrics}


def _join(*hashes: str | None) -> str | None:
    """Several hashes as one; unknown (None) when any is unknown (``plan``, before a run)."""
    return None if any(h is None for h in hashes) else "".join(hashes)  # type: ignore[arg-type]


STAGE = StageSpec(
    name="distill",
    summary="the pruned student trained by KD against the teacher, and an SFT baseline on the same data",
    declare=declare,
)
