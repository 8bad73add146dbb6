"""A real vLLM server from .venv-vllm on loopback: start, generate with top-k log-probs, stop cleanly."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from compress.config import GenerateConfig
from compress.generate.cache import LogitCache
from compress.generate.run import Generator
from compress.generate.teacher import HTTPTeacher
from compress.jsonl import read_jsonl
from compress.models import load_model, load_tokenizer
from compress.serving.vllm_server import ServerError, ServerRefused, ServerSpec, VLLMServer, group_members
from tests.conftest import VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow


def _group_gone(pgid: int) -> bool:
    return not group_members(pgid)


def test_serve_generate_and_stop(tiny_model_dir, tmp_path):
    require_vllm()
    rows = [
        {"id": str(i), "task": "rev", "prompt": p, "answer": "x"}
        for i, p in enumerate(["rev abc=", "add 1+2=", "max 391="])
    ]
    cfg = GenerateConfig(top_k=5, max_tokens=6, dtype="float32", prompts_per_request=2, concurrency=2)
    spec = ServerSpec(model_dir=tiny_model_dir, python=VLLM_PYTHON, dtype="float32", max_model_len=128, max_logprobs=5)
    server = VLLMServer(spec, tmp_path / "vllm.log")
    tok = load_tokenizer(tiny_model_dir)
    with server:
        assert server.healthy()
        pgid = os.getpgid(server.proc.pid)
        teacher = HTTPTeacher(server.base_url, server.served_name, server.api_key)
        stats = Generator(rows, cfg, teacher, tok, tmp_path / "work").run(tmp_path / "data", tmp_path / "logits", 45)
    assert _group_gone(pgid), "vLLM process group still alive after stop()"
    assert not server.healthy()

    out = read_jsonl(tmp_path / "data" / "train.jsonl")
    cache = LogitCache(tmp_path / "logits")
    assert stats["rows"] == 3 and len(cache) == stats["tokens"] and cache.k == 5
    rows_ = cache[0 : len(cache)]
    ids, lps = rows_["ids"], rows_["logprobs"]

    # The served teacher's top-k must be the HF model's own distribution at the same positions.
    model = load_model(tiny_model_dir)
    for row in out:
        assert 1 <= row["n_tokens"] <= 6
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        seq = torch.tensor([prompt_ids + row["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].float(), -1)
        for j in range(row["n_tokens"]):
            pos = len(prompt_ids) + j - 1  # logits at pos predict token pos + 1
            want_vals, want_ids = logp[pos].topk(5)
            got_ids = ids[row["offset"] + j]
            got_vals = lps[row["offset"] + j]
            assert got_ids[0] == row["token_ids"][j]  # greedy: the chosen token is the top-1
            # float16 storage: 2^-11 relative.
            np.testing.assert_allclose(got_vals, want_vals.numpy(), atol=2e-3, rtol=1e-3)
            assert set(got_ids.tolist()) == set(want_ids.tolist()) or np.ptp(want_vals.numpy()) < 1e-3
        assert tok.decode(row["token_ids"]) == row["completion"]


def test_sigterm_to_parent_stops_server(tiny_model_dir, tmp_path):
    """A pipeline process killed by SIGTERM (Prefect cancellation) must not orphan the server."""
    require_vllm()
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from compress.serving.vllm_server import ServerSpec, VLLMServer
        spec = ServerSpec(model_dir=Path({str(tiny_model_dir)!r}), python=Path({str(VLLM_PYTHON)!r}),
                          dtype="float32", max_model_len=128)
        s = VLLMServer(spec, Path({str(tmp_path / "v.log")!r}))
        s.start()
        print(os.getpgid(s.proc.pid), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(parent.stdout.readline())
        assert not _group_gone(pgid)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=60)
        assert parent.returncode != 0
        assert _group_gone(pgid), "server survived its parent's SIGTERM"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_start_failure_is_reported_with_log(tmp_path):
    require_vllm()
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    # A model vLLM refuses: its root cause in one line, and not a transient ServerError (no retry).
    with pytest.raises(ServerRefused, match=r"vLLM did not start on .*not-a-model: .*model_type.*\(log .*v\.log\)"):
        VLLMServer(ServerSpec(model_dir=bad, python=VLLM_PYTHON, startup_timeout_s=300), tmp_path / "v.log").start()
    assert not issubclass(ServerRefused, ServerError)


def test_missing_python_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"generate\.vllm_python"):
        spec = ServerSpec(model_dir=tiny_model_dir, python=tmp_path / "nope" / "python")
        VLLMServer(spec, tmp_path / "v.log").start()
