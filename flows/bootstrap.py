"""``bootstrap_teacher_flow``: train the tiny teacher of the embedded default, cached by content hash.

The cache key is the hash of the bootstrap config plus the library source; a teacher directory
whose ``teacher_manifest.json`` carries the same config hash is reused as it is.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger

from compress.bootstrap import bootstrap_teacher, read_manifest, teacher_hash
from compress.config import BootstrapConfig


@task(name="train-teacher", retries=0)
def train_teacher_task(cfg: BootstrapConfig, command: str | None = None) -> dict:
    """Train the teacher (no retry: a failure here is deterministic)."""
    logger = get_run_logger()
    return bootstrap_teacher(cfg, progress=lambda f, msg: logger.info("teacher: %s", msg), command=command)


@flow(name="bootstrap-teacher", log_prints=True)
def bootstrap_teacher_flow(config: BootstrapConfig = BootstrapConfig(), command: str | None = None) -> dict:
    """Return the teacher's manifest, training it first unless an identical one exists.

    ``command`` is recorded in the manifest as the way to reproduce the teacher."""
    manifest = read_manifest(Path(config.out_dir))
    if manifest and manifest.get("config_hash") == teacher_hash(config):
        get_run_logger().info("teacher at %s is up to date (config hash matches): cache hit", config.out_dir)
        return manifest | {"cached": True}
    return train_teacher_task(config, command) | {"cached": False}
