"""Every output file of a run, listed with its size and sha256, and checked against that list.

A stage's record in ``manifest.json`` lists its output files (``files``: path relative to the run
directory, size, sha256), so a corrupted or truncated file is named, and anyone can check one with
``sha256sum``. A directory's digest (the ``outputs`` hashes that decide cache hits) is derived
from that list (``compress.lineage.files_digest``).

``verify_run`` re-reads every listed file of a finished run (``distillflow verify RUN_DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.lineage import file_sha256, read_json


def check_files(root: Path, files: list[dict[str, Any]]) -> list[str]:
    """What differs between the files under ``root`` and their list: one line per missing, resized or changed file."""
    problems = []
    for f in files:
        p = Path(root) / f["path"]
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != f["size"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, recorded {f['size']} (truncated or rewritten)")
        elif file_sha256(p) != f["sha256"]:
            problems.append(f"{p}: sha256 differs from the recorded {f['sha256'][:12]}...")
    return problems


def verify_run(run_dir: Path) -> tuple[int, list[str]]:
    """(files checked, problems) for every output file the run's manifest lists."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "manifest.json", default=None)
    if manifest is None:
        return 0, [f"{run_dir / 'manifest.json'}: not found (not a run directory, or no stage has finished)"]
    checked, problems = 0, []
    for stage, rec in sorted((manifest.get("stages") or {}).items()):
        listed = rec.get("files")
        if listed is None:
            problems.append(f"stage {stage}: recorded without a file list (made by an older distillflow)")
            continue
        for files in listed.values():
            checked += len(files)
            problems += [f"stage {stage}: {p}" for p in check_files(run_dir, files)]
    return checked, problems
