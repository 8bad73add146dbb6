"""Per-family exact match of the task world, from lm-eval's per-example records."""

import math

import pytest

from evaluation.harness import family_scores, with_families


def _record(doc_id: int, task: str, em: float, filt: str = "none") -> dict:
    return {"doc_id": doc_id, "doc": {"task": task, "prompt": "p", "answer": "a"}, "filter": filt, "exact_match": em}


def test_families_are_means_with_the_stderr_of_a_mean():
    records = [_record(0, "addc", 1.0), _record(1, "mul", 0.0), _record(2, "addc", 0.0), _record(3, "addc", 1.0)]
    records += [_record(0, "addc", 0.0, filt="other")]  # a second filter's record of doc 0: not counted again
    out = family_scores(records)
    assert list(out) == ["taskworld_addc", "taskworld_mul"]
    (addc, n_addc), (mul, n_mul) = out["taskworld_addc"], out["taskworld_mul"]
    assert (n_addc, n_mul) == (3, 1)
    assert addc["exact_match"]["value"] == pytest.approx(2 / 3)
    # sample standard deviation of (1, 0, 1) over sqrt(3), as lm-eval's mean_stderr
    assert addc["exact_match"]["stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert mul["exact_match"] == {"value": 0.0, "stderr": None}


def test_records_without_a_family_are_left_out():
    assert family_scores([{"doc_id": 0, "doc": {"prompt": "p"}, "exact_match": 1.0}]) == {}
    assert family_scores([]) == {}


def test_families_follow_the_task_world_and_the_headline_stays_first():
    scores = {"taskworld": {"exact_match": {"value": 0.5}}, "language": {"bits_per_byte": {"value": 2.0}}}
    fam = {"taskworld_addc": {"exact_match": {"value": 0.4}}}
    assert list(with_families(scores, fam)) == ["taskworld", "taskworld_addc", "language"]
    assert list(with_families({"hellaswag": {}}, fam)) == ["hellaswag", "taskworld_addc"]
