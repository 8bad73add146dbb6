"""The evaluate-only flow: existing checkpoints, the same tasks, cache and report as a full run."""

import json

import pytest

from compress.config import EvaluateOnlyConfig
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_evaluate_only_scores_and_caches(tmp_path, tiny_model_dir, prefect_home):
    from flows.evaluate_only import evaluate_only

    cfg = EvaluateOnlyConfig(
        runs_dir=tmp_path / "runs",
        models=[
            {"name": "teacher", "path": str(ROOT / "assets" / "teacher-tiny")},
            {"name": "random", "path": str(tiny_model_dir)},
        ],
        taskworld={"n_heldout": 20},
        evaluate={"batch_size": 20},
    )
    first = evaluate_only(cfg).summary
    assert set(first["models"]) == {"teacher", "random"}
    # The shipped teacher solves the task world; a random model does not.
    assert first["models"]["teacher"]["score"] == 1.0
    assert first["models"]["random"]["score"] < 0.5
    assert not any(s["cached"] for s in first["stages"].values())
    saved = json.loads((tmp_path / "runs" / "eval" / "summary.json").read_text())
    assert saved["models"]["teacher"]["scores"]["taskworld"]["exact_match"]["value"] == 1.0
    again = evaluate_only(cfg).summary
    assert all(s["cached"] for s in again["stages"].values())
    assert again["models"]["random"]["score"] == first["models"]["random"]["score"]
