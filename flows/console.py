"""What a CLI run prints when something fails: one line in the terminal, the traceback in the run's log.

Prefect's engine logs every failed task and flow run with its traceback (``exc_info``) through the
console handler it installs on the root logger. For a gate not met, a refused input or a cancelled
run, that is 40 lines of noise under a one-line answer; for a real fault it buries the cause. So a
CLI run adds, once Prefect has set up its logging:

- a file handler on the ``prefect`` logger that writes the whole run log, tracebacks included, to
  ``<run dir>/logs/run.log``;
- a filter on the console handlers that drops the traceback from a record (the message stays).

The file handler runs first (it sits on ``prefect``, the console handler on the root logger), so the
file keeps what the terminal leaves out. ``DISTILLFLOW_DEBUG=1`` keeps tracebacks in the terminal.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

RUN_LOG = Path("logs") / "run.log"


class _NoTraceback(logging.Filter):
    """Let the record through without its traceback (it was written to the run log already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def route_tracebacks(run_dir: Path) -> Path:
    """Send the whole run log to ``run_dir/logs/run.log``, keep tracebacks out of the terminal; return the path."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    path = Path(run_dir) / RUN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, PrefectConsoleHandler) for h in root.handlers):
        setup_logging()  # Prefect configures its logging lazily; the handlers must exist to be filtered
    prefect_logger = logging.getLogger("prefect")
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in prefect_logger.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        prefect_logger.addHandler(handler)
    if not os.environ.get("DISTILLFLOW_DEBUG"):
        for h in root.handlers:
            if isinstance(h, PrefectConsoleHandler) and not any(isinstance(f, _NoTraceback) for f in h.filters):
                h.addFilter(_NoTraceback())
    return path
