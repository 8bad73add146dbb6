"""Bring your own teacher, data and benchmarks: a Qwen2 + BPE + chat-template world, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.byo_world import build_world, pipeline_config
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow
MODELS = ("teacher", "pruned", "sft", "student")


def _env(tmp_path) -> dict[str, str]:
    return os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-home" / "storage"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
    }


def test_byo_qwen2_chat_data_local_tasks(tmp_path):
    require_vllm()
    world = build_world(tmp_path)
    config = tmp_path / "byo.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(tmp_path, world, VLLM_PYTHON)))

    plan = subprocess.run(
        [sys.executable, "-m", "flows.cli", "plan", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(tmp_path),
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr
    assert "Qwen2ForCausalLM" in plan.stdout and "byo_gen" in plan.stdout and "byo_mc" in plan.stdout
    assert "messages 'messages'" in plan.stdout

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(tmp_path),
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "byo"
    summary = json.loads((run / "summary.json").read_text())
    assert tuple(summary["models"]) == MODELS
    for name, m in summary["models"].items():
        assert set(m["scores"]) == {"byo_gen", "byo_mc"}, name
        assert 0.0 <= m["scores"]["byo_gen"]["exact_match"]["value"] <= 1.0
        assert 0.0 <= m["scores"]["byo_mc"]["acc"]["value"] <= 1.0
        assert m["score"] == m["scores"]["byo_gen"]["exact_match"]["value"]  # first task, first metric
    assert summary["headline"] == {"task": "byo_gen", "metric": "exact_match"}
    assert summary["models"]["pruned"]["params"] < summary["models"]["teacher"]["params"]

    # 40 distinct questions + a duplicate + an evaluation prompt: both extras are dropped and reported.
    assert summary["data"]["prompts"] == 40
    assert summary["data"]["duplicates_dropped"] == 1
    assert summary["data"]["eval_overlap_dropped"] == 1
    assert summary["data"]["too_long_dropped"] == 0
    assert "dropped 1 duplicates, 1 prompts found in an evaluation set and 0 longer than 120 tokens" in proc.stdout

    # The teacher saw the chat-rendered prompts, token for token.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world["teacher"]))
    rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("<|im_start|>user\n") and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rows[0]["prompt_ids"] == tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert all(r["n_tokens"] >= 1 for r in rows)

    # The student is a stock checkpoint: transformers loads it with no missing or unexpected keys ...
    student = run / "student"
    _, info = AutoModelForCausalLM.from_pretrained(str(student), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # ... and the vLLM server serves it.
    from compress.serving.vllm_server import ServerSpec, VLLMServer

    spec = ServerSpec(model_dir=student, python=VLLM_PYTHON, dtype="float32", max_model_len=128, served_name="student")
    with VLLMServer(spec, tmp_path / "student-vllm.log") as server:
        import httpx

        r = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "student", "prompt": rows[0]["prompt"], "max_tokens": 4, "temperature": 0},
            timeout=120,
            headers=server.headers,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
