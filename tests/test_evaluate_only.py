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


def test_unmet_gate_fails_the_flow_run_after_the_report(tmp_path, tiny_model_dir, prefect_home):
    from prefect.client.orchestration import get_client

    from compress.gates import GateFailed
    from flows.evaluate_only import evaluate_only

    cfg = EvaluateOnlyConfig(
        name="gated",
        runs_dir=tmp_path / "runs",
        models=[
            {"name": "teacher", "path": str(ROOT / "assets" / "teacher-tiny")},
            {"name": "random", "path": str(tiny_model_dir)},
        ],
        taskworld={"n_heldout": 20},
        evaluate={"batch_size": 20, "gates": ["random.params <= teacher.params", "random >= 0.9 * teacher"]},
    )
    state = evaluate_only(cfg, return_state=True)
    assert state.is_failed()
    random_em = json.loads((tmp_path / "runs" / "gated" / "summary.json").read_text())["models"]["random"]["score"]
    for text in (
        "GateFailed",
        "1 of 2 evaluate.gates not met",
        "gate 'random >= 0.9 * teacher' not met",
        f"random.taskworld.exact_match = {random_em:.4g}",
        "teacher.taskworld.exact_match = 1",
    ):
        assert text in state.message, (text, state.message)
    # Everything was written before the run failed: the report shows the verdicts.
    report = (tmp_path / "runs" / "gated" / "report.md").read_text()
    assert "| `random >= 0.9 * teacher` | **FAIL** |" in report
    assert "| `random.params <= teacher.params` | pass |" in report
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_failed()
    # A plain call (the CLI's) raises the gate's own exception; the evaluations are cache hits now.
    with pytest.raises(GateFailed, match=r"random >= 0\.9"):
        evaluate_only(cfg)
