"""Fidelity to the teacher: KL(teacher || model) and top-1 agreement along the teacher's greedy answers."""

from __future__ import annotations

import pytest

from compress.data.taskworld import make_splits
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


def test_the_teachers_answers_are_made_once_per_run(tmp_path):
    tok = load_tokenizer(TEACHER)
    rows, _ = make_splits(["rev"], 4, 2, 0)
    prompts = write_jsonl(
        [{"prompt_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"]} for r in rows],
        tmp_path / "heldout_prompts.jsonl",
    )
    first = evaluate_fidelity(TEACHER, "teacher-sha", OTHER, prompts, 3, 6, tmp_path / "fid")
    assert first["n"] == {"fidelity": 3} and first["tokens"] > 0
    kept = answers_path(tmp_path / "fid", "teacher-sha", [list(r["prompt_ids"]) for r in _read(prompts)[:3]], 6)
    assert kept.is_file()
    kept.write_text(kept.read_text().replace("[", "[1, ", 1))  # the second evaluation must read this file
    second = evaluate_fidelity(TEACHER, "teacher-sha", OTHER, prompts, 3, 6, tmp_path / "fid")
    assert second["tokens"] == first["tokens"] + 1


def _read(path):
    from compress.jsonl import read_jsonl

    return read_jsonl(path)


def test_fidelity_needs_held_out_prompts():
    from compress.config import ConfigError, load_config
    from flows.plan import preflight

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["evaluate.fidelity={}"])
    with pytest.raises(ConfigError, match=r"^evaluate\.fidelity: no data source holds prompts out"):
        preflight(cfg, full=False)
