"""The CLI's private Prefect server goes with the CLI process, even when that process is killed outright."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT

START = (
    "from flows.local_server import start_local_server\n"
    "s = start_local_server(); s.wait_ready(); print(s.proc.pid, flush=True)\n"
    "import time; time.sleep(300)\n"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkill_of_the_cli_takes_its_prefect_server_with_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    cli = subprocess.Popen([sys.executable, "-c", START], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    server = int(cli.stdout.readline())
    assert _alive(server)
    cli.send_signal(signal.SIGKILL)  # no atexit, no handler: only the parent-death signal is left
    cli.wait()
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server), f"the Prefect server {server} outlived its CLI"
