from compress.data.taskworld import TASKS, check_answer, make_splits
from compress.jsonl import read_jsonl, write_jsonl


def test_splits_are_deterministic_and_disjoint():
    a_train, a_held = make_splits(list(TASKS), 500, 100, seed=3)
    b_train, b_held = make_splits(list(TASKS), 500, 100, seed=3)
    assert a_train == b_train and a_held == b_held
    assert not {r["prompt"] for r in a_train} & {r["prompt"] for r in a_held}
    c_train, _ = make_splits(list(TASKS), 500, 100, seed=4)
    assert c_train != a_train


def test_every_answer_is_correct():
    train, held = make_splits(list(TASKS), 1000, 200, seed=0)
    for row in train + held:
        assert check_answer(row["task"], row["prompt"], row["answer"]), row
    assert {r["task"] for r in train} == set(TASKS)


def test_train_is_a_prefix_for_smaller_n():
    big, held_big = make_splits(["rev", "add"], 300, 50, seed=0)
    small, held_small = make_splits(["rev", "add"], 100, 50, seed=0)
    assert held_big == held_small
    assert big[:100] == small


def test_check_answer_rejects_wrong():
    assert not check_answer("rev", "rev abc=", "abc")
    assert not check_answer("add", "add 2+3=", "6")


def test_jsonl_roundtrip(tmp_path):
    rows = [{"a": 1}, {"b": "x\n"}]
    assert read_jsonl(write_jsonl(rows, tmp_path / "x.jsonl")) == rows


def test_unknown_task_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="unknown task"):
        make_splits(["nope"], 10, 10, seed=0)
