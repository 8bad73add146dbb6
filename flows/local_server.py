"""The Prefect API a CLI run talks to when no ``PREFECT_API_URL`` is set: a private, low-priority server.

Prefect would start the same server itself (``SubprocessASGIServer``: uvicorn on
``prefect.server.api.server:create_app`` in ephemeral mode) on first use, but only after importing
its server package, and it takes about 5 s to come up on two cores. Started here instead, as a plain
subprocess before anything heavy is imported, it boots while preflight and the imports run. Two more
reasons not to use Prefect's helper: its output goes to our stderr (a bad config's one-line error
would share it; here it goes to ``server.log`` in the Prefect home), and importing Prefect's server
models from a second thread raced in pydantic. The process runs at a lower CPU priority
(``nice 10``): its bookkeeping waits a little while training and generation keep the cores.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from compress.serving.vllm_server import free_port

NICE = 10


def _child_setup() -> None:
    """In the server's process before it starts: lower priority, and die with the CLI process.

    The server has its own session (a Ctrl-C in the terminal goes to the CLI, which stops it), so a
    CLI killed outright (SIGTERM or SIGKILL, when ``atexit`` never runs) would leave it running:
    Linux's parent-death signal ends it then.
    """
    os.nice(NICE)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1  # the name in <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalPrefectServer:
    """Start with ``start()`` (returns at once), ``wait_ready()`` before the first flow, ``stop()`` at exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path: Path | None = None

    def start(self) -> LocalPrefectServer:
        import importlib.util

        home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "server.log"
        port = free_port()
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None, "prefect is not installed"
        app_dir = Path(spec.origin).parent.parent
        env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        cmd = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_child_setup, start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)
        self.url = f"http://127.0.0.1:{port}/api"
        # Every Prefect client of this process (and of its children) talks to this server.
        os.environ["PREFECT_API_URL"] = self.url
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until ``/health`` answers; a server that exits or never answers is an error with its log."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Prefect API server exited (code {self.proc.returncode}); see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the Prefect API server did not answer within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_local_server() -> LocalPrefectServer | None:
    """A started ``LocalPrefectServer``; None when the user set ``PREFECT_API_URL``, or when Prefect is
    already imported in this process (its settings are read: it keeps the server it has)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    return LocalPrefectServer().start()
