"""The generate stage against a real vLLM server: key and loopback, top-k and prompt-token log-probs equal
to transformers' within bf16 tolerance, sampled draws, and a server killed in the middle of the stage."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from compress.config import GenerateConfig
from compress.data.taskworld import make_splits
from compress.generate.cache import LogitCache
from compress.generate.generate import generate_data
from compress.generate.run import Generator
from compress.generate.teacher import HTTPTeacher
from compress.jobs import Checkpoint, GenerateJob
from compress.jsonl import write_jsonl
from compress.models import load_model, load_tokenizer
from compress.serving.vllm_server import ServerSpec, VLLMServer
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm
from tests.distill_data import TOY

pytestmark = pytest.mark.slow
TEACHER = ROOT / "assets" / "teacher-tiny"


class Bf16Tolerance:
    """ "Within bf16 tolerance", measured rather than guessed: the served (bf16) log-probs may differ from
    transformers' float32 ones by at most twice what transformers' own bf16 run differs by at the same
    entries, plus 0.02 (float16 storage in the cache).

    Compared where the float32 log-prob is at least ``FLOOR`` (-10: entries that hold 4.5e-5 of the
    mass or more, the ones a KD target is made of). Far below it, bf16 rounding of logits of size 10-30
    moves a log-prob by a large fraction of a nat: on one CPU the served value of a -12.46 entry (rank 2
    of a position whose top-1 holds nearly all the mass) was 0.534 off, 2.1x transformers' bf16 error.
    """

    FLOOR = -10.0

    def __init__(self):
        self.served: list[float] = []
        self.hf_bf16: list[float] = []

    def add(self, got: np.ndarray, fp32: np.ndarray, bf16: np.ndarray) -> None:
        keep = fp32 >= self.FLOOR
        if not keep.any():
            return
        self.served.append(float(np.abs(got - fp32)[keep].max()))
        self.hf_bf16.append(float(np.abs(bf16 - fp32)[keep].max()))

    def check(self) -> None:
        assert self.served, "nothing compared"
        assert max(self.served) <= 2 * max(self.hf_bf16) + 0.02, (max(self.served), max(self.hf_bf16))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_vllm()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    # bfloat16: the generate stage's default serving dtype.
    spec = ServerSpec(model_dir=TEACHER, python=VLLM_PYTHON, dtype="bfloat16", max_model_len=128)
    with VLLMServer(spec, log) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    """Transformers' log-softmax of a sequence: float32, and (``bf16=True``) the model run in bf16."""
    models = {torch.float32: load_model(TEACHER).eval(), torch.bfloat16: load_model(TEACHER, torch.bfloat16).eval()}
    tok = load_tokenizer(TEACHER)

    def log_probs(seq: list[int], bf16: bool = False) -> torch.Tensor:
        model = models[torch.bfloat16 if bf16 else torch.float32]
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)

    return log_probs, tok


def rows(n: int, seed: int = 5) -> list[dict]:
    out, _ = make_splits(["rev", "sort", "max", "dup", "rot"], n, 4, seed=seed)
    return out


def teacher(server: VLLMServer) -> HTTPTeacher:
    return HTTPTeacher(server.base_url, server.served_name, server.api_key)


def test_api_key_loopback_and_no_key_on_the_command_line(served):
    assert served.host == "127.0.0.1" and "--host" in served.command()
    assert served.api_key not in " ".join(served.command())
    body = {"model": served.served_name, "prompt": "rev ab=", "max_tokens": 2}
    assert httpx.post(f"{served.base_url}/v1/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{served.base_url}/v1/completions", json=body, headers=wrong, timeout=60).status_code == 401
    r = httpx.post(f"{served.base_url}/v1/completions", json=body, headers=served.headers, timeout=60)
    assert r.status_code == 200, r.text


def test_cached_topk_equals_transformers_log_softmax(served, reference, tmp_path):
    """Each completion token's cached top-k = the top-k of transformers' log-softmax at that position."""
    log_probs, tok = reference
    data = rows(40)
    gen = Generator(data, GenerateConfig(shard_size=16, **TOY), teacher(served), tok, tmp_path / "work")
    stats = gen.run(tmp_path / "data", tmp_path / "logits", 45)
    cache = LogitCache(tmp_path / "logits")
    assert stats["cache"]["bytes_per_token"] <= 100
    out = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").open()]
    checked, tol = 0, Bf16Tolerance()
    for r in out:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        logp, logp16 = log_probs(prompt + r["token_ids"]), log_probs(prompt + r["token_ids"], bf16=True)
        got = cache[r["offset"] : r["offset"] + r["n_tokens"]]
        for j in range(r["n_tokens"]):
            pos = len(prompt) + j - 1
            want_vals, want_ids = logp[pos].topk(20)
            assert got["ids"][j, 0] == r["token_ids"][j]  # greedy: the chosen token is the top-1
            tol.add(got["logprobs"][j], want_vals.numpy(), logp16[pos].topk(20).values.numpy())
            # The same ids, except where bf16 rounding swaps near-equal neighbours at the cut.
            missing = set(got["ids"][j].tolist()) ^ set(want_ids.tolist())
            cut = want_vals[-1].item()
            assert all(abs(logp[pos, i].item() - cut) < 0.25 for i in missing)
            checked += 1
    assert checked == stats["tokens"] > 0
    tol.check()


def test_prompt_tokens_scored_by_teacher_forcing(served, reference):
    """``score`` (vLLM's prompt_logprobs) gives every prompt token's top-k, equal to transformers'."""
    log_probs, tok = reference
    seqs = [tok(r["prompt"] + r["answer"] + "\n", add_special_tokens=False)["input_ids"] for r in rows(6)]
    scored = asyncio.run(teacher(served).score(seqs, [1] * len(seqs), 20))
    tol = Bf16Tolerance()
    for seq, (ids, lps) in zip(seqs, scored, strict=True):
        want_vals, want_ids = log_probs(seq)[:-1].topk(20, dim=-1)
        assert ids.shape == (len(seq) - 1, 20)
        assert (ids[:, 0] == want_ids[:, 0].numpy()).mean() > 0.95
        tol.add(lps, want_vals.numpy(), log_probs(seq, bf16=True)[:-1].topk(20, dim=-1).values.numpy())
    tol.check()


def test_sampled_draws_come_from_the_teacher(served, reference, tmp_path):
    log_probs, tok = reference
    data = rows(8)
    cfg = GenerateConfig(shard_size=8, logits="sampled", draws=16, **TOY)
    Generator(data, cfg, teacher(served), tok, tmp_path / "work").run(tmp_path / "data", tmp_path / "logits", 45)
    cache = LogitCache(tmp_path / "logits")
    out = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").open()]
    tol = Bf16Tolerance()
    for r in out:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        logp, logp16 = log_probs(prompt + r["token_ids"]), log_probs(prompt + r["token_ids"], bf16=True)
        got = cache[r["offset"] : r["offset"] + r["n_tokens"]]
        assert (got["counts"].sum(-1) == 16).all()
        for j in range(r["n_tokens"]):
            drawn = got["counts"][j] > 0
            at = (len(prompt) + j - 1, got["ids"][j][drawn])
            tol.add(got["logprobs"][j][drawn], logp[at].numpy(), logp16[at].numpy())
    tol.check()
    # Each prefix draws with its own random numbers: twelve copies of a high-entropy prefix (a random
    # letter follows "rev ") do not all draw the same id. A request-wide seed made them identical.
    seq = [*tok("rev ", add_special_tokens=False)["input_ids"], tok("a", add_special_tokens=False)["input_ids"][0]]
    drawn = asyncio.run(teacher(served).sample([seq] * 12, [len(seq) - 1] * 12, 1, seed=5))
    assert len({int(ids[0, 0]) for ids, _ in drawn}) > 1


def _kill_api_server(model_dir: Path) -> int:
    """SIGKILL the vLLM API server serving ``model_dir`` (as the OOM killer would): found from outside."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmd and str(model_dir).encode() in cmd:
            os.kill(int(entry.name), signal.SIGKILL)
            return int(entry.name)
    raise AssertionError("no vLLM API server found for " + str(model_dir))


def test_server_killed_mid_stage_is_restarted_and_the_stage_resumes(tmp_path):
    """The must-show: kill the server during generation; the stage restarts it and resumes. The dataset
    holds every prompt exactly once."""
    require_vllm()
    model_dir = tmp_path / "teacher"  # a copy of its own, so that the kill finds this test's server only
    shutil.copytree(TEACHER, model_dir)
    data = rows(1200, seed=11)
    killed: list[int] = []

    def progress(fraction: float, message: str) -> None:
        if not killed and fraction >= 0.2:
            killed.append(_kill_api_server(model_dir.resolve()))

    cfg = GenerateConfig(shard_size=100, prompts_per_request=25, concurrency=4, vllm_python=VLLM_PYTHON, **TOY)
    write_jsonl(data, tmp_path / "prompts.jsonl")
    job = GenerateJob(
        teacher=Checkpoint(path=model_dir, identity=None),
        prompts=tmp_path / "prompts.jsonl",
        prompts_sha=None,
        generate=cfg,
        need_logits=True,
        device="cpu",
        run_dir=tmp_path / "run",
    )
    stats = generate_data(job, progress=progress, log=lambda m: None)
    assert killed, "the server was never killed"
    assert stats["server_restarts"] == 1
    out = [json.loads(line) for line in (tmp_path / "run" / "data" / "train.jsonl").open()]
    ids = [r["id"] for r in out]
    assert len(ids) == len(data) == stats["rows"]
    assert ids == [r["id"] for r in data] and len(set(ids)) == len(ids)
    cache = LogitCache(tmp_path / "run" / "logits")
    assert len(cache) == sum(r["n_tokens"] for r in out) == stats["tokens"]
    assert all(r["n_tokens"] > 0 for r in out)
    log = (tmp_path / "run" / "logs" / "vllm-server.log").read_text()
    assert "restart 1" in log
