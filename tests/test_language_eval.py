"""The language's held-out texts through lm-eval (``loglikelihood_rolling``), checked against a direct
computation of the same per-character NLL, and the floor written beside them."""

from __future__ import annotations

import json
import math

import pytest

from compress.bootstrap import text_nll
from compress.config import ConfigError, EvaluateConfig, TaskWorldConfig
from compress.data.language import floor, language_of
from compress.data.taskworld import END, world_splits
from compress.models import load_model, load_tokenizer
from evaluation.tasks import lm_eval_names
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "teacher-tiny"
WORLD = TaskWorldConfig(tasks=["rev", "lang"], n_train=10, n_heldout=40)


def test_written_tasks_split_exact_match_and_language(tmp_path):
    from evaluation.harness import write_task

    _, heldout = world_splits(WORLD)
    out = write_task(heldout, tmp_path, max_gen_toks=8, language=language_of(WORLD))
    rows = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    docs = [json.loads(x)["text"] for x in (out / "language.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"rev"} and len(docs) == 20
    assert all(d.endswith(END) for d in docs)
    assert json.loads((out / "language_floor.json").read_text()) == floor(language_of(WORLD), docs)
    assert lm_eval_names(EvaluateConfig(), out) == ["distillflow_taskworld", "distillflow_language"]
    # A world of the language alone has no exact-match task.
    _, only = world_splits(TaskWorldConfig(tasks=["lang"], n_heldout=5))
    assert lm_eval_names(EvaluateConfig(), write_task(only, tmp_path / "only", 8)) == ["distillflow_language"]


@pytest.mark.slow
def test_lm_eval_rolling_nll_is_the_per_character_nll(tmp_path):
    """lm-eval's bits per byte, in nats, equals the model's own NLL per character scored from BOS: the
    texts are one byte per character and one token per character, the end marker included."""
    from evaluation.harness import LANGUAGE_METRIC, evaluate_checkpoint, standalone_job, write_task

    _, heldout = world_splits(WORLD)
    tasks_dir = write_task(heldout, tmp_path / "tasks", max_gen_toks=8, language=language_of(WORLD))
    res = evaluate_checkpoint(standalone_job(TEACHER, EvaluateConfig(batch_size=8), tasks_dir, label="teacher"))
    nll = res["scores"]["language"][LANGUAGE_METRIC]["value"] * math.log(2)
    texts = [json.loads(x)["text"] for x in (tasks_dir / "language.jsonl").read_text().splitlines()]
    direct = text_nll(load_model(TEACHER), load_tokenizer(TEACHER), [t.removesuffix(END) + END for t in texts])
    assert nll == pytest.approx(direct, rel=1e-4)
    assert "exact_match" in res["scores"]["taskworld"]


def test_plan_lists_the_language_and_gates_may_name_it():
    from evaluation.tasks import check_tasks
    from stages.evaluate import check_evaluation

    cfg = EvaluateConfig(gates=["student.language.bits_per_byte <= 1.5 * teacher.language.bits_per_byte"])
    tasks = check_tasks(cfg, ["rev", "lang"])
    assert [t["lm_eval"] for t in tasks] == ["distillflow_taskworld", "distillflow_language"]
    check_evaluation(cfg, ["teacher", "student"], tasks)  # no error: the language is an evaluated task
    assert [t["lm_eval"] for t in check_tasks(cfg, ["rev"])] == ["distillflow_taskworld"]

    # Each family's exact match is a task that gates and the headline may name.
    assert tasks[0]["families"] == ["taskworld_rev"]
    per_family = EvaluateConfig(gates=["student.taskworld_rev.exact_match >= 0.9 * teacher.taskworld_rev.exact_match"])
    check_evaluation(per_family, ["teacher", "student"], tasks)
    with pytest.raises(ConfigError, match="taskworld_max"):
        check_evaluation(EvaluateConfig(gates=["student.taskworld_max.exact_match >= 0.5"]), ["student"], tasks)
