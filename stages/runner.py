"""The one mechanism that turns a declared stage into a cached, recorded Prefect task run.

A stage is declared once (``Stage``): its name, its Prefect task and arguments, the content that
decides its outputs (configs, input hashes), its lineage inputs and its output paths. ``StageRunner``
then does the bookkeeping for every stage alike:

- derives the cache key: sha256 over the stage name, its key content and the library source;
- decides hit or miss from the run directory alone: the manifest records this key and every output
  is still there with the sha256 it had when it was recorded. Prefect's own cache records live in
  the Prefect home and point at result storage there, so a worker with another home (or another
  machine sharing the runs directory) could not see them; the run directory is what both share;
- on a hit, calls the task in replay mode, so the dashboard and the API show a task run in state
  ``Cached`` with the recorded result, and no work is done;
- ``force`` re-runs a stage and every stage after it;
- records the manifest entry (config hash, inputs, output hashes, code and package versions,
  device, timing, peak memory, status) and takes a slot of a Prefect global concurrency limit for
  heavy stages when ``concurrency_limit`` is set.

Peak memory (``peak_rss_mb``, MiB) is sampled: a background thread sums the resident set of this
process and every descendant the stage starts (torchrun ranks, the vLLM server and its engine)
while the stage runs (``PeakRSS``). ``getrusage``'s ``ru_maxrss`` is recorded beside it (``maxrss_mb``) but cannot
stand for the stage: it is the process's lifetime peak, which never goes down ("peak so far"), and
``RUSAGE_CHILDREN`` covers only children already waited for, as the largest single one.

Nothing here knows what a stage does: a new stage is one ``Stage(...)`` in the flow.
"""

from __future__ import annotations

import contextlib
import hashlib
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

from compress.config import config_hash
from compress.lineage import hash_cache_file, read_json, record_stage, sha256_path_cached

# Stage families in pipeline order: forcing one re-runs it and every family after it.
ORDER = ("prepare", "prune", "generate", "distill", "evaluate")


@dataclass
class Stage:
    """A pipeline stage, declared once."""

    name: str  # manifest name, e.g. "distill_student"; its family is the part before "_"
    task: str  # name of the Prefect task around the library function (stages.prefect_tasks.TASKS)
    params: dict[str, Any]  # the task's arguments (paths as strings, configs)
    key: list[Any]  # content that decides the outputs: configs, input hashes, settings
    inputs: dict[str, str] = field(default_factory=dict)  # lineage: input name -> content hash
    outputs: dict[str, Path] = field(default_factory=dict)  # output name -> path in the run dir
    config: BaseModel | None = None  # recorded as the stage's config hash
    heavy: bool = True  # takes a slot of the global concurrency limit when one is set

    @property
    def family(self) -> str:
        return self.name.split("_", 1)[0]


@dataclass
class Done:
    """What a stage left behind: its result, its outputs' sha256, whether it was a hit, how long it took."""

    result: dict[str, Any]
    hashes: dict[str, str]
    cached: bool
    seconds: float


MIB = 2**20


def tree_rss(proc: psutil.Process, skip: frozenset[psutil.Process] = frozenset()) -> int:
    """Resident bytes of ``proc`` and all its descendants but those in ``skip`` and theirs (pages
    shared between processes count in each)."""
    total, todo = 0, [proc]
    while todo:
        p = todo.pop()
        # A process that exited between listing and reading counts for nothing.
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
            todo += [c for c in p.children() if c not in skip]
    return total


def maxrss_mb() -> dict[str, float]:
    """``getrusage`` peaks in MiB: this process's lifetime peak and the largest reaped child's."""
    # ru_maxrss is KiB on Linux, bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    return {
        who: round(resource.getrusage(flag).ru_maxrss * unit / MIB, 1)
        for who, flag in (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))
    }


class PeakRSS:
    """Peak resident memory (MiB) of this process tree while the ``with`` block runs.

    A daemon thread samples ``tree_rss`` every ``interval_s`` (and once at entry and exit), so a
    spike shorter than the interval can be missed; memory that a stage holds (weights, optimizer
    state, a server) is not. Children already running at entry (the ephemeral Prefect API server
    a flow starts, say) are not the block's and are left out; children it starts (torchrun ranks,
    a vLLM server) count. psutil sums RSS, so pages shared between processes count once per
    process: an upper bound for forked workers.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.2):
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._before: frozenset[psutil.Process] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / MIB, 1)

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.proc, self._before))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRSS:
        # psutil.Process compares by pid and start time: a reused pid is not mistaken for an old child.
        with contextlib.suppress(psutil.Error):
            self._before = frozenset(self.proc.children())
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def stage_key(stage: str, parts: list[Any], code: str) -> str:
    """Cache key: sha256 over the stage name, each key part (config hash or text) and the code hash."""
    h = hashlib.sha256(stage.encode())
    for p in (*parts, code):
        h.update(b"\0" + (config_hash(p) if isinstance(p, BaseModel) else str(p)).encode())
    return f"distillflow-{stage}-{h.hexdigest()[:32]}"


class StageRunner:
    """Runs declared stages in one run directory (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        code: str,
        code_version: str,
        packages: dict[str, str],
        device: str,
        force: list[str] | None = None,
        concurrency_limit: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.code, self.code_version, self.packages, self.device = code, code_version, packages, device
        self.force_from = min((ORDER.index(f) for f in force or []), default=len(ORDER))
        self.concurrency_limit = concurrency_limit
        self.hash_cache = hash_cache_file(self.run_dir.parent)
        self.stages: dict[str, dict[str, Any]] = {}

    def key(self, stage: Stage) -> str:
        return stage_key(stage.name, stage.key, self.code)

    def recorded_hit(self, stage: Stage, key: str) -> dict[str, Any] | None:
        """The manifest record of a hit: same key, every output present with its recorded sha256."""
        if ORDER.index(stage.family) >= self.force_from:
            return None
        rec = (read_json(self.run_dir / "manifest.json", default={}) or {}).get("stages", {}).get(stage.name)
        if not rec or rec.get("cache_key") != key or "result" not in rec:
            return None
        recorded = rec.get("outputs", {})
        for name, path in stage.outputs.items():
            if not path.exists() or recorded.get(name) != self._hash(path):
                return None
        return rec

    def _hash(self, path: Path) -> str:
        return sha256_path_cached(path, self.hash_cache)

    def __call__(self, stage: Stage) -> Done:
        from prefect.logging import get_run_logger

        from stages.prefect_tasks import TASKS

        key = self.key(stage)
        hit = self.recorded_hit(stage, key)
        t0 = time.time()
        with PeakRSS() as rss, self._slot(stage, hit is None):
            task = TASKS[stage.task].with_options(task_run_name=stage.name)
            state = task(**stage.params, replay=hit["result"] if hit else None, return_state=True)
        result = state.result()
        seconds = round(time.time() - t0, 2)
        hashes = {name: self._hash(p) for name, p in stage.outputs.items()}
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
                "config_hash": config_hash(stage.config) if stage.config is not None else None,
                "inputs": stage.inputs,
                "outputs": hashes,
                "code_hash": self.code,
                "code_version": self.code_version,
                "packages": self.packages,
                "device": self.device,
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
        return Done(result, hashes, cached, seconds)

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

    def __init__(self, run_dir: Path, code: str, device: str, force: list[str] | None = None):
        super().__init__(run_dir, code, "", {}, device, force)
        self.status: list[tuple[str, str]] = []

    def __call__(self, stage: Stage) -> Done:
        known = all(p is not None for p in stage.key)
        rec = self.recorded_hit(stage, self.key(stage)) if known else None
        self.status.append((stage.name, "cache hit" if rec else "will run"))
        if rec is None:
            return Done({}, {name: None for name in stage.outputs}, False, 0.0)  # type: ignore[misc]
        return Done(rec["result"], rec["outputs"], True, 0.0)
