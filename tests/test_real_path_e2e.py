"""The real-model path of `make real`, end to end through the Prefect flow on the tiny chat teacher.

`configs/smollm2.yaml` in miniature: self-instruct prompts drawn by the vLLM-served teacher (with
held-out prompts), pruning calibrated on the pydoc calibration topics, generation, KD and SFT,
then every model scored on a shipped real-text task (pydoc perplexity) and on fidelity to the
teacher, with the report's lower-is-better handling, tokens trained and peak RSS. A second plan of
the same config finds every stage a cache hit.
"""

from __future__ import annotations

import json

import pytest

from compress.config import PipelineConfig
from compress.jsonl import read_jsonl
from tests.conftest import VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow
SELF_INSTRUCT = {"type": "self_instruct", "n": 16, "heldout": 4, "temperature": 2.0, "max_tokens": 24, "min_chars": 1,
                 "oversample": 8}  # fmt: skip
METRICS = [("pydoc_ppl", "bits_per_byte"), ("pydoc_ppl", "word_perplexity"), ("fidelity", "kl"),
           ("fidelity", "top1_agreement")]  # fmt: skip


def _config(tmp_path, teacher_dir) -> PipelineConfig:
    from evaluation.realtext import write_training_files

    text = write_training_files(tmp_path / "text")
    return PipelineConfig.model_validate(
        {
            "name": "real-path",
            "runs_dir": str(tmp_path / "runs"),
            "teacher": {"path": str(teacher_dir)},
            "data": {"sources": [SELF_INSTRUCT]},
            "prune": {
                "num_layers": 2,
                "calibration_samples": 8,
                "calibration_seq_len": 64,
                "calibration_source": {"path": str(text["calibration"]), "prompt_field": "text"},
            },
            "generate": {"vllm_python": str(VLLM_PYTHON), "top_k": 4, "max_tokens": 12, "dtype": "float32"},
            "distill": {"train": {"max_steps": 3, "batch_size": 8}},
            "evaluate": {
                # pydoc_ppl scores in rolling windows of the tiny teacher's 128 positions; HumanEval's
                # solutions are longer than that (tests/test_realtext.py scores it with a longer context).
                "tasks": ["pydoc_ppl"],
                "limit": 2,
                "batch_size": 4,
                "headline": "pydoc_ppl/bits_per_byte",
                "fidelity": {"prompts": 4, "max_new_tokens": 8},
                "gates": ["student.fidelity.kl > teacher.fidelity.kl", "student.params <= 0.6 * teacher.params"],
            },
        }
    )


def test_real_path_end_to_end_then_cached(tmp_path, tiny_chat, prefect_home):
    require_vllm()
    from flows.compress import compress_pipeline
    from flows.plan import cache_status
    from stages.preflight import preflight

    cfg = _config(tmp_path, tiny_chat)
    summary = compress_pipeline(cfg).summary
    run = tmp_path / "runs" / "real-path"

    # Self-instruct: training and held-out prompts, disjoint, the held-out file an output of prepare.
    train, held = read_jsonl(run / "data" / "prompts.jsonl"), read_jsonl(run / "data" / "heldout_prompts.jsonl")
    assert len(train) == 16 and len(held) == 4
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    manifest = json.loads((run / "manifest.json").read_text())
    assert "heldout" in manifest["stages"]["prepare"]["outputs"]

    # Every model on every real-text metric and on fidelity, lower-is-better ones marked as such.
    models = summary["models"]
    assert tuple(models) == ("teacher", "pruned", "sft", "student")
    for name, m in models.items():
        for task, metric in METRICS:
            assert m["scores"][task][metric]["value"] >= 0, (name, task, metric)
        assert m["scores"]["pydoc_ppl"]["bits_per_byte"]["higher_is_better"] is False
    assert models["teacher"]["scores"]["fidelity"]["kl"]["value"] == pytest.approx(0, abs=1e-5)
    assert models["teacher"]["scores"]["fidelity"]["top1_agreement"]["value"] == 1.0
    for name in ("pruned", "sft", "student"):
        assert models[name]["scores"]["fidelity"]["kl"]["value"] > 1e-3
    assert models["student"]["tokens_trained"] > 0 and models["sft"]["tokens_trained"] > 0
    assert all(g["passed"] for g in summary["gates"]), summary["gates"]
    assert all(s["peak_rss_mb"] > 0 for s in summary["stages"].values())
    report = (run / "report.md").read_text()
    assert "bits_per_byte ↓" in report and "fidelity / kl ↓" in report and "teacher / score" in report

    # Nothing changed: a plan of the same config predicts a cache hit for every stage.
    status = dict(cache_status(cfg, preflight(cfg, full=False)))
    assert set(status.values()) == {"cache hit"}, status
