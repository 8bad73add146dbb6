"""Which way a metric points: the name table, lm-eval's recorded direction (which wins), and the
ratio to the teacher that reads 1.0 = as good as the teacher for either direction."""

from __future__ import annotations

import pytest

from compress.metrics import (
    LOWER_IS_BETTER,
    arrow,
    base_name,
    lower_is_better,
    models_lower_is_better,
    retention,
    score_lower_is_better,
)


@pytest.mark.parametrize(
    ("metric", "lower"),
    [
        ("word_perplexity", True),
        ("byte_perplexity", True),
        ("bits_per_byte", True),
        ("perplexity", True),
        ("kl", True),
        ("nll", True),
        ("perplexity,none", True),
        ("bits_per_byte,remove_whitespace", True),
        ("acc", False),
        ("acc_norm", False),
        ("exact_match,strict-match", False),
        ("top1_agreement", False),
        ("pass@1,create_test", False),
    ],
)
def test_name_table(metric, lower):
    assert lower_is_better(metric) is lower
    assert arrow(lower) == ("↓" if lower else "↑")


def test_lm_eval_registry_agrees_with_the_table():
    """Every metric lm-eval registers as lower-is-better is in the table (ours add kl and nll)."""
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import HIGHER_IS_BETTER_REGISTRY, is_higher_better

    registered_lower = {name for name in HIGHER_IS_BETTER_REGISTRY if is_higher_better(name) is False}
    assert registered_lower and registered_lower <= LOWER_IS_BETTER
    assert LOWER_IS_BETTER - registered_lower == {"kl", "nll"}


def test_recorded_direction_wins():
    assert base_name("exact_match,strict-match") == "exact_match"
    assert lower_is_better("word_perplexity", higher_is_better=True) is False
    assert lower_is_better("my_loss", higher_is_better=False) is True
    assert score_lower_is_better("my_loss", {"value": 1.0, "higher_is_better": False}) is True
    assert score_lower_is_better("my_loss", {"value": 1.0}) is False
    models = {
        "teacher": {"scores": {"t": {"my_loss": {"value": 1.0}}}},
        "student": {"scores": {"t": {"my_loss": {"value": 2.0, "higher_is_better": False}}}},
    }
    assert models_lower_is_better(models, "t", "my_loss") is True
    assert models_lower_is_better(models, "t", "kl") is True  # not among the results: the name decides


@pytest.mark.parametrize(
    ("value", "teacher", "lower", "expected"),
    [
        (0.9, 1.0, False, 0.9),
        (0.0, 0.8, False, 0.0),
        (7203.74, 20.0, True, 20.0 / 7203.74),  # 360x the teacher's perplexity: 0.0028, not 360
        (25.0, 20.0, True, 0.8),
        (18.0, 20.0, True, 20.0 / 18.0),  # better than the teacher: above 1
        (0.3, 0.0, True, None),  # the teacher's KL to itself is 0: no ratio means anything
        (0.0, 0.5, True, None),
        (0.5, 0.0, False, None),
        (None, 1.0, False, None),
        (1.0, None, True, None),
    ],
)
def test_retention(value, teacher, lower, expected):
    got = retention(value, teacher, lower)
    assert got == (None if expected is None else pytest.approx(expected))


def test_parse_scores_keeps_lm_eval_direction():
    """The shape ``lm_eval.simple_evaluate`` returns: ``results`` and ``higher_is_better`` per task,
    the latter keyed by the metric without its filter."""
    from evaluation.harness import parse_scores

    results = {
        "distillflow_language": {"alias": "x", "bits_per_byte,none": 1.5, "bits_per_byte_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": 0.01},
        "mine": {"score,none": 2.0},
    }
    directions = {"distillflow_language": {"bits_per_byte": False}, "gsm8k": {"exact_match": True}, "mine": {}}
    scores = parse_scores(results, directions)
    assert scores["language"] == {"bits_per_byte": {"value": 1.5, "stderr": None, "higher_is_better": False}}
    assert scores["gsm8k"]["exact_match,strict-match"]["higher_is_better"] is True
    assert "higher_is_better" not in scores["mine"]["score"]
    assert parse_scores(results) == {t: {m: {"value": v["value"], "stderr": v["stderr"]} for m, v in ms.items()}
                                     for t, ms in scores.items()}  # fmt: skip


@pytest.mark.slow
def test_a_real_lm_eval_run_records_each_direction(tmp_path):
    """lm-eval's own results carry the direction of exact match (up) and bits per byte (down)."""
    from compress.config import EvaluateConfig, TaskWorldConfig
    from compress.data.language import language_of
    from compress.data.taskworld import world_splits
    from evaluation.harness import evaluate_checkpoint, standalone_job, write_task
    from tests.conftest import ROOT

    world = TaskWorldConfig(tasks=["rev", "lang"], n_train=10, n_heldout=8)
    _, heldout = world_splits(world)
    tasks_dir = write_task(heldout, tmp_path, max_gen_toks=8, language=language_of(world))
    model = ROOT / "assets" / "teacher-tiny"
    res = evaluate_checkpoint(standalone_job(model, EvaluateConfig(batch_size=8), tasks_dir, label="t"))
    assert res["scores"]["taskworld"]["exact_match"]["higher_is_better"] is True
    assert res["scores"]["language"]["bits_per_byte"]["higher_is_better"] is False
