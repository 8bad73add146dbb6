"""A student of the user's own: the tokenizer checks, the plan, and the prune stage replaced by adoption."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compress.config import ConfigError, PipelineConfig
from compress.models import load_tokenizer
from compress.student import StudentMismatch, adopt_student, check_compatible
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "teacher-small"
STUDENT = ROOT / "assets" / "teacher-tiny"  # same character tokenizer, fewer parameters


def _cfg(tmp_path, **extra) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "byo",
            "runs_dir": str(tmp_path / "runs"),
            "teacher": {"path": str(TEACHER)},
            "student": {"path": str(STUDENT)},
            "taskworld": {"tasks": ["rev", "max"], "n_train": 32, "n_heldout": 8},
            "generate": {"max_tokens": 8, "stop": ["\n"], "max_model_len": 64},
        }
        | extra
    )


def test_same_tokenizer_is_compatible():
    check_compatible(load_tokenizer(TEACHER), load_tokenizer(STUDENT))


def test_a_different_vocabulary_is_one_line_naming_the_token():
    other = load_tokenizer(STUDENT)
    other.add_tokens(["<extra>"])
    with pytest.raises(StudentMismatch) as e:
        check_compatible(load_tokenizer(TEACHER), other)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("student.path: ") and "'<extra>'" in msg


def test_a_different_chat_template_is_refused():
    teacher, student = load_tokenizer(TEACHER), load_tokenizer(STUDENT)
    teacher.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    with pytest.raises(StudentMismatch, match="has no chat template"):
        check_compatible(teacher, student)
    student.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    with pytest.raises(StudentMismatch, match="differs"):
        check_compatible(teacher, student)
    student.chat_template = teacher.chat_template
    check_compatible(teacher, student)


def test_plan_describes_the_given_student_and_checks_it(tmp_path):
    from flows.plan import describe
    from stages.preflight import preflight

    cfg = _cfg(tmp_path)
    pf = preflight(cfg, full=False)
    text = describe(cfg, "byo.yaml", pf)
    teacher_params, student_params = pf.layout["params"], pf.student["params_after"]
    assert student_params < teacher_params
    assert f"given checkpoint {STUDENT} (no pruning) 8 layers" in text, text
    assert f"{student_params:,} params ({student_params / teacher_params:.1%} of the teacher)" in text

    bad = tmp_path / "other"
    bad.mkdir()
    from compress.config import validate

    with pytest.raises(ConfigError, match=r"^byo\.yaml: student\.path: .*config\.json not found"):
        validate(PipelineConfig, _cfg(tmp_path).model_dump(mode="json") | {"student": {"path": str(bad)}}, "byo.yaml")


def test_adopt_copies_the_checkpoint(tmp_path):
    from compress.jobs import AdoptJob, Checkpoint
    from compress.models import checkpoint_params

    student, teacher = Checkpoint(path=STUDENT, identity=None), Checkpoint(path=TEACHER, identity=None)
    record = adopt_student(AdoptJob(student=student, teacher=teacher, out_dir=tmp_path / "pruned"))
    assert (tmp_path / "pruned" / "model.safetensors").is_file()
    assert (tmp_path / "pruned" / "tokenizer.json").read_bytes() == (STUDENT / "tokenizer.json").read_bytes()
    assert record["params_after"] == checkpoint_params(STUDENT) and record["kept_layers"] is None
    assert record["ratio"] == pytest.approx(checkpoint_params(STUDENT) / checkpoint_params(TEACHER))


@pytest.mark.slow
def test_prune_command_adopts_the_given_student(tmp_path):
    """`distillflow prune` through the real flow: the prune stage copies the student and is recorded."""
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "ph")}
    (tmp_path / "ph").mkdir()
    cmd = [sys.executable, "-m", "flows.cli", "prune", "configs/tiny.yaml", "--set", f"runs_dir={tmp_path / 'runs'}",
           "--set", f"student.path={STUDENT}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"student given: {STUDENT}, no pruning" in proc.stdout, proc.stdout
    run = tmp_path / "runs" / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["prune"]["result"]["method"] == "given"
    assert manifest["stages"]["prune"]["inputs"]["student"]
    assert (run / "pruned" / "model.safetensors").is_file()
