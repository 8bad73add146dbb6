"""``compress_pipeline``: prepare -> prune -> generate (vLLM) -> distill (KD + SFT baseline) -> evaluate (lm-eval).

Run it from Python (``compress_pipeline(config)`` with a ``PipelineConfig``, a dict or a YAML
path; also as a subflow), from the CLI (``distillflow run CONFIG``), from ``distillflow serve``, or
as a deployment of ``prefect.yaml``: its one parameter is the ``PipelineConfig`` model, which the
dashboard renders as a form and validates with the same pydantic model. It needs no Prefect server
(ephemeral mode) and works against a real one.

Each stage is declared once, in ``stages/<name>.py`` (``stages.pipeline``); ``stages.runner.StageRunner``
caches them by content in the run directory, so a run from any Prefect home that shares ``runs/`` hits the same
cache. The run directory ``runs/<name>/`` holds the checkpoints, data, logits, evaluation results,
``manifest.json`` (lineage), ``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, tags
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import BaseModel

from compress.config import PipelineConfig, TeacherConfig, load_yaml, validate
from compress.lineage import code_version, package_versions, read_json, source_hash, write_json
from compress.models import resolve_device
from compress.rundir import RunDirLock
from flows.publish import publish
from stages.pipeline import Context, run_pipeline
from stages.preflight import context, preflight
from stages.runner import Provenance, StageRunner

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _dashboard_default() -> PipelineConfig:
    """The dashboard form's defaults: the embedded demo, ``configs/tiny.yaml``.

    Everything but the teacher is validated here; the teacher is left unvalidated so that importing
    this module does not require its directory to exist (a worker validates the whole config at run
    time).
    """
    raw = load_yaml(DEMO_CONFIG)
    fields = {name: f.get_default(call_default_factory=True) for name, f in TeacherConfig.model_fields.items()}
    teacher = TeacherConfig.model_construct(**(fields | raw.pop("teacher")))
    return validate(PipelineConfig, raw | {"teacher": teacher}, str(DEMO_CONFIG))


DEFAULT_CONFIG = _dashboard_default()


class PipelineResult(BaseModel):
    """What ``compress_pipeline`` returns: where the run lives and its headline figures."""

    run_dir: str
    summary: dict[str, Any]


# log_prints stays off: the libraries' own prints (Trainer's metric dicts, lm-eval's tables) would
# each become an API log record; the stages log what matters through the run logger.
@flow(name="compress-pipeline", flow_run_name="{config.name}")
def compress_pipeline(config: PipelineConfig = DEFAULT_CONFIG) -> PipelineResult:
    """Compress the teacher of ``config`` and benchmark teacher, pruned, SFT baseline and KD student."""
    cfg = PipelineConfig.model_validate(config.model_dump())  # validated even when it is the default
    _tag_flow_run(cfg.tags)
    restore = _cancel_on_sigterm()
    try:
        with tags(*cfg.tags), RunDirLock(cfg.run_dir):
            ctx, runner = _setup(cfg)
            done = run_pipeline(cfg, ctx, runner)
            return _publish(cfg, ctx, runner, done)
    finally:
        restore()


@flow(name="prune", flow_run_name="{config.name}-prune")
def prune_flow(config: PipelineConfig = DEFAULT_CONFIG) -> PipelineResult:
    """Only prepare and prune: the student checkpoint, importance scores, report and plot, in the run dir."""
    cfg = PipelineConfig.model_validate(config.model_dump())
    _tag_flow_run(cfg.tags)
    with tags(*cfg.tags), RunDirLock(cfg.run_dir):
        ctx, runner = _setup(cfg)
        done = run_pipeline(cfg, ctx, runner, until="prune")
    return PipelineResult(run_dir=str(ctx.run_dir), summary={"prune": done["prune"].result, "stages": runner.stages})


def _cancel_on_sigterm() -> Callable[[], None]:
    """Record a run that is being cancelled as Cancelled, not Crashed, when the runner's SIGTERM lands.

    Cancelling a deployment run makes its runner send SIGTERM to the flow-run process, which Prefect
    turns into a TerminationSignal and proposes Crashed; whether the runner's Cancelled comes first
    is a race (and Prefect forces its Crashed). Here the run's own process settles it: if the API
    says CANCELLING, it sets Cancelled and exits at once. The vLLM server's handler
    (compress/serving) runs before this one and stops the server's process group.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.context import get_run_context
    from prefect.states import Cancelled

    run_id = get_run_context().flow_run.id
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        cancelled = False
        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if state is not None and state.type == StateType.CANCELLING:
                client.set_flow_run_state(run_id, Cancelled(message="cancelled while running"), force=True)
                cancelled = True
        if cancelled:
            # Prefect's own handler would now force a Crashed state over the Cancelled one. The
            # vLLM server's handler ran before this one; training dies with the process.
            with contextlib.suppress(Exception):
                from prefect.logging.handlers import APILogHandler

                APILogHandler.flush()
            os._exit(0)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _tag_flow_run(names: list[str]) -> None:
    """Put the config's tags on this flow run too (``tags()`` covers only the task runs it opens)."""
    if not names:
        return
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    run = get_run_context().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted({*run.tags, *names}))


def _setup(cfg: PipelineConfig) -> tuple[Context, StageRunner]:
    """Check everything (one-line errors before any stage), then prepare the run directory."""
    logger = get_run_logger()
    pf = preflight(cfg, full=True)
    for w in pf.warnings:
        logger.warning(w)
    device = resolve_device(cfg.device)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ctx = context(cfg, pf, run_dir / "eval" / "tasks", device)
    # The teacher's source beside the stages' records (which name it by its identity only): its
    # directory, and its hub id @ commit or the GGUF file and sha256 it was converted from.
    manifest = read_json(run_dir / "manifest.json", default={"stages": {}})
    write_json(
        run_dir / "manifest.json", manifest | {"teacher": pf.teacher.lineage() | {"identity": ctx.teacher.identity}}
    )
    provenance = Provenance(source_hash(), device, code_version(), package_versions())
    runner = StageRunner(run_dir, provenance, cfg.force, cfg.concurrency_limit)
    return ctx, runner


def _publish(cfg: PipelineConfig, ctx: Context, runner: StageRunner, done: dict) -> PipelineResult:
    """Summary, report, plot and the Prefect artifacts, plus one that says where everything is."""
    evaluated = {k.removeprefix("evaluate_"): d.result for k, d in done.items() if k.startswith("evaluate_")}
    links = "\n".join(f"- {name}: `{res['path']}`" for name, res in evaluated.items())
    create_markdown_artifact(
        markdown=f"# Run `{cfg.name}`\n\nRun directory: `{ctx.run_dir}`\n\nCheckpoints:\n{links}\n",
        key="compress-summary",
        description=f"run {cfg.name}: where everything is",
    )
    summary = publish(cfg.name, ctx.run_dir, evaluated, runner.stages, data=done["prepare"].result)
    return PipelineResult(run_dir=str(ctx.run_dir), summary=summary)
