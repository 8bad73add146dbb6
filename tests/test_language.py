"""The modelled language: seeded, and its exact entropy agrees with estimates from its own samples."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from compress.data.language import Language, floor
from compress.data.taskworld import END


@pytest.fixture(scope="module")
def lang() -> Language:
    return Language.make(seed=3)


def test_seeded(lang):
    again = Language.make(seed=3)
    assert [lang.sample(random.Random(7)) for _ in range(5)] == [again.sample(random.Random(7)) for _ in range(5)]
    assert Language.make(seed=4).probs != lang.probs


def test_entropy_rate_matches_the_sampled_nll(lang):
    """The exact rate (stationary distribution of the state chain) against the mean -log p of 4,000 sampled
    texts: two independent computations of the same number (renewal: NLL per character over many texts)."""
    rng = random.Random(0)
    texts = [lang.sample(rng) for _ in range(4000)]
    nll = np.array([-sum(lang.token_log_probs(t)) for t in texts])
    lens = np.array([len(t) for t in texts], dtype=float)
    rate = nll.sum() / lens.sum()
    # Standard error of a ratio estimator (delta method).
    se = np.std(nll - rate * lens) / (lens.mean() * math.sqrt(len(texts)))
    exact = lang.entropy_rate()
    assert abs(rate - exact) < 4 * se, (rate, exact, se)
    # The per-position entropies average to the same rate.
    ent = sum(sum(lang.position_entropies(t)) for t in texts) / lens.sum()
    assert abs(ent - exact) < 4 * se
    # Genuinely spread: over a nat per character (a one-hot language would be near 0).
    assert exact > 1.0


def test_first_characters_follow_the_start_state(lang):
    rng = random.Random(1)
    n = 6000
    firsts = [lang.sample(rng)[0] for _ in range(n)]
    for c, p in lang.probs[0].items():
        freq = firsts.count(c) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (c, freq, p)


def test_every_sample_is_possible_and_other_text_is_not(lang):
    rng = random.Random(2)
    for _ in range(200):
        t = lang.sample(rng)
        assert t.endswith(END) and len(t) <= lang.max_len
        assert all(math.isfinite(lp) for lp in lang.token_log_probs(t))
    impossible = next(c for c in "abcdefghijklmnopqrstuvwxyz " if c not in lang.probs[0])
    assert lang.token_log_probs(impossible)[0] == -math.inf


def test_bad_settings():
    with pytest.raises(ValueError, match="end_prob"):
        Language.make(end_prob=0)
    with pytest.raises(ValueError, match="branching"):
        Language.make(branching=99)


def test_the_length_cap_is_part_of_the_language():
    """At ``max_len`` the end marker is certain: samples obey it, and the exact figures account for it."""
    short = Language.make(seed=3, end_prob=0.01, max_len=6)
    rng = random.Random(5)
    texts = [short.sample(rng) for _ in range(300)]
    assert all(t.endswith(END) and len(t) <= 6 for t in texts)
    capped = [t for t in texts if len(t) == 6]
    assert capped, "with end_prob 0.01 most texts reach the cap"
    assert short.token_log_probs(capped[0])[-1] == 0.0
    assert short.position_entropies(capped[0])[-1] == 0.0
    assert short.token_log_probs(capped[0][:-1] + "a\n")[-1] == -math.inf  # longer than the cap: impossible


def test_floor_is_the_mean_exact_entropy_and_the_true_nll(lang):
    rng = random.Random(9)
    texts = [lang.sample(rng) for _ in range(3000)]
    f = floor(lang, texts)
    assert f["chars"] == sum(map(len, texts)) and f["texts"] == 3000
    # Over many samples the true model's NLL is an unbiased estimate of the mean entropy (a per-token
    # Monte Carlo estimate, independent of the exact sums): they agree within a few standard errors.
    per_token = np.array([-lp for t in texts for lp in lang.token_log_probs(t)])
    se = per_token.std() / math.sqrt(len(per_token))
    assert abs(f["nll"] - f["entropy"]) < 4 * se, (f, se)
