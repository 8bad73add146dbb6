"""Peak resident memory of a stage's process tree (``PeakRSS``), and ``getrusage``'s peaks beside it.

Peak memory (``peak_rss_mb``, MiB) is sampled: a background thread sums the resident set of this
process and every descendant the stage starts (torchrun ranks, the vLLM server and its engine)
while the stage runs. ``getrusage``'s ``ru_maxrss`` is recorded beside it (``maxrss_mb``) but cannot
stand for the stage: it is the process's lifetime peak, which never goes down ("peak so far"), and
``RUSAGE_CHILDREN`` covers only children already waited for, as the largest single one.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading

import psutil

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
