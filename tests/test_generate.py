"""The generate stage's pieces without a server: the logit cache, the checker, shards and resume, the
transformers teacher, and the sampled cache's unbiasedness. The vLLM-served path is tested in
``tests/test_generate_vllm.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.config import GenerateConfig, SelfDistillConfig
from compress.data.taskworld import make_splits
from compress.distill.losses import LossSpec, sampled_loss, terms
from compress.generate.cache import CacheError, CacheWriter, LogitCache, id_bits, pack_ids, unpack_ids
from compress.generate.run import DataRowError, Generator, accept_rewrite, unique_counts
from compress.generate.teacher import HFTeacher
from compress.models import load_model, load_tokenizer
from tests.conftest import ROOT
from tests.distill_data import TOY

TEACHER = ROOT / "assets" / "teacher-tiny"


class Crash(RuntimeError):
    """Stands for the worker dying in the middle of the stage."""


@pytest.fixture(scope="module")
def hf_teacher() -> HFTeacher:
    return HFTeacher(TEACHER)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TEACHER)


def rows(n: int, seed: int = 1) -> list[dict]:
    out, _ = make_splits(["rev", "sort", "max", "dup", "rot"], n, 4, seed=seed)
    return out


# ------------------------------------------------------------------------------------------ cache


@pytest.mark.parametrize("vocab", [2, 45, 32000, 65536, 128256, 151936])
def test_packed_ids_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, (37, 20))
    ids[0] = vocab - 1
    bits = id_bits(vocab)
    packed = pack_ids(ids, bits)
    assert packed.shape == (37, -(-20 * bits // 8))
    assert (unpack_ids(packed, 20, bits) == ids).all()


def test_cache_refuses_an_id_outside_the_vocabulary(tmp_path):
    with pytest.raises(CacheError, match="id 45 outside the vocabulary of 45"):
        CacheWriter(tmp_path, "topk", 1, 45).append(np.array([[45]]), np.array([[-0.1]]))
    with pytest.raises(CacheError, match="out of range"):
        pack_ids(np.array([[64]]), id_bits(45))


def _topk(n: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    lps = np.sort(np.log(rng.dirichlet(np.ones(3 * k), n)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
    return ids, lps


def test_cache_round_trip_size_and_tail(tmp_path):
    ids, lps = _topk(500, 20, 128256)
    w = CacheWriter(tmp_path, "topk", 20, 128256)
    assert w.append(ids[:200], lps[:200]) == 0
    assert w.append(ids[200:], lps[200:]) == 200
    meta = w.close(rows=7)
    assert meta["tokens"] == 500 and meta["version"] == 1
    cache = LogitCache(tmp_path)
    got = cache[150:260]
    assert (got["ids"] == ids[150:260]).all()
    # float16: relative rounding of 2^-11 of the value.
    assert np.allclose(got["logprobs"], lps[150:260], rtol=1e-3, atol=1e-3)
    tail = np.log1p(-np.exp(lps[150:260].astype(np.float64)).sum(-1))
    assert np.allclose(got["tail"], tail, rtol=2e-3, atol=2e-3)
    # k = 20 at a 128k vocabulary: 43 bytes of ids + 40 of log-probs + 2 of tail.
    assert cache.nbytes_per_token() == 85.0


def test_cache_refuses_a_changed_truncated_or_unfinished_file(tmp_path):
    ids, lps = _topk(50, 4, 1000)
    w = CacheWriter(tmp_path, "topk", 4, 1000)
    w.append(ids, lps)
    w.close(rows=1)
    data = bytearray((tmp_path / "logprobs.bin").read_bytes())
    data[10] ^= 0xFF
    (tmp_path / "logprobs.bin").write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"logprobs\.bin: checksum mismatch"):
        LogitCache(tmp_path)
    (tmp_path / "ids.bin").write_bytes((tmp_path / "ids.bin").read_bytes()[:-3])
    with pytest.raises(CacheError, match=r"ids\.bin: \d+ bytes, cache.json says"):
        LogitCache(tmp_path, verify=False)
    meta = json.loads((tmp_path / "cache.json").read_text())
    (tmp_path / "cache.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(CacheError, match="version 99"):
        LogitCache(tmp_path)
    # A writer that never closed leaves no cache.json: never read as a cache.
    w2 = CacheWriter(tmp_path / "half", "topk", 4, 1000)
    w2.append(ids, lps)
    with pytest.raises(CacheError, match="not a teacher logit cache"):
        LogitCache(tmp_path / "half")


def test_earlier_float32_layout_still_reads(tmp_path):
    ids, lps = _topk(30, 5, 100)
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    np.save(tmp_path / "logprobs.npy", lps)
    cache = LogitCache(tmp_path)
    assert cache.kind == "topk" and len(cache) == 30
    assert (cache[3:9]["ids"] == ids[3:9]).all() and (cache[3:9]["logprobs"] == lps[3:9]).all()


# ----------------------------------------------------------------------------------------- checker


@pytest.mark.parametrize(
    ("checker", "rewrite", "original", "ok"),
    [
        ("final_answer", "We add them: 3 + 4 = 7, so the total is 7.", "The answer is 7", True),
        ("final_answer", "3 + 4 gives 8", "The answer is 7", False),
        ("final_answer", "It totals 1,250.", "1250", True),
        ("final_answer", "the reversed word is olleh", "olleh", False),  # no number: the whole text
        ("final_answer", "olleh", " olleh\n", True),
        ("exact", "olleh ", "olleh", True),
        ("contains", "the reversed word is olleh", "olleh", True),
        ("none", "anything at all", "olleh", True),
        ("final_answer", "As the reference answer says, 7.", "7", False),  # mentions the reference
        ("none", "   ", "7", False),  # empty
    ],
)
def test_rewrite_checker(checker, rewrite, original, ok):
    assert accept_rewrite(rewrite, original, SelfDistillConfig(checker=checker)) is ok


def test_regex_checker_and_its_config_errors():
    cfg = SelfDistillConfig(checker="regex", pattern=r"#### (\S+)")
    assert accept_rewrite("work... #### 42", "#### 42", cfg)
    assert not accept_rewrite("work... #### 41", "#### 42", cfg)
    with pytest.raises(ValueError, match=r"generate\.self_distill\.pattern: needs a capture group"):
        SelfDistillConfig(checker="regex", pattern=r"####")
    with pytest.raises(ValueError, match=r"generate\.self_distill\.template: must contain \{answer\}"):
        SelfDistillConfig(template="{instruction} only")


# ------------------------------------------------------------------------------ transformers teacher


def _run(tmp: Path, teacher, tok, data, name="run", progress=None, **cfg):
    gen = Generator(data, GenerateConfig(**(TOY | {"shard_size": 16, "prompts_per_request": 8} | cfg)), teacher, tok,
                    tmp / f"{name}.work")  # fmt: skip
    stats = gen.run(tmp / name / "data", tmp / name / "logits", 45, progress)
    return stats, [json.loads(line) for line in (tmp / name / "data" / "train.jsonl").open()]


def test_hf_topk_matches_its_own_log_softmax(tmp_path, hf_teacher, tok):
    """The cache's top-k for each completion token = top-k of a separate forward pass over prompt + completion."""
    data = rows(24)
    stats, out = _run(tmp_path, hf_teacher, tok, data)
    assert stats["rows"] == 24 and stats["cache"]["kind"] == "topk"
    cache = LogitCache(tmp_path / "run" / "logits")
    model = load_model(TEACHER).eval()
    for r in out[:8]:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        seq = torch.tensor([prompt + r["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].float(), -1)
        want_lp, want_ids = logp[len(prompt) - 1 : -1].topk(20, dim=-1)
        got = cache[r["offset"] : r["offset"] + r["n_tokens"]]
        assert (got["ids"][:, :3] == want_ids[:, :3].numpy()).all()
        assert np.allclose(got["logprobs"], want_lp.numpy(), atol=2e-2)


def test_resume_after_a_crash_skips_finished_shards(tmp_path, hf_teacher, tok):
    """A stage that dies after 2 shards resumes: those shards are not redone, every row is there once."""
    data = rows(60)
    calls = {"n": 0}

    def crash(fraction, message):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed")

    with pytest.raises(Crash):
        _run(tmp_path, hf_teacher, tok, data, progress=crash)
    done = sorted(p.name for p in (tmp_path / "run.work").glob("*/shard-*"))
    assert len(done) >= 2 and not any(n.endswith(".tmp") for n in done)
    stats, out = _run(tmp_path, hf_teacher, tok, data)
    assert stats["shards"] == 4 and stats["shards_resumed"] == len(done)
    assert [r["id"] for r in out] == [r["id"] for r in data]
    # Same result as a run that was never interrupted.
    _, clean = _run(tmp_path, hf_teacher, tok, data, name="clean")
    assert [r["token_ids"] for r in out] == [r["token_ids"] for r in clean]
    a, b = LogitCache(tmp_path / "run" / "logits"), LogitCache(tmp_path / "clean" / "logits")
    assert (a[0 : len(a)]["ids"] == b[0 : len(b)]["ids"]).all()
    assert not (tmp_path / "run.work").exists()  # merged: the shards are gone


def test_changed_settings_never_reuse_stale_shards(tmp_path, hf_teacher, tok):
    data = rows(20)

    def crash(fraction, message):
        raise Crash

    with pytest.raises(Crash):
        _run(tmp_path, hf_teacher, tok, data, progress=crash)
    stats, _ = _run(tmp_path, hf_teacher, tok, data, top_k=5)
    assert stats["shards_resumed"] == 0 and stats["cache"]["k"] == 5


def test_rows_are_checked_before_any_request(tmp_path, hf_teacher, tok):
    data = rows(4)
    with pytest.raises(DataRowError, match="appears twice"):
        _run(tmp_path, hf_teacher, tok, [*data, data[0]])
    with pytest.raises(DataRowError, match="self_distill needs an answer on every row"):
        _run(tmp_path, hf_teacher, tok, [*data, {"id": "x", "prompt": "rev ab="}], mode="self_distill")


def test_self_distill_keeps_accepted_rewrites_and_the_originals_otherwise(tmp_path, hf_teacher, tok):
    """The tiny teacher answers its task-world prompts: with a template that ends with the question, its
    correct answers are accepted; the rest keep the original answer. The teacher-forced cache covers both."""
    data = rows(40)
    # The answer on a line of its own, then the question: the teacher answers the question it ends
    # with, and gets some right (13 of 40 when measured), so both branches are taken.
    sd = {"template": "{answer}\n{instruction}", "checker": "exact"}
    stats, out = _run(tmp_path, hf_teacher, tok, data, mode="self_distill", self_distill=sd)
    assert 0 < stats["rewrites_accepted"] < len(data), stats
    assert stats["rewrites_accepted"] == sum(r["rewritten"] for r in out)
    assert stats["acceptance_rate"] == pytest.approx(stats["rewrites_accepted"] / 40)
    for r, src in zip(out, data, strict=True):
        if not r["rewritten"]:
            assert r["completion"] == src["answer"] + "\n"
    cache = LogitCache(tmp_path / "run" / "logits")
    assert len(cache) == sum(r["n_tokens"] for r in out)


def test_sampled_cache_counts_and_unbiased_forward_kl(tmp_path, hf_teacher, tok):
    """Counts sum to the draws; the sampled forward-KL estimate, averaged over draws, converges to the
    dense KL(p || q) computed over the full vocabulary (Sparse Logit Sampling)."""
    data = rows(6)
    stats, out = _run(tmp_path, hf_teacher, tok, data, logits="sampled", draws=8)
    cache = LogitCache(tmp_path / "run" / "logits")
    assert cache.kind == "sampled" and stats["cache"]["k"] == 8
    rows_ = cache[0 : len(cache)]
    assert (rows_["counts"].sum(-1) == 8).all()
    # A second model as the student q: one of the pruned-like shapes would do; the teacher's own logits
    # at a high temperature give a q that differs from p everywhere.
    model = load_model(TEACHER).eval()
    r = out[0]
    prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
    seq = [prompt + r["token_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor(seq)).logits[0, len(prompt) - 1 : -1].float()
    log_p = torch.log_softmax(logits, -1)
    student = logits / 3.0 + torch.randn_like(logits)
    log_q = torch.log_softmax(student, -1)
    dense = (log_p.exp() * (log_p - log_q)).sum(-1)
    spec = LossSpec("forward_kl")
    assert torch.allclose(terms(spec, log_p, log_q).sum(-1), dense, atol=1e-5)  # the dense reference
    estimates = []
    for seed in range(400):
        ((ids, lps),) = hf_teacher._sample(seq, [len(prompt)], 8, seed)
        u_ids, u_lps, counts = unique_counts(ids, lps, 8)
        est = sampled_loss(spec, student, torch.tensor(u_ids), torch.tensor(counts.astype(np.float32)),
                           torch.tensor(u_lps))  # fmt: skip
        estimates.append(est)
    mean = torch.stack(estimates).mean(0)
    spread = torch.stack(estimates).std(0) / len(estimates) ** 0.5
    assert (mean - dense).abs().max() <= 4 * spread.max() + 1e-3, (mean, dense)
    # One draw alone is not the dense value: the average is what converges.
    assert (torch.stack(estimates)[:, 0] - dense[0]).abs().max() > 10 * (mean[0] - dense[0]).abs()


def test_hf_cut_keeps_the_stop_string_or_eos_and_nothing_after(hf_teacher, tok):
    ids = tok("abc\ndef", add_special_tokens=False)["input_ids"]
    newline_at = ids.index(tok("\n", add_special_tokens=False)["input_ids"][-1])
    assert hf_teacher._cut([*ids, 0, 0], ["\n"]) == ids[: newline_at + 1]
    eos = tok.eos_token_id
    assert hf_teacher._cut([*ids[:2], eos, 0, 0], ["\n"]) == [*ids[:2], eos]
    assert hf_teacher._cut(ids[:2], ["\n"]) == ids[:2]
