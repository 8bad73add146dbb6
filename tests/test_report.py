"""The report is a function of the run directory: summary, report.md, plots, model card, gate verdicts.

Built here from hand-written run files (no model is run), then rebuilt by ``distillflow report``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from compress.config import PipelineConfig
from compress.lineage import sha256_path
from evaluation.build import build_report, failed_gates, write_run_files
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def _scores(em: float, stderr: float = 0.01) -> dict:
    return {"taskworld": {"exact_match": {"value": em, "stderr": stderr}}}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "r1"
    cfg = PipelineConfig(
        name="r1",
        runs_dir=tmp_path / "runs",
        teacher={"path": str(ROOT / "assets" / "teacher-tiny")},
        evaluate={"gates": ["student >= 0.95 * teacher", "student.params <= 0.55 * teacher.params"]},
    )
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    student = run / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    (student / "model.safetensors").write_bytes(b"weights")
    models = {
        "teacher": {"params": 1000, "scores": _scores(1.0, 0.0), "path": str(ROOT / "assets" / "teacher-tiny")},
        "pruned": {"params": 500, "scores": _scores(0.5), "path": str(run / "pruned"), "tokens_trained": 0},
        "sft": {"params": 500, "scores": _scores(0.8), "path": str(run / "sft")},
        "student": {
            "params": 500,
            "scores": _scores(0.9),
            "path": str(student),
            "serving": {"tokens_per_s": 812.5},
            "tokens_trained": 123456,
        },
    }
    stages = {
        "prune": {"cached": True, "seconds": 0.3, "ran_seconds": 41.5, "peak_rss_mb": 310.2, "ran_peak_rss_mb": 2048.4},
        "distill_student": {"cached": False, "seconds": 60.0, "ran_seconds": 60.0, "peak_rss_mb": 1536.0},
    }
    write_run_files(run, models, stages, data=None)
    logs = run / "logs"
    logs.mkdir()
    rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)]
    (logs / "train-student.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {
        "stages": {
            "prune": {
                "inputs": {"teacher": "a" * 64},
                "outputs": {"pruned": "b" * 64},
                "code_version": "0.1.0+abc",
                "recorded_at": "2026-01-01T00:00:00+0000",
                "result": {"method": "depth", "selection": "importance"},
                "packages": {"torch": "2.13.0"},
            },
            "distill_student": {"result": {"steps": 30, "examples": 100, "train_tokens": 123456}},
        }
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_build_report_from_files(run_dir):
    before = sha256_path(run_dir / "student")
    summary = build_report(run_dir)
    assert summary["models"]["student"]["score"] == 0.9 and summary["models"]["student"]["throughput"] == 812.5
    gates = {g["gate"]: g for g in summary["gates"]}
    assert not gates["student >= 0.95 * teacher"]["passed"]
    assert gates["student.params <= 0.55 * teacher.params"]["passed"]
    line = failed_gates(summary)
    assert "1 of 2" in line and "student.taskworld.exact_match = 0.9" in line and "0.9 >= 0.95" in line

    report = (run_dir / "report.md").read_text()
    head = "| model | exact_match ↑ | ± stderr | params | tokens trained | score / teacher | params / teacher |"
    assert head in report
    assert "| KD student | 0.9000 | 0.0100 | 500 | 123,456 | 0.900 | 0.500 | 812 |" in report
    assert "| teacher | 1.0000 | 0.0000 | 1,000 | - | 1.000 | 1.000 | - |" in report
    assert "| pruned (no training) | 0.5000 | 0.0100 | 500 | 0 | 0.500 | 0.500 | - |" in report
    assert "| `student >= 0.95 * teacher` | **FAIL** |" in report
    assert "| prune | cache hit | 0.3 | 310 | 41.5 | 2,048 |" in report
    assert "| distill_student | ran | 60.0 | 1,536 | 60.0 | 1,536 |" in report
    assert "| taskworld / exact_match ↑ | 1.0000 ± 0.0000 | 0.5000 ± 0.0100 |" in report
    for plot in ("scores.png", "vs_teacher.png", "loss.png"):
        assert f"(plots/{plot})" in report
        assert (run_dir / "plots" / plot).read_bytes().startswith(PNG)

    card = (run_dir / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "depth pruning by importance, 1,000 to 500 parameters (50.0%)" in card
    assert "for 30 steps (123,456 completion tokens)" in card
    assert "| KD student | 0.9000 | 0.0100 | 500 | 123,456 | 0.900 |" in card
    assert "| prune | teacher `aaaaaaaaaaaa` | pruned `bbbbbbbbbbbb` | 0.1.0+abc |" in card
    assert f"distillflow run {run_dir / 'config.yaml'}" in card
    assert "FAIL: gate 'student >= 0.95 * teacher' not met" in card
    # The card describes the checkpoint; it is not part of its content hash (no cache invalidation).
    assert sha256_path(run_dir / "student") == before
    assert json.loads((run_dir / "summary.json").read_text())["gates"] == summary["gates"]


def test_cli_report_rebuilds_and_fails_on_a_gate(run_dir):
    build_report(run_dir)
    first = (run_dir / "report.md").read_text()
    for f in ("report.md", "summary.json", "plots/scores.png", "student/README.md"):
        (run_dir / f).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "report", str(run_dir)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert (run_dir / "report.md").read_text() == first
    assert (run_dir / "plots" / "scores.png").is_file() and (run_dir / "student" / "README.md").is_file()
    assert "FAIL  gate 'student >= 0.95 * teacher' not met" in proc.stdout
    assert "prune" in proc.stdout and "(ran in 41.5s, peak 2,048 MiB)" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 of 2 evaluate.gates not met")

    # Gates changed in the run's config: the report is rebuilt without re-running anything.
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["evaluate"]["gates"] = ["student >= 0.85 * teacher"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "report", str(run_dir)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "PASS  gate 'student >= 0.85 * teacher' met" in proc.stdout


def test_cli_report_without_results_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}/eval/results.json: not found (has the run "
                                                 "finished its evaluate stages?)"]  # fmt: skip


def test_language_nll_column_and_floor(run_dir):
    """With the language evaluated, every model's NLL (nats per character, from lm-eval's bits per byte)
    stands beside its score, and the floor of the held-out texts is stated."""
    import math

    from compress.lineage import read_json, write_json
    from evaluation.report import format_table

    results = read_json(run_dir / "eval" / "results.json")
    for name, bpb in (("teacher", 2.0), ("pruned", 3.0), ("sft", 2.6), ("student", 2.2)):
        results[name]["scores"]["language"] = {"bits_per_byte": {"value": bpb, "stderr": None}}
    write_json(run_dir / "eval" / "results.json", results)
    write_json(
        run_dir / "eval" / "tasks" / "language_floor.json", {"entropy": 1.3, "nll": 1.31, "chars": 900, "texts": 100}
    )
    summary = build_report(run_dir)
    assert summary["models"]["student"]["nll"] == pytest.approx(2.2 * math.log(2))
    assert summary["language_floor"]["entropy"] == 1.3
    report = (run_dir / "report.md").read_text()
    assert "| NLL ↓ |" in report and f"{2.2 * math.log(2):.4f}" in report and "1.3000 (mean exact entropy)" in report
    table = format_table(summary)
    assert "NLL" in table.splitlines()[0] and "floor there is 1.3000" in table


def _real_scores(wp: float, bpb: float, kl: float, top1: float) -> dict:
    """A real-model run's tasks: lm-eval's perplexities (direction recorded, as ``parse_scores`` keeps
    it) and our fidelity task (direction from the metric's name)."""
    down = {"stderr": None, "higher_is_better": False}
    return {
        "pydoc_ppl": {"word_perplexity": {"value": wp} | down, "bits_per_byte": {"value": bpb} | down},
        "fidelity": {"kl": {"value": kl, "stderr": 0.01}, "top1_agreement": {"value": top1, "stderr": 0.01}},
    }


@pytest.fixture
def lower_run(tmp_path):
    """A run whose headline (the first task's first metric) is a word perplexity."""
    run = tmp_path / "runs" / "real"
    run.mkdir(parents=True)
    gates = [
        "student.pydoc_ppl.word_perplexity <= 1.2 * teacher.pydoc_ppl.word_perplexity",
        "student.fidelity.top1_agreement >= 0.6",
        "student >= 0.9 * teacher",
    ]
    (run / "config.yaml").write_text(yaml.safe_dump({"evaluate": {"tasks": ["pydoc_ppl", "fidelity"], "gates": gates}}))
    models = {
        "teacher": {"params": 1000, "scores": _real_scores(20.0, 0.9, 0.0, 1.0), "path": "t"},
        "pruned": {"params": 500, "scores": _real_scores(7203.74, 2.2, 2.1, 0.31), "path": "p", "tokens_trained": 0},
        "student": {"params": 500, "scores": _real_scores(23.0, 1.0, 0.3, 0.7), "path": "s", "tokens_trained": 4096},
    }
    stages = {"distill_student": {"cached": False, "seconds": 12.0, "ran_seconds": 12.0, "peak_rss_mb": 777.7}}
    write_run_files(run, models, stages, data=None)
    return run


def test_lower_is_better_metrics_are_reported_the_right_way_round(lower_run):
    """A pruned model's word perplexity 360x the teacher's is a ratio of 0.003, not a retention of 360;
    every metric carries its arrow; the teacher's KL of 0 has no ratio; tokens and peak RSS are there."""
    from evaluation.plots import score_axis_label, vs_teacher_groups
    from evaluation.report import format_table, table_rows

    summary = build_report(lower_run)
    assert summary["headline"] == {"task": "pydoc_ppl", "metric": "word_perplexity"}
    assert summary["lower_is_better"] is True
    report = (lower_run / "report.md").read_text()
    assert "(lm-eval, lower is better)" in report
    head = "| model | word_perplexity ↓ | ± stderr | params | tokens trained | teacher / score | params / teacher |"
    assert head in report
    assert "| pruned (no training) | 7203.7400 | - | 500 | 0 | 0.003 | 0.500 |" in report
    assert "| KD student | 23.0000 | - | 500 | 4,096 | 0.870 | 0.500 |" in report
    assert "| teacher | 20.0000 | - | 1,000 | - | 1.000 | 1.000 |" in report
    assert "360" not in report.split("## Gates")[0]
    assert "teacher / score where lower is better (↓)" in report
    for row in (
        "| pydoc_ppl / bits_per_byte ↓ | 0.9000 | 2.2000 | 1.0000 |",
        "| fidelity / kl ↓ | 0.0000 ± 0.0100 | 2.1000 ± 0.0100 | 0.3000 ± 0.0100 |",
        "| fidelity / top1_agreement ↑ | 1.0000 ± 0.0100 | 0.3100 ± 0.0100 | 0.7000 ± 0.0100 |",
        "| pydoc_ppl / word_perplexity ↓ | teacher / score | 1.000 | 0.003 | 0.870 |",
        "| fidelity / kl ↓ | teacher / score | - | - | - |",
        "| fidelity / top1_agreement ↑ | score / teacher | 1.000 | 0.310 | 0.700 |",
        "| distill_student | ran | 12.0 | 778 | 12.0 | 778 |",
    ):
        assert row in report, row
    assert "(plots/vs_teacher.png)" in report and (lower_run / "plots" / "vs_teacher.png").read_bytes().startswith(PNG)

    table = format_table(summary).splitlines()
    assert "word_perplexity ↓" in table[0] and "teacher/score" in table[0] and "tokens" in table[0]
    assert table[-1].split()[-2:] == ["0.870", "0.500"] and "4,096" in table[-1]
    assert "pydoc_ppl/word_perplexity ↓" in table_rows(summary)[0]

    assert score_axis_label(summary) == "pydoc_ppl word_perplexity ↓ (lower is better)"
    groups = dict(vs_teacher_groups(summary, ["pydoc_ppl", "fidelity"]))
    assert list(groups) == [
        "pydoc_ppl\nword_perplexity ↓\n(teacher / score)",
        "pydoc_ppl\nbits_per_byte ↓\n(teacher / score)",
        "fidelity\ntop1_agreement ↑\n(score / teacher)",
    ]  # the KL is left out: the teacher's own is 0
    assert groups["pydoc_ppl\nbits_per_byte ↓\n(teacher / score)"]["student"] == pytest.approx(0.9)


def test_gates_on_a_lower_is_better_headline(lower_run):
    """Explicit gates read the values as recorded; a bare 'student >= 0.9 * teacher' on a perplexity
    headline is refused (it would pass a worse model) and counts as failed, with the hint."""
    summary = build_report(lower_run)
    gates = {g["gate"]: g for g in summary["gates"]}
    ppl = gates["student.pydoc_ppl.word_perplexity <= 1.2 * teacher.pydoc_ppl.word_perplexity"]
    assert ppl["passed"] and ppl["left"] == 23.0 and ppl["right"] == pytest.approx(24.0)
    assert gates["student.fidelity.top1_agreement >= 0.6"]["passed"]
    bare = gates["student >= 0.9 * teacher"]
    assert not bare["passed"] and "word_perplexity is lower-is-better" in bare["message"]
    assert "student.pydoc_ppl.word_perplexity" in bare["message"]
    report = (lower_run / "report.md").read_text()
    assert "| `student >= 0.9 * teacher` | **FAIL** | evaluate.gates[2]:" in report


def test_tokens_trained_from_the_manifest():
    """Tokens trained per model come from the distill stages' records; pruning trains none."""
    from evaluation.report import tokens_trained

    manifest = {
        "stages": {
            "prune": {"result": {"method": "depth"}},
            "distill_student": {"result": {"steps": 3, "train_tokens": 900}},
            "distill_sft": {"result": {"steps": 3}},  # recorded before tokens were counted
        }
    }
    assert tokens_trained(manifest) == {"pruned": 0, "student": 900, "sft": None}
    assert tokens_trained({}) == {}
