"""The Prefect side of a stage: its task (retries, replay of a cache hit), progress and log.

``stage_task(body)`` makes the Prefect task around a stage's body (``body(job) -> dict``): named after
the body, retried on transient faults only (a server that died, a reset connection; bad input fails
at once), and with a keyword ``replay``: ``stages.runner.StageRunner`` passes the recorded result of
a cache hit there, and the task then returns it as a ``Cached`` state without doing any work, so every
stage shows up in the Prefect API and dashboard, hit or not. The job is the task's one parameter, so
the dashboard shows exactly what the stage ran on.

The stage modules import this module inside their bodies only: declaring stages (``plan``) never
imports Prefect.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger
from prefect.states import Completed

from compress.generate.teacher import GenerationError
from compress.serving.vllm_server import ServerError

# Faults a second attempt can fix: a server that died or did not answer in time, a dropped
# connection. Everything else recurs (a refused model, a bad config, a missing file) and fails at once.
TRANSIENT = (ServerError, GenerationError, ConnectionError, TimeoutError)


def _retry_transient(task, task_run, state) -> bool:
    """Retry only faults that a second attempt can fix (``TRANSIENT``)."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def progress(key: str, description: str) -> Callable[[float, str], None]:
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


def log(message: str, *args: Any) -> None:
    """Log to the running task's logger (shown in the dashboard)."""
    get_run_logger().info(message, *args)


@functools.cache
def stage_task(body: Callable[[Any], dict[str, Any]]) -> Any:
    """The Prefect task around ``body(job)``: transient-fault retries, and ``replay=<result>`` for a hit."""

    def run(job: Any, replay: dict | None = None) -> Any:
        if replay is not None:
            return Completed(name="Cached", message="cache hit (recorded in the run directory)", data=replay)
        return body(job)

    # Not functools.wraps: Prefect reads the parameters from the signature, which must keep ``replay``.
    run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
    run.__module__ = body.__module__

    # The cache is the run directory's (stages.runner), so Prefect keeps no results of its own.
    return task(
        name=body.__name__,
        retries=2,
        retry_delay_seconds=[5, 30],
        retry_condition_fn=_retry_transient,
        persist_result=False,
    )(run)
