"""Peak RSS per stage: the sampler sees a child process's memory (torchrun ranks and vLLM servers are
children), and StageRunner records ``peak_rss_mb`` in the manifest and in its stage table."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from stages.memory import MIB, PeakRSS, maxrss_mb, tree_rss

ALLOC_MIB = 160
# A child that touches every page of ALLOC_MIB (b"\x01" * n writes them all; a zeroed bytearray
# would stay unresident), says so, then holds them until stdin closes.
CHILD = f"import sys; b = b'\\x01' * ({ALLOC_MIB} << 20); print('ready', flush=True); sys.stdin.read()"


def _hold_memory() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_peak_rss_counts_a_child_process():
    import psutil

    me = psutil.Process()
    # Children already running (a Prefect server an earlier test started) are not the block's.
    earlier = frozenset(me.children())
    before = tree_rss(me, earlier)
    with PeakRSS(interval_s=0.05) as rss:
        proc = _hold_memory()
        try:
            assert tree_rss(me, earlier) - before > 0.9 * ALLOC_MIB * MIB  # the child's pages, seen from the parent
            time.sleep(0.3)  # the sampling thread's turn (every 0.05 s)
        finally:
            proc.communicate("")
    # The child has exited: the tree is back down, the peak is not.
    assert tree_rss(me, earlier) - before < 0.5 * ALLOC_MIB * MIB
    assert rss.peak_mb * MIB - before > 0.9 * ALLOC_MIB * MIB
    assert not rss._thread.is_alive()


def test_a_child_running_before_the_block_is_not_the_blocks():
    """The ephemeral Prefect server a flow starts is a child of the flow process, not of any stage."""
    import psutil

    proc = _hold_memory()
    try:
        with PeakRSS(interval_s=0.05) as rss:
            pass
        assert rss.peak_mb * MIB < tree_rss(psutil.Process()) - 0.9 * ALLOC_MIB * MIB
    finally:
        proc.communicate("")


def test_peak_rss_of_a_quiet_block_is_the_process_itself():
    import psutil

    with PeakRSS() as rss:
        pass
    own = psutil.Process().memory_info().rss / MIB
    assert 0.5 * own < rss.peak_mb < 2 * own + ALLOC_MIB


def test_getrusage_peaks_are_lifetime_figures():
    """ru_maxrss never goes down: after a child of ALLOC_MIB has been reaped, RUSAGE_CHILDREN keeps it."""
    proc = _hold_memory()
    proc.communicate("")
    peaks = maxrss_mb()
    assert peaks["children"] >= 0.9 * ALLOC_MIB and peaks["self"] > 0


@pytest.mark.slow
def test_stage_runner_records_peak_rss(tmp_path, prefect_home):
    """A real stage through StageRunner in a flow: the manifest entry and the runner's stage table
    carry the peak of the stage's process tree; a cache hit keeps the peak of the run that ran."""
    from prefect import flow

    from compress.jobs import Job
    from compress.lineage import read_json
    from stages.runner import Provenance, Stage, StageRunner

    class AllocJob(Job):
        out: str

    def alloc(job: AllocJob) -> dict:
        proc = _hold_memory()
        proc.communicate("")
        (tmp_path / job.out).write_text("done")
        return {"ok": True}

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = {"x": tmp_path / "done.txt"}
    stage = Stage(name="prune", job=AllocJob(out="done.txt"), body=alloc, outputs=out)

    @flow
    def two_runs() -> tuple[dict, dict]:
        first = StageRunner(run_dir, Provenance("code", "cpu"))
        first(stage)
        again = StageRunner(run_dir, Provenance("code", "cpu"))
        again(stage)
        return first.stages["prune"], again.stages["prune"]

    ran, hit = two_runs()
    assert not ran["cached"] and ran["peak_rss_mb"] > ALLOC_MIB and ran["ran_peak_rss_mb"] == ran["peak_rss_mb"]
    assert hit["cached"] and hit["ran_peak_rss_mb"] == ran["peak_rss_mb"]
    record = read_json(run_dir / "manifest.json")["stages"]["prune"]
    assert record["peak_rss_mb"] == hit["peak_rss_mb"] and record["ran_peak_rss_mb"] == ran["peak_rss_mb"]
    assert set(record["maxrss_mb"]) == {"self", "children"}
