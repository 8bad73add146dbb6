"""``distillflow plan`` and the teacher lookup: local directories, the Hugging Face cache, offline errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from compress.config import ConfigError, PipelineConfig, TeacherConfig
from tests.conftest import ROOT


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | (env or {}),
        timeout=120,
    )


def test_plan_tiny_config():
    proc = _cli("plan", "configs/easy.yaml", "--set", "runs_dir=/nonexistent-runs-dir")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "LlamaForCausalLM, 8 layers, hidden 128, 1,586,560 params" in out
    assert "depth pruning (importance) to 4 layers, hidden 128, FFN 384, heads 4/2 KV: 799,104 params (50.4%" in out
    assert "task world (rev, sort, max, dup, rot), 4000 training prompts" in out
    assert "taskworld -> distillflow_taskworld" in out
    for stage in ("prepare", "prune", "generate", "distill_student", "distill_sft", "evaluate_sft"):
        assert f"{stage}" in out
    assert "will run" in out and "cache hit" not in out


def _fake_hub_cache(cache, repo: str, commit: str, src) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_the_local_cache(tmp_path, tiny_model_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "distillflow-test/tiny", commit, tiny_model_dir)
    proc = _cli(
        "plan",
        "configs/easy.yaml",
        "--set",
        "teacher.path=distillflow-test/tiny",
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"distillflow-test/tiny (hub distillflow-test/tiny@{commit[:12]})" in proc.stdout
    assert "LlamaForCausalLM, 4 layers" in proc.stdout


def test_unknown_hub_id_offline_is_one_line():
    proc = _cli(
        "plan", "configs/easy.yaml", "--set", "teacher.path=distillflow-test/absent", env={"HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: teacher.path: 'distillflow-test/absent' is not a local directory, not in the Hugging Face cache, "
        "and the hub is unreachable"
    ]


def test_local_path_that_does_not_exist_is_not_a_hub_id():
    with pytest.raises(ValueError, match="no model checkpoint at '/nope/model'"):
        TeacherConfig(path="/nope/model")
    with pytest.raises(ValueError, match="no model checkpoint"):
        TeacherConfig(path="./relative/missing")


def test_standard_task_without_cached_data_offline(tmp_path):
    proc = _cli(
        "plan",
        "configs/easy.yaml",
        "--set",
        "evaluate.tasks=[taskworld, arc_easy]",
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line
    assert "evaluate.tasks: 'arc_easy' needs dataset 'allenai/ai2_arc' (ARC-Easy)" in line


def test_chat_template_evaluation_needs_a_template():
    proc = _cli("plan", "configs/easy.yaml", "--set", "evaluate.apply_chat_template=true")
    assert proc.returncode == 2
    assert "evaluate.apply_chat_template: the teacher's tokenizer has no chat template" in proc.stderr


def test_trust_remote_code_warns(tmp_path):
    proc = _cli("plan", "configs/easy.yaml", "--set", "teacher.trust_remote_code=true", "--set", f"runs_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "warning: teacher.trust_remote_code is on" in proc.stderr


@pytest.mark.parametrize(
    "prune", [{"num_layers": 2}, {"method": "both", "target_ratio": 0.5}, {"method": "width", "hidden_size": 32}]
)
def test_planned_student_size_is_exact(tiny_model_dir, tmp_path, prune):
    """plan's student parameters are what pruning really produces."""
    from compress.models import checkpoint_params, count_params, load_model
    from compress.prune.prune import prune_model, standalone_job
    from stages.preflight import preflight

    cfg = PipelineConfig(teacher={"path": tiny_model_dir}, prune=prune)
    pf = preflight(cfg, full=False)
    assert pf.layout["exact"] and pf.layout["params"] == count_params(load_model(tiny_model_dir))
    prune_model(standalone_job(tiny_model_dir, ["rev abc=cba\n", "sort 321=123\n"], cfg.prune, tmp_path / "p"))
    assert pf.student["params_after"] == checkpoint_params(tmp_path / "p")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("prune.num_layers=9", "prune.num_layers=9 must be between 1 and the teacher's 4"),
        ("prune.method=width", "num_layers is a depth size: set method to depth or both"),
        ("prune.hidden_size=64", "hidden_size is a width size: set method to width or both"),
    ],
)
def test_prune_targets_are_checked_before_any_stage(tiny_model_dir, tmp_path, setting, message):
    proc = _cli(
        "plan",
        "configs/easy.yaml",
        "--set",
        f"teacher.path={tiny_model_dir}",
        "--set",
        setting,
        "--set",
        f"runs_dir={tmp_path}",
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_data_errors_are_config_errors():
    """The CLI maps ConfigError to exit code 2; a data fault must be one."""
    from compress.data.prepare import DataError

    assert issubclass(DataError, ConfigError)


def test_installed_task_names_are_lm_evals_own_and_cached(tmp_path, monkeypatch):
    """The list a misspelt task is refused against holds lm-eval's tasks, groups and tags, and is read back."""
    from evaluation.tasks import installed_task_names

    monkeypatch.setenv("DISTILLFLOW_CACHE_DIR", str(tmp_path))
    names = installed_task_names()
    assert {"hellaswag", "arc_easy", "gsm8k", "mmlu"} <= names and len(names) > 1000
    (cached,) = tmp_path.glob("lm-eval-*-task-names.json")
    assert installed_task_names() == names and cached.is_file()
