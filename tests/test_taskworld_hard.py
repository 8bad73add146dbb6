"""The hard task families and the language rows: answers checked by functions written apart from the
generator (other algorithms: schoolbook digits, repeated addition, counting sort, regex parsing), and
the held-out split kept out of training."""

from __future__ import annotations

import itertools
import math
import random
import re
import string
from collections import Counter

import pytest

from compress.config import ConfigError, TaskWorldConfig, validate
from compress.data.language import Language, language_of
from compress.data.taskworld import (
    BOS,
    END,
    HARD,
    LANG,
    SplitOptions,
    check_answer,
    make_splits,
    mix_schedule,
    world_splits,
)

HARD_WORLD = [*HARD, LANG]


def _digits_add(a: str, b: str) -> str:
    """Schoolbook addition on digit strings, right to left with a carry."""
    out, carry = [], 0
    a, b = a[::-1], b[::-1]
    for i in range(max(len(a), len(b))):
        s = carry + (int(a[i]) if i < len(a) else 0) + (int(b[i]) if i < len(b) else 0)
        out.append(str(s % 10))
        carry = s // 10
    if carry:
        out.append(str(carry))
    return "".join(reversed(out)).lstrip("0") or "0"


def _times_by_adding(a: str, d: str) -> str:
    total = "0"
    for _ in range(int(d)):
        total = _digits_add(total, a)
    return total


def _counting_sort(s: str) -> str:
    return "".join(c * s.count(c) for c in string.ascii_lowercase)


def _reverse_then_shift(s: str) -> str:
    return "".join(chr((ord(s[i]) - ord("a") + 1) % 26 + ord("a")) for i in range(len(s) - 1, -1, -1))


INDEPENDENT = {
    # Arithmetic answers are written least-significant digit first.
    "addc": (r"sum (\d+)\+(\d+)=", lambda a, b: _digits_add(a, b)[::-1]),
    "mul": (r"mul (\d+)x([2-9])=", lambda a, d: _times_by_adding(a, d)[::-1]),
    "count": (r"count ([abcd]):([abcd]+)=", lambda c, s: str(sum(1 for x in s if x == c))),
    "sortl": (r"ord ([a-z]+)=", _counting_sort),
    "revrot": (r"rr ([a-z]+)=", _reverse_then_shift),
    "lookup": (r"get ([a-z]):((?:[a-z]\d)+)=", lambda k, pairs: re.search(k + r"(\d)", pairs).group(1)),
}


def _independent(task: str, prompt: str) -> str:
    pattern, solve = INDEPENDENT[task]
    m = re.fullmatch(pattern, prompt)
    assert m, (task, prompt)
    return solve(*m.groups())


@pytest.fixture(scope="module")
def world():
    lang = Language.make(seed=0, end_prob=0.07, max_len=48)
    return lang, make_splits(HARD_WORLD, 3000, 700, seed=0, options=SplitOptions(language=lang))


def test_every_hard_answer_is_right_by_an_independent_function(world):
    _, (train, held) = world
    seen = set()
    for row in train + held:
        if row["task"] == LANG:
            continue
        seen.add(row["task"])
        assert row["answer"] == _independent(row["task"], row["prompt"]), row
        assert check_answer(row["task"], row["prompt"], row["answer"])  # the library's own checker agrees
    assert seen == set(HARD)


def test_wrong_answers_are_rejected():
    assert check_answer("addc", "sum 478+95=", "375") and check_answer("mul", "mul 48x6=", "882")
    assert not check_answer("addc", "sum 478+95=", "365")  # a dropped carry
    assert not check_answer("addc", "sum 478+95=", "573")  # most-significant digit first
    assert not check_answer("mul", "mul 48x6=", "842")
    assert not check_answer("lookup", "get c:a3b7c1=", "3")
    assert not check_answer("revrot", "rr abcd=", "bcde")  # shifted, not reversed


def test_language_rows_are_texts_of_the_language(world):
    lang, (train, held) = world
    for row in train + held:
        if row["task"] != LANG:
            continue
        assert row["prompt"].startswith(BOS)
        text = row["prompt"].removeprefix(BOS) + row["answer"] + END
        assert all(math.isfinite(lp) for lp in lang.token_log_probs(text)), row
    held_lang = [r for r in held if r["task"] == LANG]
    assert held_lang and all(r["prompt"] == BOS for r in held_lang)  # held-out: whole texts, scored from BOS
    prefixes = {len(r["prompt"]) - len(BOS) for r in train if r["task"] == LANG}
    assert prefixes <= {0, 1, 2, 3} and {1, 2, 3} <= prefixes


def test_heldout_never_appears_in_training(world):
    """Not as a prompt (tasks), not as a text continued by a training prompt (language)."""
    _, (train, held) = world
    held_prompts = {r["prompt"] for r in held if r["task"] != LANG}
    held_texts = {r["answer"] for r in held if r["task"] == LANG}
    assert len(held_prompts) + len(held_texts) == len(held)  # unique
    assert not held_prompts & {r["prompt"] for r in train}
    train_texts = {r["prompt"].removeprefix(BOS) + r["answer"] for r in train if r["task"] == LANG}
    assert not held_texts & train_texts


def test_lengths_set_the_difficulty():
    _, held = make_splits(
        ["addc", "sortl", "lookup"], 0, 90, seed=1, options=SplitOptions(lengths={"addc": (4, 4), "sortl": (9, 9)})
    )
    for r in held:
        body = r["prompt"].split(" ", 1)[1].rstrip("=")
        if r["task"] == "addc":
            assert all(len(x) == 4 for x in body.split("+"))
        elif r["task"] == "sortl":
            assert len(body) == 9
        else:
            lo, hi = HARD["lookup"].lengths
            assert lo <= len(body.split(":")[1]) // 2 <= hi


def test_world_config_reaches_the_splits():
    cfg = TaskWorldConfig(tasks=["addc", "lang"], n_train=20, n_heldout=10, lengths={"addc": (3, 3)})
    train, held = world_splits(cfg)
    assert len(train) == 20 and any(r["prompt"].startswith("sum ") for r in train)
    assert {r["task"] for r in held} == {"addc", "lang"}
    assert language_of(cfg).max_len == cfg.language.max_len
    assert language_of(TaskWorldConfig()) is None  # no lang task, no language


def test_bad_world_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="lengths"):
        validate(TaskWorldConfig, {"lengths": {"addc": [3, 2]}}, "x.yaml")
    with pytest.raises(ConfigError, match="lengths"):
        validate(TaskWorldConfig, {"lengths": {"rev": [1, 2]}}, "x.yaml")  # not a hard family
    with pytest.raises(ConfigError, match="prefix_chars"):
        validate(TaskWorldConfig, {"language": {"prefix_chars": [3, 1]}}, "x.yaml")
    with pytest.raises(ValueError, match="language"):
        make_splits([LANG], 5, 5, seed=0)


def test_easy_world_is_unchanged():
    """The easy world draws exactly as before the hard families existed (its teacher's held-out split)."""
    _, held = make_splits(["rev", "sort", "max", "dup", "rot"], 0, 3, seed=0)
    assert [r["prompt"] for r in held] == _easy_reference()


def _easy_reference() -> list[str]:
    rng = random.Random(0)
    out = []
    # The skeleton's generator, inlined: rev (3-5 letters), sort (3-5 digits), max (3-6 digits).
    out.append(f"rev {''.join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))}=")
    out.append(f"sort {''.join(rng.choice(string.digits) for _ in range(rng.randint(3, 5)))}=")
    out.append(f"max {''.join(rng.choice(string.digits) for _ in range(rng.randint(3, 6)))}=")
    return out


def test_heldout_does_not_depend_on_training_prompt_settings():
    """The teacher's bootstrap (whole texts) and the pipeline (prefixed prompts) share one held-out split."""
    a = TaskWorldConfig(tasks=["addc", "lang"], n_train=50, n_heldout=30, language={"prefix_chars": [0, 0]})
    b = TaskWorldConfig(tasks=["addc", "lang"], n_train=80, n_heldout=30, language={"prefix_chars": [1, 3]})
    assert world_splits(a)[1] == world_splits(b)[1]


def test_mix_weighs_the_training_stream_and_leaves_heldout_balanced():
    names = ["addc", "count", "lookup"]
    assert mix_schedule(names) == names  # equal weights: plain round-robin, as before mix existed
    period = mix_schedule(names, {"count": 3, "lookup": 2})
    assert Counter(period) == {"addc": 1, "count": 3, "lookup": 2}
    assert all(a != b for a, b in itertools.pairwise(period))  # spread out, not in runs
    _, base_held = make_splits(names, 600, 60, seed=3)
    train, held = make_splits(names, 600, 60, seed=3, options=SplitOptions(mix={"count": 3, "lookup": 2}))
    assert held == base_held
    assert Counter(r["task"] for r in train) == {"addc": 100, "count": 300, "lookup": 200}
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    cfg = TaskWorldConfig(tasks=names, n_train=60, n_heldout=6, mix={"count": 4})
    assert Counter(r["task"] for r in world_splits(cfg)[0])["count"] == 40
    assert "mix" not in TaskWorldConfig(tasks=names).hash_dump()  # unset: old worlds keep their hash


def test_bad_mix_is_a_one_line_error():
    with pytest.raises(ConfigError, match="mix"):
        validate(TaskWorldConfig, {"tasks": ["addc"], "mix": {"count": 2}}, "x.yaml")
    with pytest.raises(ConfigError, match="mix"):
        validate(TaskWorldConfig, {"tasks": ["addc"], "mix": {"addc": 0}}, "x.yaml")
    with pytest.raises(ValueError, match="mix"):
        make_splits(["addc"], 5, 5, seed=0, options=SplitOptions(mix={"lookup": 2}))
