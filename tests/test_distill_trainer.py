"""The distill stage's trainer: losses from config, online/cached teacher, hidden MSE, accumulation,
resume after SIGKILL, two processes against one, LoRA merged and served by vLLM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from compress.config import DistillConfig, KDLoss
from compress.distill.batches import encode_example, make_collator
from compress.distill.heads import shared_vocab
from compress.distill.hidden_mse import HiddenMSE
from compress.distill.losses import LOSSES
from compress.distill.recipe import distill_student
from compress.generate.cache import LogitCache
from compress.generate.teacher import parse_choice
from compress.jsonl import read_jsonl
from compress.lineage import read_json, write_json
from compress.models import load_model, load_tokenizer, save_checkpoint
from compress.serving.vllm_server import ServerSpec, VLLMServer
from evaluation.plots import read_loss_log
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm
from tests.distill_data import TEACHER, distill_job, make_distill_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_distill_data(tmp_path_factory.mktemp("distill-data"), n=32, k=8)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """The tiny teacher cut to its first 4 layers: a student that has something to learn."""
    model, tok = load_model(TEACHER), load_tokenizer(TEACHER)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    out = tmp_path_factory.mktemp("student") / "s"
    save_checkpoint(model, tok, out)
    return out


def _cfg(**kw) -> DistillConfig:
    train = {"max_steps": 6, "batch_size": 8, "learning_rate": 2e-3, "warmup_ratio": 0.0} | kw.pop("train", {})
    return DistillConfig(**({"save_steps": 0} | kw), train=train)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_config_lists_every_loss():
    assert set(typing.get_args(KDLoss)) == set(LOSSES)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="hidden_weight > 0 needs teacher_source: online"):
        DistillConfig(hidden_weight=1.0)
    with pytest.raises(ValueError, match="multiple of num_processes"):
        DistillConfig(num_processes=3, train={"batch_size": 8})


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_from_the_cache_and_logs_kd_and_ce(loss, data, student, tmp_path):
    log = tmp_path / "log.jsonl"
    m = distill_student(distill_job(student, data, _cfg(loss=loss), tmp_path / "out", log_path=log))
    rows = read_loss_log(log)
    assert m["steps"] == 6 and rows and all({"loss", "kd", "ce", "step"} <= r.keys() for r in rows)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kd"], r["ce"]])).all() for r in rows)
    # The logged loss is the mix of the logged parts (same window, same token count).
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-3, abs=1e-5)
    assert _max_diff(_weights(tmp_path / "out"), _weights(student)) > 0
    assert not (tmp_path / "out.trainer").exists()


def test_online_teacher_equals_cache_when_k_is_the_vocabulary(tmp_path, student):
    """With k = V the cached top-k is the whole distribution: online and cached KD see the same losses."""
    vocab = load_model(TEACHER).config.vocab_size
    full = make_distill_data(tmp_path / "full", n=16, k=vocab)
    cfg = {"loss": "jsd", "train": {"max_steps": 3, "batch_size": 8}}
    logs = {"cached": tmp_path / "cached.jsonl", "online": tmp_path / "online.jsonl"}
    distill_student(distill_job(student, full, _cfg(**cfg), tmp_path / "c", log_path=logs["cached"]))
    online = _cfg(teacher_source="online", **cfg)
    distill_student(
        distill_job(student, full, online, tmp_path / "o", logits_dir=None, teacher=TEACHER, log_path=logs["online"])
    )
    cached, live = read_loss_log(logs["cached"]), read_loss_log(logs["online"])
    assert len(cached) == len(live) == 3
    # Step 1 starts from the same weights: the same KD up to float32 rounding of the teacher's forward
    # (batched and padded online, one sequence at a time in the cache). Adam then amplifies such
    # rounding in near-zero gradients, so later steps agree less tightly.
    assert live[0]["kd"] == pytest.approx(cached[0]["kd"], rel=1e-4)
    assert [r["kd"] for r in live] == pytest.approx([r["kd"] for r in cached], rel=1e-2)


def test_sampled_cache_estimates_the_dense_kl(tmp_path, student):
    """A sampled cache ("Sparse Logit Sampling", ids drawn from p with their counts) trains with the
    unbiased estimator: with many draws its first-step forward KL is the dense one (k = V cache)."""
    vocab = load_model(TEACHER).config.vocab_size
    dense = make_distill_data(tmp_path / "dense", n=16, k=vocab)
    sampled = make_distill_data(tmp_path / "sampled", n=16, draws=4000)
    assert LogitCache(sampled / "logits").kind == "sampled"
    cfg = _cfg(loss="forward_kl", train={"max_steps": 3, "batch_size": 8})
    logs = {}
    for name, d in (("dense", dense), ("sampled", sampled)):
        logs[name] = (
            read_loss_log(tmp_path / f"{name}.jsonl")
            if distill_student(distill_job(student, d, cfg, tmp_path / name, log_path=tmp_path / f"{name}.jsonl"))
            else None
        )
    # Same completions (greedy), same CE; the KD estimate within a few percent of the exact value.
    assert logs["sampled"][0]["ce"] == pytest.approx(logs["dense"][0]["ce"], rel=1e-5)
    assert logs["sampled"][0]["kd"] == pytest.approx(logs["dense"][0]["kd"], rel=0.05)
    assert _max_diff(_weights(tmp_path / "sampled"), _weights(student)) > 0


def test_hidden_mse_with_a_projection_is_trained_and_not_saved(tmp_path, data):
    """A narrower student (width pruned): the learned projection maps its states to the teacher's."""
    from compress.config import PruneConfig
    from compress.prune.prune import prune_model, standalone_job

    texts = [r["prompt"] + r["completion"] for r in read_jsonl(data / "data" / "train.jsonl")]
    narrow = standalone_job(TEACHER, texts, PruneConfig(method="width", hidden_size=96), tmp_path / "narrow")
    prune_model(narrow, log=lambda _: 0)
    log = tmp_path / "log.jsonl"
    cfg = _cfg(teacher_source="online", hidden_weight=1.0, loss="forward_kl", save_steps=3)
    job = distill_job(tmp_path / "narrow", data, cfg, tmp_path / "out", logits_dir=None, teacher=TEACHER, log_path=log)
    m = distill_student(job)
    rows = read_loss_log(log)
    assert m["steps"] == 6 and all(r["hidden_mse"] > 0 for r in rows)
    assert rows[-1]["hidden_mse"] < rows[0]["hidden_mse"]
    _, info = type(load_model(tmp_path / "narrow")).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values()), info  # no projection weights, nothing missing
    assert not any("projection" in k for k in _weights(tmp_path / "out"))


def test_hidden_mse_matches_each_student_layer_with_the_teacher_layer_it_came_from():
    """A depth-pruned student kept teacher layers 0, 2, 3: its layer outputs are compared with those,
    not with evenly spaced ones (which would be 1, 3 and 4 here)."""
    torch.manual_seed(0)
    teacher = [torch.randn(2, 3, 8) for _ in range(5)]
    mask = torch.ones(2, 3, dtype=torch.bool)
    kept = [0, 2, 3]
    student = [teacher[i].clone() for i in kept]
    assert HiddenMSE(3, 5, 8, 8, layer_map=kept)(student, teacher, mask) == 0
    assert HiddenMSE(3, 5, 8, 8)(student, teacher, mask) > 0  # the spacing guess pairs other layers
    assert HiddenMSE(3, 5, 8, 8).pairs == [(1, 2), (2, 3), (3, 5)]
    for bad in ([0, 2], [0, 2, 5], [-1, 2, 3]):
        with pytest.raises(ValueError, match="layer map"):
            HiddenMSE(3, 5, 8, 8, layer_map=bad)


def test_the_pruned_layers_reach_the_hidden_state_loss(data, student, tmp_path):
    """distill_student hands the kept layers to the loss: a map that does not fit is refused."""
    cfg = _cfg(teacher_source="online", hidden_weight=1.0, loss="forward_kl")
    with pytest.raises(ValueError, match=r"layer map \[0\] does not fit"):
        distill_student(
            distill_job(student, data, cfg, tmp_path / "out", logits_dir=None, teacher=TEACHER, teacher_layers=[0])
        )


def test_gradient_accumulation_takes_the_same_steps(data, student, tmp_path):
    """batch 8 in one micro-batch, or two of 4: the loss is normalised by the step's token count."""
    one = distill_student(distill_job(student, data, _cfg(), tmp_path / "one", log_path=tmp_path / "1"))
    cfg = _cfg(train={"gradient_accumulation_steps": 2})
    two = distill_student(distill_job(student, data, cfg, tmp_path / "two", log_path=tmp_path / "2"))
    assert one["steps"] == two["steps"] == 6
    a, b = read_loss_log(tmp_path / "1"), read_loss_log(tmp_path / "2")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5


def test_a_packed_row_gives_each_example_its_own_logits():
    """Padding-free packing: examples share a row but not attention; each token's logits are those
    of the example run alone, and every example's tokens and targets are in the batch."""
    model, tok = load_model(TEACHER), load_tokenizer(TEACHER)
    texts = [("sum 12+7=", "91"), ("rev abcde=", "edcba"), ("ord zyxwvutsrqpon=", "nopqrstuvwxyz"), ("rr ab=", "cb")]
    examples = [encode_example(tok, p, tok(a + "\n", add_special_tokens=False)["input_ids"]) for p, a in texts]
    batch = make_collator(tok.pad_token_id, None, pack=True)(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(examples)
    assert int((batch["labels"] != -100).sum()) == sum(sum(x != -100 for x in ex["labels"][1:]) for ex in examples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            # Find the example in the packed rows by its tokens and its positions from 0.
            r, at = next(
                (r, at)
                for r in range(batch["input_ids"].shape[0])
                for at in range(batch["input_ids"].shape[1] - ids.shape[1] + 1)
                if batch["position_ids"][r, at] == 0
                and torch.equal(batch["input_ids"][r, at : at + ids.shape[1]], ids[0])
            )
            assert torch.allclose(packed[r, at : at + ids.shape[1]], alone, atol=1e-5)


@pytest.mark.parametrize("source", ["cache", "online"])
def test_packed_batches_train_like_padded_ones(source, data, student, tmp_path):
    """``train.pack``: the same loss curve and weights as padded batches, cached or online teacher."""
    kw = {"teacher_source": "online"} if source == "online" else {}
    teacher_fields = {"logits_dir": None, "teacher": TEACHER} if source == "online" else {}
    runs = {}
    for pack in (False, True):
        cfg = _cfg(train={"pack": pack}, **kw)
        out, log = tmp_path / f"p{pack}", tmp_path / f"p{pack}.jsonl"
        distill_student(distill_job(student, data, cfg, out, log_path=log, **teacher_fields))
        runs[pack] = (read_loss_log(log), _weights(out))
    (a, wa), (b, wb) = runs[False], runs[True]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["kd"] for r in a] == pytest.approx([r["kd"] for r in b], rel=1e-4)
    assert _max_diff(wa, wb) < 1e-5 and _max_diff(wb, _weights(student)) > 1e-3


def test_vocab_padding_is_aligned_and_other_tokenizers_are_refused(tmp_path):
    teacher, tok = load_model(TEACHER), load_tokenizer(TEACHER)
    padded = load_model(TEACHER)
    padded.resize_token_embeddings(teacher.config.vocab_size + 13)
    assert shared_vocab(padded, teacher, tok, tok) == teacher.config.vocab_size
    other = load_tokenizer(TEACHER)
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        shared_vocab(padded, teacher, other, tok)


def _job_file(tmp_path: Path, data: Path, student: Path, out: Path, cfg: DistillConfig) -> Path:
    job = distill_job(student, data, cfg, out, log_path=out.with_name(out.name + ".log.jsonl"))
    path = tmp_path / f"{out.name}.job.json"
    write_json(path, job.model_dump(mode="json"))
    return path


def _launch(job_file: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compress.distill.worker", str(job_file)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_in_the_middle_then_resume_gives_the_same_weights(data, student, tmp_path):
    cfg = _cfg(save_steps=4, train={"max_steps": 12, "batch_size": 8})
    straight = _launch(_job_file(tmp_path, data, student, tmp_path / "straight", cfg))
    assert straight.wait(600) == 0, straight.stderr.read().decode()[-2000:]

    job = _job_file(tmp_path, data, student, tmp_path / "killed", cfg)
    proc = _launch(job)
    ckpt = tmp_path / "killed.trainer" / "checkpoint-8"
    deadline = time.monotonic() + 600
    while not (ckpt / "trainer_state.json").is_file():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()  # no student yet: it really died mid-run

    resumed = _launch(job)
    assert resumed.wait(600) == 0, resumed.stderr.read().decode()[-2000:]
    result = read_json(job.with_name("result.json"))
    assert result["resumed_from_step"] >= 8 and result["steps"] == 12
    # Trainer restores weights, optimizer, scheduler, RNG and the data position: the same run.
    diff = _max_diff(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"))
    print(f"resumed from step {result['resumed_from_step']}: max weight difference {diff:.3g}")
    assert diff <= 1e-6
    log = read_loss_log(tmp_path / "killed.log.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in read_loss_log(tmp_path / "straight.log.jsonl")]


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one(data, student, tmp_path):
    """torchrun with 2 gloo processes, 4 sequences each, against 1 process with the global batch of 8."""
    logs = {}
    for n in (1, 2):
        cfg = _cfg(num_processes=n, train={"max_steps": 6, "batch_size": 8})
        out = tmp_path / f"p{n}"
        logs[n] = tmp_path / f"p{n}.jsonl"
        m = distill_student(distill_job(student, data, cfg, out, log_path=logs[n]))
        assert m["steps"] == 6 and m["processes"] == n
    one, two = read_loss_log(logs[1]), read_loss_log(logs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two]
    # Same global batches in a different order of summation (gloo all-reduce): float32 rounding only.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert [r["kd"] for r in two] == pytest.approx([r["kd"] for r in one], rel=1e-4, abs=1e-6)
    rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two, strict=True))
    diff = _max_diff(_weights(tmp_path / "p1"), _weights(tmp_path / "p2"))
    print(f"2 processes vs 1: loss curve max relative difference {rel:.3g}, max weight difference {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.slow
def test_lora_student_is_a_plain_checkpoint_that_vllm_serves(data, student, tmp_path):
    require_vllm()
    cfg = _cfg(lora={"r": 8, "alpha": 16}, train={"max_steps": 6, "batch_size": 8, "learning_rate": 5e-2})
    distill_student(distill_job(student, data, cfg, tmp_path / "lora-student"))
    out = tmp_path / "lora-student"
    assert (out / "lora" / "adapter_config.json").is_file()
    weights = _weights(out)
    assert not any("lora" in k for k in weights)
    model, info = type(load_model(student)).from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    assert _max_diff(weights, _weights(student)) > 1e-4  # the adapters were merged in

    tok = load_tokenizer(out)
    prompts = [r["prompt"] for r in read_jsonl(data / "data" / "train.jsonl")][:4]
    want = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.eval().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        want.append(gen[0, ids.shape[1] :].tolist())
    spec = ServerSpec(model_dir=out, python=VLLM_PYTHON, dtype="float32", max_model_len=128)
    server = VLLMServer(spec, tmp_path / "vllm.log")
    with server:
        for p, w in zip(prompts, want, strict=True):
            body = {
                "model": server.served_name, "prompt": tok(p, add_special_tokens=False)["input_ids"], "max_tokens": 6,
                "temperature": 0.0, "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True,
            }  # fmt: skip
            r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60, headers=server.headers)
            r.raise_for_status()
            got = parse_choice(r.json()["choices"][0], 1).ids
            assert got[: len(w)] == w
