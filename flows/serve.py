"""``distillflow serve``: every deployment of ``prefect.yaml`` served from this one process.

The deployments (names, entrypoints, parameters, schedules) are read from ``prefect.yaml``, the
one place they are declared, and handed to ``prefect.serve``: a dashboard or API run of any of
them executes here, in this checkout. Work pools are not needed for this; they are for the team
path (``prefect deploy`` + ``prefect worker start``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def deployments(prefect_yaml: Path = ROOT / "prefect.yaml") -> list[Any]:
    """``RunnerDeployment`` objects for every deployment of ``prefect_yaml``."""
    from prefect.schedules import Cron

    spec = yaml.safe_load(prefect_yaml.read_text())
    out = []
    for d in spec["deployments"]:
        path, name = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        schedules = [Cron(s["cron"], timezone=s.get("timezone")) for s in d.get("schedules") or [] if "cron" in s]
        out.append(
            flow.to_deployment(
                name=d["name"],
                description=d.get("description"),
                parameters=d.get("parameters") or {},
                schedules=schedules or None,
                tags=d.get("tags"),
            )
        )
    return out


def serve() -> None:
    """Serve every deployment until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments())
