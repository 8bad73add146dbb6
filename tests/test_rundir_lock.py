"""One run at a time in a run directory: a second process is refused, naming the holder; a dead one's lock is taken."""

import os
import subprocess
import sys
import time

import pytest

from compress.rundir import LOCK_FILE, RunDirLock, RunDirLocked

HOLD = (
    "import sys, time; from compress.rundir import RunDirLock\n"
    "with RunDirLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"
)


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    proc = _holder(run_dir)
    try:
        held = rf"another run is writing this run directory \(pid {proc.pid}, started "
        with pytest.raises(RunDirLocked, match=held), RunDirLock(run_dir):
            pass
    finally:
        proc.kill()
        proc.wait()
    # The holder died without cleaning up: its lock went with it.
    with RunDirLock(run_dir):
        assert (run_dir / LOCK_FILE).read_text().startswith(f'{{"pid": {os.getpid()}')


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_end(tmp_path):
    run_dir = tmp_path / "demo"
    with RunDirLock(run_dir), RunDirLock(run_dir):
        pass
    proc = _holder(run_dir)  # another process can take it now
    proc.kill()
    proc.wait()


def test_a_cli_run_on_a_locked_directory_is_one_line(tmp_path):
    from tests.conftest import ROOT

    runs = tmp_path / "runs"
    proc = _holder(runs / "demo")
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "configs/tiny.yaml", "--set", f"runs_dir={runs}"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
            env=os.environ | {"PREFECT_HOME": str(tmp_path / "ph")},
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines[-1].startswith("error: ") and f"pid {proc.pid}" in lines[-1], lines
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 300
