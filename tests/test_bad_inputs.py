"""Bad data and task inputs: one line naming the file, field or task, exit code 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.byo_world import build_world, pipeline_config
from tests.conftest import ROOT, VLLM_PYTHON


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    return root, build_world(root)


def _run(tmp_path, cfg: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "ph"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
    }
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def _with_source(tmp_path, world, source: dict) -> dict:
    _root, paths = world
    cfg = pipeline_config(tmp_path, paths, VLLM_PYTHON)
    cfg["data"]["sources"] = [source]
    return cfg


def _assert_one_line(proc, tmp_path, *expect: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for e in expect:
        assert e in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    # Nothing ran: the flow never created the run directory, no weights were loaded.
    assert not (tmp_path / "runs" / "byo").exists()
    assert "Loading weights" not in proc.stderr + proc.stdout


def test_missing_field(tmp_path, world):
    src = {"path": "json", "data_files": str(world[1]["chat"]), "prompt_field": "question"}
    proc = _run(tmp_path, _with_source(tmp_path, world, src))
    _assert_one_line(proc, tmp_path, "data.sources[0].prompt_field", "'question'", "chat.jsonl", "messages")


def test_empty_file(tmp_path, world):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _run(
        tmp_path,
        _with_source(tmp_path, world, {"path": "json", "data_files": str(empty), "messages_field": "messages"}),
    )
    _assert_one_line(proc, tmp_path, str(empty), "empty")


def test_line_not_utf8(tmp_path, world):
    bad = tmp_path / "latin1.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    bad.write_bytes(good + b"\n" + '{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1") + b"\n")
    proc = _run(
        tmp_path, _with_source(tmp_path, world, {"path": "json", "data_files": str(bad), "messages_field": "messages"})
    )
    _assert_one_line(proc, tmp_path, str(bad), "line 2", "UTF-8")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "non-empty list"),
        ([{"role": "user"}], "message 0"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ],
)
def test_messages_of_the_wrong_shape(tmp_path, world, messages, problem):
    f = tmp_path / "shape.jsonl"
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    f.write_text(json.dumps(ok) + "\n" + json.dumps({"messages": messages}) + "\n")
    proc = _run(
        tmp_path, _with_source(tmp_path, world, {"path": "json", "data_files": str(f), "messages_field": "messages"})
    )
    _assert_one_line(proc, tmp_path, "data.sources[0].messages_field", "record 1", problem)


def test_unknown_lm_eval_task(tmp_path, world):
    _root, paths = world
    cfg = pipeline_config(tmp_path, paths, VLLM_PYTHON)
    cfg["evaluate"]["tasks"] = ["byo_gen", "byo_nope"]
    proc = _run(tmp_path, cfg)
    _assert_one_line(proc, tmp_path, "evaluate.tasks", "'byo_nope'")


def test_messages_without_chat_template(tmp_path, world, tiny_model_dir):
    """The task-world tokenizer has no chat template: a messages source is refused before any stage."""
    cfg = _with_source(
        tmp_path, world, {"path": "json", "data_files": str(world[1]["chat"]), "messages_field": "messages"}
    )
    cfg["teacher"]["path"] = str(tiny_model_dir)
    proc = _run(tmp_path, cfg)
    _assert_one_line(proc, tmp_path, "data.sources[0].messages_field", "chat template")


def test_unreachable_hub_teacher(tmp_path, world):
    cfg = pipeline_config(tmp_path, world[1], VLLM_PYTHON)
    cfg["teacher"]["path"] = "distillflow-test/no-such-model"
    proc = _run(tmp_path, cfg)
    _assert_one_line(proc, tmp_path, "teacher.path", "'distillflow-test/no-such-model'", "hub is unreachable")


def test_endpoint_key_variable_not_set(tmp_path, world):
    _root, paths = world
    cfg = pipeline_config(tmp_path, paths, VLLM_PYTHON)
    cfg["generate"]["endpoint"] = {"url": "http://gpu-node:8000", "model": "teacher", "api_key_env": "NO_SUCH_KEY_VAR"}
    proc = _run(tmp_path, cfg)
    _assert_one_line(proc, tmp_path, "generate.endpoint.api_key_env", "$NO_SUCH_KEY_VAR is not set")


def test_self_distill_without_a_template_field(tmp_path, world):
    _root, paths = world
    cfg = pipeline_config(tmp_path, paths, VLLM_PYTHON)
    cfg["generate"]["mode"] = "self_distill"
    cfg["generate"]["self_distill"] = {"template": "Rewrite: {instruction}"}
    proc = _run(tmp_path, cfg)
    _assert_one_line(proc, tmp_path, "generate.self_distill.template", "{answer}")
