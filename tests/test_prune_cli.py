"""`distillflow prune`: the prune stage alone through the real flow, its cache and its importance cache."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _prune(tmp_path, *settings: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "ph")}
    (tmp_path / "ph").mkdir(exist_ok=True)
    args = ["--set", f"runs_dir={tmp_path / 'runs'}", "--set", "prune.num_layers=null", "--set", "prune.method=both"]
    for s in settings:
        args += ["--set", s]
    cmd = [sys.executable, "-m", "flows.cli", "prune", "configs/easy.yaml", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_prune_command_caches_the_stage_and_the_importance(tmp_path):
    run_dir = tmp_path / "runs" / "easy"
    first = _prune(tmp_path, "prune.target_ratio=0.5")
    assert "parameters 1,586,560 -> 834,392 (52.6%)" in first.stdout, first.stdout
    assert "(cache hit)" not in first.stdout
    _, info = AutoModelForCausalLM.from_pretrained(run_dir / "pruned", output_loading_info=True)
    assert not any(info.values())
    record = json.loads((run_dir / "prune.json").read_text())
    assert record["student_shape"]["num_layers"] == 6 and not record["importance_reused"]
    assert (run_dir / "plots" / "importance.png").is_file()
    assert "| layer | block influence |" in (run_dir / "prune.md").read_text()

    # Another budget: the stage runs again, but the scores come from importance.json.
    second = _prune(tmp_path, "prune.target_ratio=0.7")
    assert "(cache hit)" not in second.stdout
    assert json.loads((run_dir / "prune.json").read_text())["importance_reused"]
    # The same again: a stage cache hit.
    third = _prune(tmp_path, "prune.target_ratio=0.7")
    assert "(cache hit)" in third.stdout, third.stdout
