"""The pipeline: the stages named in ``compress.config.STAGES``, each declared by its module ``stages/<name>.py``.

A stage module holds everything about its stage, in one place:

- ``STAGE = StageSpec(...)``: its name, a one-line summary (CLI help, ``plan``), and the two functions below;
- ``declare(cfg, ctx, done) -> list[Stage]``: builds its typed job(s) (``compress.jobs``) from the config,
  the run's context and the upstream stages' results (``done``), with lineage inputs and output paths;
- ``check(cfg, pf)``: its pre-flight check, run by ``stages.preflight`` before any stage (one-line
  ``ConfigError`` naming the field);
- the body: a plain function ``body(job) -> dict`` that calls the library and reports; the runner
  makes it a Prefect task (``stages.prefect_task``).

``run_pipeline`` walks the stages in order and hands each declared run to a runner: ``StageRunner``
runs it through Prefect, ``PlanRunner`` only predicts whether it would be a cache hit. Both see the
same declarations, so ``distillflow plan`` and the flow can never disagree on a cache key. Nothing
here imports Prefect (``plan`` stays fast). Adding a stage is one module plus its name in ``STAGES``
(``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress import config
from compress.config import PipelineConfig
from compress.jobs import Checkpoint
from stages.runner import Done, Stage


@dataclass
class Context:
    """What every stage needs besides the config: where things are and what the inputs are."""

    run_dir: Path
    teacher: Checkpoint  # its identity: hub id @ commit, gguf:<sha256>, or the sha256 of its directory
    eval_id: str  # identity of the evaluation sets (task names, held-out split, task YAMLs)
    tasks_dir: Path  # the task world's lm-eval task, when evaluated
    device: str
    model_config: dict[str, Any] = field(default_factory=dict)  # the teacher's config.json (sizes the context)
    student: Checkpoint | None = None  # a student of the user's own (student.path): no pruning


Declare = Callable[[PipelineConfig, Context, dict[str, Done]], list[Stage]]


@dataclass(frozen=True)
class StageSpec:
    """A stage, declared once in its module ``stages/<name>.py`` (see the module docstring)."""

    name: str
    summary: str  # one line: what it makes
    declare: Declare
    check: Callable[[PipelineConfig, Any], None] | None = None  # (cfg, stages.preflight.Preflight)


def stage_specs() -> list[StageSpec]:
    """Every stage in pipeline order: ``stages.<name>.STAGE`` for each name in ``compress.config.STAGES``."""
    specs = []
    for name in config.STAGES:
        spec = importlib.import_module(f"stages.{name}").STAGE
        if spec.name != name:
            raise RuntimeError(f"stages/{name}.py declares a stage named '{spec.name}'")
        specs.append(spec)
    return specs


def run_pipeline(cfg: PipelineConfig, ctx: Context, run, until: str | None = None) -> dict[str, Done]:
    """Declare and run every stage in order (up to and including ``until``); ``run(stage) -> Done``."""
    done: dict[str, Done] = {}
    for spec in stage_specs():
        for stage in spec.declare(cfg, ctx, done):
            done[stage.name] = run(stage)
        if spec.name == until:
            break
    return done
