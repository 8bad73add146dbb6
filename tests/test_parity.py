"""Greedy parity between engines: where two token sequences part."""

from evaluation.parity import first_difference


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one stopped earlier
    assert first_difference([], [4]) == 0
