"""Content hashing, atomic writes and the run manifest (lineage of every stage)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# Files that describe a checkpoint rather than being part of it; hashing skips them so that
# writing a manifest or a model card into a directory does not change the directory's hash.
SIDECAR_FILES = frozenset({"teacher_manifest.json", "README.md"})
TRACKED_PACKAGES = ("torch", "transformers", "prefect", "lm_eval", "peft", "accelerate", "tokenizers", "pydantic")


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes, as ``sha256sum`` prints it."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_files(path: Path, skip: frozenset[str] = SIDECAR_FILES) -> list[dict[str, Any]]:
    """``[{path, size, sha256}]`` of a file (its name), or of a directory's files (relative paths, sorted)."""
    path = Path(path)
    if path.is_file():
        return [{"path": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}]
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash '{path}': no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip)
    return [{"path": f.relative_to(path).as_posix(), "size": f.stat().st_size, "sha256": file_sha256(f)} for f in files]


def files_digest(files: list[dict[str, Any]]) -> str:
    """The digest of a file list: sha256 over its ``path\\0size\\0sha256`` lines, in path order.

    Every content hash here is this digest of the files' own sha256, so a manifest that lists the
    files (``compress.integrity``) proves its directory digests, and each file can be checked alone.
    """
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["path"]):
        h.update(f"{f['path']}\0{f['size']}\0{f['sha256']}\n".encode())
    return h.hexdigest()


def sha256_path(path: Path, skip: frozenset[str] = SIDECAR_FILES) -> str:
    """The content hash of a file or a directory: ``files_digest`` of its files."""
    return files_digest(list_files(path, skip))


HASH_CACHE = ".hashcache.json"


def hash_cache_file(runs_dir: Path) -> Path:
    """The stat-keyed sha256 cache shared by every run under ``runs_dir``."""
    return Path(runs_dir) / HASH_CACHE


def sha256_path_cached(path: Path, cache_file: Path) -> str:
    """``sha256_path`` of a file or directory, reused while no file's name, size or mtime changed."""
    return files_digest(list_files_cached(path, cache_file))


def list_files_cached(path: Path, cache_file: Path) -> list[dict[str, Any]]:
    """``list_files`` of a file or directory, reused while no file's name, size or mtime changed.

    The stat check is the one git and make rely on; it spares re-reading a multi-GB teacher on
    every run and every ``plan``.
    """
    path = Path(path).resolve()
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in SIDECAR_FILES)
    stats = [(f, f.stat()) for f in files]
    stamp = hashlib.sha256(
        "\n".join(
            f"{f.name if f == path else f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}" for f, st in stats
        ).encode()
    ).hexdigest()
    cache = read_json(cache_file, default={})
    hit = cache.get(str(path))
    if hit and hit.get("stamp") == stamp and "files" in hit:
        return hit["files"]
    listed = list_files(path)
    cache[str(path)] = {"stamp": stamp, "sha256": files_digest(listed), "files": listed}
    write_json(cache_file, cache)
    return listed


def source_hash(roots: tuple[str, ...] = ("compress", "evaluation", "stages")) -> str:
    """sha256 over the library source: the code part of every cache key."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in roots:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path, default: Any = None) -> Any:
    """Read JSON, or return ``default`` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a stage's output."""
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def code_version() -> str:
    """The distillflow version plus the git commit of the source tree when there is one."""
    try:
        version = metadata.version("distillflow")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def record_stage(run_dir: Path, stage: str, record: dict[str, Any]) -> Path:
    """Merge one stage's record into ``run_dir/manifest.json`` (atomic rewrite)."""
    path = Path(run_dir) / "manifest.json"
    manifest = read_json(path, default={"stages": {}})
    manifest.setdefault("stages", {})[stage] = record | {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return write_json(path, manifest)
