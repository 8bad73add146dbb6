"""JSON-lines files: the format of every prompt, data and evaluation file a run writes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    """Write rows as JSON lines (atomically: a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file into a list of dicts."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
