"""One run at a time in a run directory: an advisory lock held while a flow writes there.

Two runs writing the same ``runs/<name>/`` would interleave shards, checkpoints and the manifest.
The lock is ``fcntl.flock`` on ``<run dir>/.lock``: the kernel drops it when its holder dies, so a
lock left by a killed run is taken over with nothing to clean up. The file says who holds it (pid
and start time), for the one-line refusal. It is re-entrant within a process (a flow and its
subflows, or a test calling several flows on one directory). POSIX only, like the rest of the
process handling here.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from compress.errors import ConfigError

LOCK_FILE = ".lock"


class RunDirLocked(ConfigError):
    """Another live process holds the run directory."""


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the run directory (created if need be) or raises ``RunDirLocked``."""

    _held: ClassVar[dict[Path, tuple[int, int]]] = {}  # path -> (fd, depth): this process's locks

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).resolve() / LOCK_FILE

    def __enter__(self) -> RunDirLock:
        if self.path in self._held:
            fd, depth = self._held[self.path]
            self._held[self.path] = (fd, depth + 1)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(
                f"{self.path.parent}: another run is writing this run directory ({holder}); "
                "wait for it to finish, or give this run another name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._held[self.path] = (fd, 1)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        fd, depth = self._held[self.path]
        if depth > 1:
            self._held[self.path] = (fd, depth - 1)
            return
        del self._held[self.path]
        os.close(fd)  # closing the descriptor releases the lock; the file stays (removing it would race)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
