"""The prune stage: the teacher pruned in depth and/or width by importance on the calibration texts.

Writes the student checkpoint ``pruned/`` (a plain Hugging Face checkpoint), ``importance.json``,
``prune.json``, ``prune.md`` and ``plots/importance.png`` (``compress.prune.prune``). With
``student.path`` the user's own student is adopted in its place (copied as it is, ``compress.student``).
Pre-flight: the student's shape and parameter count from the teacher's ``config.json`` alone, or the
given student's vocabulary and chat template against the teacher's.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from compress.config import ConfigError, PipelineConfig, first_line
from compress.jobs import AdoptJob, PruneJob
from stages.pipeline import Context, StageSpec
from stages.runner import Done, Stage

if TYPE_CHECKING:
    from stages.preflight import Preflight


def declare(cfg: PipelineConfig, ctx: Context, done: dict[str, Done]) -> list[Stage]:
    out_dir = ctx.run_dir / "pruned"
    if ctx.student is not None:
        job = AdoptJob(student=ctx.student, teacher=ctx.teacher, out_dir=out_dir)
        inputs = {"student": ctx.student.identity, "teacher": ctx.teacher.identity}
        return [Stage(name="prune", job=job, body=adopt, inputs=inputs, outputs={"pruned": out_dir}, heavy=False)]
    calibration, calibration_sha = done["prepare"].output("calibration")
    job = PruneJob(
        teacher=ctx.teacher,
        calibration=calibration,
        calibration_sha=calibration_sha,
        prune=cfg.prune,
        dtype=cfg.teacher.dtype,
        device=ctx.device,
        out_dir=out_dir,
    )
    inputs = {"teacher": ctx.teacher.identity, "calibration": calibration_sha}
    return [Stage(name="prune", job=job, body=prune, inputs=inputs, outputs={"pruned": out_dir})]


def prune(job: PruneJob) -> dict[str, Any]:
    """Prune the teacher (depth, width or both) by importance on the calibration texts."""
    from prefect.artifacts import create_markdown_artifact

    from compress.prune.prune import prune_model
    from stages.prefect_task import log, progress

    record = prune_model(job, log, progress("prune", "prune"))
    work = job.out_dir.parent
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
    return {"path": str(job.out_dir), **record}


def adopt(job: AdoptJob) -> dict[str, Any]:
    """A student of the user's own in place of pruning: copied into the run directory as it is."""
    from compress.student import adopt_student
    from stages.prefect_task import log

    record = adopt_student(job)
    log(
        "student %s: %s parameters (%.1f%% of the teacher), no pruning",
        job.student.path, f"{record['params_after']:,}", 100 * record["ratio"],
    )  # fmt: skip
    return {"path": str(job.out_dir), **record}


def check(cfg: PipelineConfig, pf: Preflight) -> None:
    """``pf.student``: the pruned student's shape and size, or the given student's (checked against the teacher)."""
    if cfg.student is not None:
        check_student(cfg, pf)
        return
    from compress.prune.families import UnsupportedArchitecture
    from compress.prune.plan import plan_shape

    try:
        pf.student = plan_shape(pf.teacher.path, cfg.prune, cfg.teacher.trust_remote_code)
    except UnsupportedArchitecture as e:
        raise ConfigError(f"teacher.path: {e}") from None
    except ValueError as e:
        msg = first_line(e)
        raise ConfigError(msg if msg.startswith("prune") else f"prune: {msg}") from None


def check_student(cfg: PipelineConfig, pf: Preflight) -> None:
    """A student of the user's own: found, a decoder, and sharing the teacher's vocabulary and chat template."""
    from transformers import AutoConfig

    from compress.hub import check_safetensors_only, checkpoint_layout, read_model_config, resolve_model, text_config
    from compress.models import load_tokenizer
    from compress.prune.shape import shape_of
    from compress.student import StudentMismatch, check_compatible

    assert cfg.student is not None
    resolved = resolve_model(cfg.student, download=pf.full)
    config = read_model_config(resolved.path)
    check_safetensors_only(resolved.path, "student.path")
    if "num_hidden_layers" not in text_config(config):
        raise ConfigError(f"student.path: '{cfg.student.path}' config.json has no num_hidden_layers (not a decoder)")
    try:
        teacher_tok = load_tokenizer(pf.teacher.path, cfg.teacher.trust_remote_code)
        student_tok = load_tokenizer(resolved.path, cfg.student.trust_remote_code)
    except Exception as e:
        raise ConfigError(f"student.path: cannot load the tokenizers to compare: {first_line(e)}") from None
    try:
        check_compatible(teacher_tok, student_tok)
    except StudentMismatch as e:
        raise ConfigError(str(e)) from None
    layout = checkpoint_layout(resolved.path, config)
    # The prune stage's shape record (as adopt_student writes it), from the student's own config.
    shape = shape_of(AutoConfig.from_pretrained(str(resolved.path), trust_remote_code=cfg.student.trust_remote_code))
    pf.student_model = resolved
    pf.student = {"student": shape.as_dict(), "params_after": layout["params"], "given": str(resolved.path)}


STAGE = StageSpec(
    name="prune",
    summary="the student: the teacher pruned by importance (depth, width), or a given student checkpoint",
    declare=declare,
    check=check,
)
