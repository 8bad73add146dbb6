"""The one mechanism that turns a declared stage into a cached, recorded Prefect task run.

A stage run is declared once (``Stage``): its name, its typed job (``compress.jobs``), the plain
function that does the work (the task body), its lineage inputs and its output paths. The stage
modules (``stages/<name>.py``) declare them; ``StageRunner`` then does the bookkeeping for every
stage alike:

- derives the cache key: sha256 over the stage name, the job's key (``Job.key``: every field that
  can change the outputs, ``compress.cachekey``) and the library source;
- decides hit or miss from the run directory alone: the manifest records this key and every output
  is still there with the sha256 it had when it was recorded. Prefect's own cache records live in
  the Prefect home and point at result storage there, so a worker with another home (or another
  machine sharing the runs directory) could not see them; the run directory is what both share;
- on a hit, calls the task in replay mode, so the dashboard and the API show a task run in state
  ``Cached`` with the recorded result, and no work is done;
- ``force`` re-runs a stage and every stage after it;
- records the manifest entry (the job, its hash, inputs, output hashes, code and package versions,
  device, timing, peak memory (``stages.memory``), status) and takes a slot of a Prefect global
  concurrency limit for heavy stages when ``concurrency_limit`` is set.

Nothing here knows what a stage does: a new stage is a module ``stages/<name>.py`` and its name in
``compress.config.STAGES`` (see ``stages.pipeline``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress import config
from compress.jobs import Job
from compress.lineage import (
    files_digest,
    hash_cache_file,
    list_files_cached,
    read_json,
    record_stage,
    sha256_path_cached,
)
from stages.memory import PeakRSS, maxrss_mb


@dataclass
class Stage:
    """One stage run, declared once by its stage module."""

    name: str  # manifest name, e.g. "distill_student"; its family (its module) is the part before "_"
    job: Job  # everything the body needs; its key decides the outputs
    body: Callable[[Any], dict[str, Any]]  # the work: body(job) -> a small dict of paths and metrics
    inputs: dict[str, str | None] = field(default_factory=dict)  # lineage: input name -> content hash
    outputs: dict[str, Path] = field(default_factory=dict)  # output name -> path in the run dir
    heavy: bool = True  # takes a slot of the global concurrency limit when one is set

    @property
    def family(self) -> str:
        return self.name.split("_", 1)[0]


@dataclass
class Done:
    """What a stage left behind: its result, its outputs (paths, sha256), whether it was a hit, how long it took."""

    result: dict[str, Any]
    hashes: dict[str, str]
    cached: bool
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)  # the stage's declared outputs

    def output(self, name: str) -> tuple[Path, str | None]:
        """An output for a downstream stage: its path (declared once, by this stage) and its sha256
        (None while unknown: ``plan``, before the stage has run)."""
        return self.paths[name], self.hashes.get(name)


def stage_key(stage: str, job_key: str, code: str) -> str:
    """Cache key: sha256 over the stage name, its job's key and the code hash."""
    h = hashlib.sha256(stage.encode())
    for p in (job_key, code):
        h.update(b"\0" + p.encode())
    return f"distillflow-{stage}-{h.hexdigest()[:32]}"


@dataclass(frozen=True)
class Provenance:
    """How a run's outputs are made, recorded with every stage: code, packages, device."""

    code: str  # sha256 of the library source: part of every cache key
    device: str
    code_version: str = ""  # git commit (and "-dirty"), for the record
    packages: dict[str, str] = field(default_factory=dict)


class StageRunner:
    """Runs declared stages in one run directory (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        provenance: Provenance,
        force: list[str] | None = None,
        concurrency_limit: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.provenance = provenance
        self.force_from = min((config.STAGES.index(f) for f in force or []), default=len(config.STAGES))
        self.concurrency_limit = concurrency_limit
        self.hash_cache = hash_cache_file(self.run_dir.parent)
        self.stages: dict[str, dict[str, Any]] = {}

    def key(self, stage: Stage) -> str:
        return stage_key(stage.name, stage.job.key(), self.provenance.code)

    def recorded_hit(self, stage: Stage, key: str) -> dict[str, Any] | None:
        """The manifest record of a hit: same key, every output present with its recorded sha256."""
        if config.STAGES.index(stage.family) >= self.force_from:
            return None
        rec = (read_json(self.run_dir / "manifest.json", default={}) or {}).get("stages", {}).get(stage.name)
        if not rec or rec.get("cache_key") != key or "result" not in rec:
            return None
        recorded = rec.get("outputs", {})
        for name, path in stage.outputs.items():
            if not path.exists() or recorded.get(name) != self._hash(path):
                self._name_damage(stage.name, rec.get("files", {}).get(name))
                return None
        return rec

    def _name_damage(self, stage: str, files: list[dict] | None) -> None:
        """Say which recorded output files are missing or changed (the stage then runs again, rebuilding them)."""
        from prefect.logging import get_run_logger

        from compress.integrity import check_files

        problems = check_files(self.run_dir, files) if files else []
        if problems:
            get_run_logger().warning(
                "stage %s: its recorded outputs changed, so it runs again: %s", stage, "; ".join(problems[:5])
            )

    def _hash(self, path: Path) -> str:
        return sha256_path_cached(path, self.hash_cache)

    def _relative(self, path: Path, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An output's file list with paths relative to the run directory (what ``distillflow verify`` checks)."""
        base = path if path.is_dir() else path.parent
        # relpath, not relative_to: an output outside the run directory is listed as ../... (still checkable).
        prefix = Path(os.path.relpath(base.resolve(), self.run_dir.resolve())).as_posix()
        return [f | {"path": f"{prefix}/{f['path']}" if prefix != "." else f["path"]} for f in listed]

    def __call__(self, stage: Stage) -> Done:
        from prefect.logging import get_run_logger

        from stages.prefect_task import stage_task

        key = self.key(stage)
        hit = self.recorded_hit(stage, key)
        t0 = time.time()
        with PeakRSS() as rss, self._slot(stage, hit is None):
            task = stage_task(stage.body).with_options(task_run_name=stage.name)
            state = task(stage.job, replay=hit["result"] if hit else None, return_state=True)
        result = state.result()
        seconds = round(time.time() - t0, 2)
        # One listing per output (read from the stat-keyed cache or hashed once): its digest and its files.
        listed = {name: list_files_cached(p, self.hash_cache) for name, p in stage.outputs.items()}
        hashes = {name: files_digest(files) for name, files in listed.items()}
        files = {name: self._relative(stage.outputs[name], f) for name, f in listed.items()}
        cached = hit is not None
        ran = hit.get("ran_seconds", hit.get("seconds")) if hit else seconds
        # Like ran_seconds: a cache hit keeps the peak of the run that made its outputs.
        ran_rss = hit.get("ran_peak_rss_mb", hit.get("peak_rss_mb")) if hit else rss.peak_mb
        record_stage(
            self.run_dir,
            stage.name,
            {
                "status": "cached" if cached else "completed",
                "cache_key": key,
                "job": stage.job.model_dump(mode="json"),
                "config_hash": stage.job.key(),  # the job's key (DESIGN.md: "config hash")
                "inputs": stage.inputs,
                "outputs": hashes,
                "files": files,
                "code_hash": self.provenance.code,
                "code_version": self.provenance.code_version,
                "packages": self.provenance.packages,
                "device": self.provenance.device,
                "seconds": seconds,
                # The original run time survives cache hits, for the stage table.
                "ran_seconds": ran,
                "peak_rss_mb": rss.peak_mb,
                "ran_peak_rss_mb": ran_rss,
                "maxrss_mb": maxrss_mb(),
                "result": result,
            },
        )
        self.stages[stage.name] = {
            "cached": cached,
            "seconds": seconds,
            "ran_seconds": ran,
            "peak_rss_mb": rss.peak_mb,
            "ran_peak_rss_mb": ran_rss,
        }
        get_run_logger().info(
            "stage %s: %s in %.1fs, peak RSS %.0f MiB",
            stage.name,
            "cache hit" if cached else "ran",
            seconds,
            rss.peak_mb,
        )
        return Done(result, hashes, cached, seconds, stage.outputs)

    def _slot(self, stage: Stage, will_run: bool):
        """A slot of the global concurrency limit (``prefect gcl create NAME --limit N``) for heavy work."""
        if not (self.concurrency_limit and stage.heavy and will_run):
            return contextlib.nullcontext()
        from prefect.concurrency.sync import concurrency

        return concurrency(self.concurrency_limit, occupy=1, strict=True)


class PlanRunner(StageRunner):
    """Predicts each stage's cache status from the run directory, running nothing.

    A stage whose key depends on an output that does not exist yet (its upstream will run) is
    predicted to run as well.
    """

    def __init__(self, run_dir: Path, provenance: Provenance, force: list[str] | None = None):
        super().__init__(run_dir, provenance, force)
        self.status: list[tuple[str, str]] = []

    def _name_damage(self, stage: str, files: list[dict] | None) -> None:
        """``plan`` shows the stage as "will run"; the run itself names what changed (and plan imports no Prefect)."""

    def __call__(self, stage: Stage) -> Done:
        known = all(h is not None for h in stage.inputs.values())
        rec = self.recorded_hit(stage, self.key(stage)) if known else None
        self.status.append((stage.name, "cache hit" if rec else "will run"))
        if rec is None:
            return Done({}, {name: None for name in stage.outputs}, False, 0.0, stage.outputs)  # type: ignore[misc]
        return Done(rec["result"], rec["outputs"], True, 0.0, stage.outputs)
