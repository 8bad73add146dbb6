"""The whole Prefect flow on a tiny config: real vLLM server, real training, real lm-eval."""

import json
import shutil

import pytest

from compress.config import PipelineConfig
from tests.conftest import VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow
MODELS = ("teacher", "pruned", "sft", "student")


def _config(tmp_path, teacher_dir) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "e2e",
            "runs_dir": str(tmp_path / "runs"),
            "teacher": {"path": str(teacher_dir)},
            "taskworld": {"tasks": ["rev", "max"], "n_train": 48, "n_heldout": 12, "seed": 0},
            "prune": {"num_layers": 2, "calibration_samples": 16},
            "generate": {"vllm_python": str(VLLM_PYTHON), "top_k": 4, "max_tokens": 6, "dtype": "float32"},
            "distill": {"train": {"max_steps": 4, "batch_size": 16}},
            "evaluate": {"batch_size": 16, "max_gen_toks": 6},
        }
    )


def test_pipeline_end_to_end_then_cached(tmp_path, tiny_model_dir, prefect_home):
    require_vllm()
    from flows.compress import compress_pipeline
    from flows.plan import cache_status
    from stages.preflight import preflight

    cfg = _config(tmp_path, tiny_model_dir)
    result = compress_pipeline(cfg)
    run = tmp_path / "runs" / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary == result.summary
    assert summary["metric"] == "exact_match"
    assert tuple(summary["models"]) == MODELS
    assert summary["headline"] == {"task": "taskworld", "metric": "exact_match"}
    for m in summary["models"].values():
        assert m["params"] > 0 and 0.0 <= m["score"] <= 1.0
        assert m["score"] == m["scores"]["taskworld"]["exact_match"]["value"]
    assert summary["models"]["pruned"]["params"] < summary["models"]["teacher"]["params"]
    assert summary["models"]["student"]["params"] == summary["models"]["pruned"]["params"]
    assert all(s["cached"] is False for s in summary["stages"].values())

    manifest = json.loads((run / "manifest.json").read_text())
    for stage in ("prepare", "prune", "generate", "distill_student", "distill_sft", "evaluate_teacher"):
        rec = manifest["stages"][stage]
        assert rec["config_hash"] and rec["inputs"] and rec["packages"]["torch"]
    assert len(manifest["stages"]["generate"]["outputs"]["logits"]) == 64
    for path in (
        "pruned/config.json",
        "student/config.json",
        "sft/config.json",
        "data/train.jsonl",
        "logits/cache.json",
        "eval/results.json",
        "report.md",
        "plots/scores.png",
        "importance.json",
    ):
        assert (run / path).exists(), path

    # `plan` predicts the cache from the manifest: every stage a hit now.
    status = dict(cache_status(cfg, preflight(cfg, full=False)))
    assert set(status.values()) == {"cache hit"} and len(status) == len(summary["stages"]), status

    # Unchanged re-run: every stage is a cache hit, results identical.
    again = compress_pipeline(cfg).summary
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]
    assert {k: v["score"] for k, v in again["models"].items()} == {k: v["score"] for k, v in summary["models"].items()}

    # As a subflow of another flow: the same typed result, every stage a hit.
    from prefect import flow

    @flow
    def parent() -> float:
        return compress_pipeline(cfg).summary["models"]["student"]["score"]

    assert parent() == summary["models"]["student"]["score"]

    # --force evaluate re-runs the evaluations only; plan predicts it.
    forced = cfg.model_copy(update={"force": ["evaluate"]})
    status = dict(cache_status(forced, preflight(forced, full=False)))
    assert [s for s, v in status.items() if v == "will run"] == [s for s in status if s.startswith("evaluate_")]
    stages = compress_pipeline(forced).summary["stages"]
    assert all(v["cached"] != k.startswith("evaluate_") for k, v in stages.items()), stages

    # A change to distill re-runs distill and what follows, not prune or generate.
    changed = cfg.model_copy(deep=True)
    changed.distill.train.max_steps = 5
    status = dict(cache_status(changed, preflight(changed, full=False)))
    assert status["prepare"] == status["prune"] == status["generate"] == status["evaluate_teacher"] == "cache hit"
    assert status["distill_student"] == status["evaluate_student"] == "will run"
    stages = compress_pipeline(changed).summary["stages"]
    assert stages["prune"]["cached"] and stages["generate"]["cached"] and stages["evaluate_teacher"]["cached"]
    assert not stages["distill_student"]["cached"] and not stages["evaluate_student"]["cached"]

    # Deleted outputs are rebuilt, not served from a stale cache.
    shutil.rmtree(run / "pruned")
    stages = compress_pipeline(changed).summary["stages"]
    assert not stages["prune"]["cached"] and (run / "pruned" / "config.json").exists()

    # With the online teacher no student reads the logit cache, so generate runs again without
    # log-probs (about twice as fast) and both students train on its output; plan predicts it.
    # The hidden-state loss pairs each student layer with the teacher layer it was pruned from.
    online = changed.model_copy(deep=True)
    online.distill.teacher_source = "online"
    online.distill.hidden_weight = 0.1
    status = dict(cache_status(online, preflight(online, full=False)))
    assert status["prune"] == "cache hit"
    assert status["generate"] == status["distill_sft"] == status["distill_student"] == "will run"
    stages = compress_pipeline(online).summary["stages"]
    assert not stages["generate"]["cached"] and not stages["distill_student"]["cached"]
    assert not (run / "logits" / "cache.json").exists()
    recorded = json.loads((run / "manifest.json").read_text())["stages"]
    kept = recorded["prune"]["result"]["kept_layers"]
    assert len(kept) == 2 and recorded["distill_student"]["result"]["hidden_layers"] == kept
    assert set(dict(cache_status(online, preflight(online, full=False))).values()) == {"cache hit"}
