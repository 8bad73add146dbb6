"""Adding a stage is one module (its declaration, check and body) plus its name in ``STAGES``.

A trivial stage, ``stamp``, is written here as a module would be and put between prepare and prune;
nothing else changes. The flow runs it in order, records it, caches it, and ``plan`` and the
pre-flight check see it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Annotated, Any

import pytest

from compress import config
from compress.config import PipelineConfig, validate
from compress.jobs import WHERE, Job
from compress.lineage import read_json
from stages.pipeline import Context, StageSpec, stage_specs
from stages.runner import Done, Stage
from tests.conftest import ROOT


class StampJob(Job):
    prompts_sha: str | None
    out: Annotated[Path, WHERE]


def stamp(job: StampJob) -> dict[str, Any]:
    """Write the training prompts' sha256 to a file."""
    job.out.write_text(f"{job.prompts_sha}\n")
    return {"stamped": job.prompts_sha}


def declare(cfg: PipelineConfig, ctx: Context, done: dict[str, Done]) -> list[Stage]:
    sha = done["prepare"].hashes.get("prompts")
    job = StampJob(prompts_sha=sha, out=ctx.run_dir / "stamp.txt")
    return [Stage(name="stamp", job=job, body=stamp, inputs={"prompts": sha}, outputs={"stamp": job.out}, heavy=False)]


def check(cfg: PipelineConfig, pf) -> None:
    pf.warnings.append("stamp: checked")


@pytest.fixture
def with_stamp(monkeypatch):
    module = types.ModuleType("stages.stamp")
    module.STAGE = StageSpec(name="stamp", summary="the prompts' sha256", declare=declare, check=check)
    monkeypatch.setitem(sys.modules, "stages.stamp", module)
    monkeypatch.setattr(config, "STAGES", ("prepare", "stamp", "prune", "generate", "distill", "evaluate"))


def test_the_stage_list_is_the_one_in_config():
    assert [s.name for s in stage_specs()] == list(config.STAGES)
    force = PipelineConfig.model_json_schema()["properties"]["force"]["items"]["enum"]
    assert force == list(config.STAGES)


@pytest.mark.slow
def test_a_new_stage_is_one_module_and_one_entry(with_stamp, tmp_path, prefect_home):
    from flows.compress import prune_flow
    from flows.plan import cache_status
    from stages.preflight import preflight

    assert [s.name for s in stage_specs()][:3] == ["prepare", "stamp", "prune"]
    raw = {
        "name": "stamped",
        "runs_dir": str(tmp_path),
        "teacher": {"path": str(ROOT / "assets" / "teacher-tiny")},
        "taskworld": {"n_train": 64, "n_heldout": 16},
        "prune": {"num_layers": 2, "calibration_samples": 16},
        "generate": {"backend": "hf", "max_tokens": 16, "stop": ["\n"]},
    }
    cfg = validate(PipelineConfig, raw, "cfg")
    pf = preflight(cfg, full=False)
    assert "stamp: checked" in pf.warnings
    assert ("stamp", "will run") in cache_status(cfg, pf)

    first = prune_flow(cfg)
    assert list(first.summary["stages"]) == ["prepare", "stamp", "prune"]
    assert not first.summary["stages"]["stamp"]["cached"]
    manifest = read_json(Path(first.run_dir) / "manifest.json")["stages"]
    prompts_sha = manifest["prepare"]["outputs"]["prompts"]
    assert (Path(first.run_dir) / "stamp.txt").read_text() == f"{prompts_sha}\n"
    assert manifest["stamp"]["job"]["prompts_sha"] == prompts_sha and manifest["stamp"]["inputs"] == {
        "prompts": prompts_sha
    }

    again = prune_flow(cfg)
    assert all(s["cached"] for s in again.summary["stages"].values()), again.summary["stages"]
    assert dict(cache_status(cfg, preflight(cfg, full=False)))["stamp"] == "cache hit"
