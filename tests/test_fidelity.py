"""Fidelity to the teacher: KL(teacher || model) and top-1 agreement along the teacher's greedy answers."""

from __future__ import annotations

import pytest

from compress.config import FidelityConfig
from compress.data.taskworld import make_splits
from compress.jobs import Checkpoint, FidelityJob
from compress.jsonl import write_jsonl
from compress.models import load_tokenizer
from evaluation.fidelity import answers_path, evaluate_fidelity, fidelity_scores, teacher_answers
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "teacher-small"
OTHER = ROOT / "assets" / "teacher-tiny"  # same tokenizer, another network


def _prompts(n: int = 6) -> list[list[int]]:
    tok = load_tokenizer(TEACHER)
    rows, _ = make_splits(["rev", "max"], n, 2, 0)
    return [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]


def test_the_teacher_agrees_with_itself_and_another_model_does_not():
    prompts = _prompts()
    answers = teacher_answers(TEACHER, prompts, max_new_tokens=8)
    assert all(0 < len(a) <= 8 for a in answers)
    same, tokens = fidelity_scores(TEACHER, TEACHER, prompts, answers)
    assert tokens == sum(len(a) for a in answers)
    assert same["kl"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"]["value"] == 1.0  # greedy tokens are the teacher's argmax
    other, _ = fidelity_scores(TEACHER, OTHER, prompts, answers)
    assert other["kl"]["value"] > 0.01
    assert 0.0 <= other["top1_agreement"]["value"] <= 1.0
    assert other["kl"]["stderr"] is not None and other["kl"]["stderr"] >= 0


def _fidelity_job(tmp_path) -> FidelityJob:
    """Four held-out prompts of the task world (``prompt_ids``), the answers cached in ``fid/``."""
    tok = load_tokenizer(TEACHER)
    rows, _ = make_splits(["rev"], 4, 2, 0)
    prompts = write_jsonl(
        [{"prompt_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"]} for r in rows],
        tmp_path / "heldout_prompts.jsonl",
    )
    teacher = Checkpoint(path=TEACHER, identity="teacher-sha")
    return FidelityJob(teacher=teacher, prompts=prompts, prompts_sha=None, cache_dir=tmp_path / "fid")


def test_the_teachers_answers_are_made_once_per_run(tmp_path):
    job = _fidelity_job(tmp_path)
    fidelity = FidelityConfig(prompts=3, max_new_tokens=6)
    first = evaluate_fidelity(job, OTHER, fidelity)
    assert first["n"] == {"fidelity": 3} and first["tokens"] > 0
    kept = answers_path(tmp_path / "fid", "teacher-sha", [list(r["prompt_ids"]) for r in _read(job.prompts)[:3]], 6)
    assert kept.is_file()
    kept.write_text(kept.read_text().replace("[", "[1, ", 1))  # the second evaluation must read this file
    second = evaluate_fidelity(job, OTHER, fidelity)
    assert second["tokens"] == first["tokens"] + 1


def test_an_evaluation_with_the_teachers_answers_scores_fidelity_too(tmp_path):
    """``evaluate_checkpoint`` adds the fidelity scores and prompt count to lm-eval's, and only when
    ``evaluate.fidelity`` asks for them."""
    from compress.config import EvaluateConfig, TaskWorldConfig
    from compress.data.taskworld import world_splits
    from evaluation.harness import evaluate_checkpoint, standalone_job, write_task

    _, heldout = world_splits(TaskWorldConfig(tasks=["rev"], n_train=10, n_heldout=4))
    tasks_dir = write_task(heldout, tmp_path / "tasks", max_gen_toks=8)
    job, fidelity = _fidelity_job(tmp_path), FidelityConfig(prompts=3, max_new_tokens=6)
    asked = EvaluateConfig(batch_size=8, fidelity=fidelity)
    res = evaluate_checkpoint(standalone_job(OTHER, asked, tasks_dir, fidelity=job))
    alone = evaluate_fidelity(job, OTHER, fidelity)
    assert res["scores"]["fidelity"] == alone["scores"]["fidelity"] and res["n"]["fidelity"] == 3
    assert "exact_match" in res["scores"]["taskworld"] and res["n"]["taskworld"] == 4
    unasked = evaluate_checkpoint(standalone_job(OTHER, EvaluateConfig(batch_size=8), tasks_dir, fidelity=job))
    assert "fidelity" not in unasked["scores"] and "fidelity" not in unasked["n"]
    assert unasked["scores"]["taskworld"] == res["scores"]["taskworld"]


def _read(path):
    from compress.jsonl import read_jsonl

    return read_jsonl(path)


def test_fidelity_needs_held_out_prompts():
    from compress.config import ConfigError, load_config
    from stages.preflight import preflight

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["evaluate.fidelity={}"])
    with pytest.raises(ConfigError, match=r"^evaluate\.fidelity: no data source holds prompts out"):
        preflight(cfg, full=False)
