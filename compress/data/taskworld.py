"""The built-in task world: small, checkable text tasks with disjoint train / held-out splits.

Every example is a prompt such as ``rev kqzd=`` and a single correct answer such as ``dzqk``; the
model sees ``prompt + answer + "\\n"``. Tasks are deterministic functions of a seed, so a split is
reproducible byte for byte, and the held-out split never shares a prompt with the train split.

Tasks:
  rev   reverse a string of 3-5 lowercase letters
  sort  sort 3-5 digits ascending
  cnt   count the occurrences of a letter in a string of 3-6 letters from {a, b, c}
  max   the largest of 3-6 digits
  add   a number 0-99 plus a digit 0-9
  dup   double every letter of 3-4 letters
  rot   shift each of 3-5 letters by one (z wraps to a)

``cnt`` and ``add`` are the hardest for the tiny default teacher (about 60% and 50% held-out exact
match after 3000 steps), so the easy world (``configs/easy.yaml``) uses the other five.

Harder families, which need more computation per answer; each takes a length range (``lengths``:
digits, letters or pairs, both ends included), so difficulty is a setting:
  addc    multi-digit addition with carries, ``sum 478+95=`` -> ``375`` (573 written least-significant
          digit first; digits per operand, 2-3)
  mul     a number times a digit 2-9, ``mul 48x6=`` -> ``882`` (288, least-significant digit first;
          digits of the number, 2-3)
  count   occurrences of a letter in a string over {a, b, c, d}, ``count b:abdbbca=`` -> ``3`` (6-10)
  sortl   sort lowercase letters, ``ord qkfzm=`` -> ``fkmqz`` (5-7)
  revrot  reverse, then shift each letter by one, ``rr abcd=`` -> ``edcb`` (4-6)
  lookup  in-context lookup in a key:value list, ``get c:a3b7c1=`` -> ``1`` (3-5 pairs)

and ``lang``, a language to model (``compress.data.language``): its rows are texts of a seeded
probabilistic automaton whose next-character distributions are spread and exactly known. A ``lang``
prompt is the BOS token (``<s>``, as lm-eval's rolling log-likelihood conditions the first
character on it) plus the first ``prefix_chars`` characters of a text; the answer is the rest. Its
held-out texts are scored by per-character NLL (``loglikelihood_rolling``), not by exact match.

The arithmetic answers come least-significant digit first, so that each digit a left-to-right model
writes depends on digits it has already written (the carry), not on all the digits to come: small
transformers learn addition from far fewer examples in that order (Lee et al. 2023, "Teaching
Arithmetic to Small Transformers"; see docs/world.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from compress.data.alphabet import ALPHABET, BOS, DIGITS, END, LANG, LETTERS  # noqa: F401 (re-exported)


def _rev(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"rev {s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))
    return f"sort {s}=", "".join(sorted(s))


def _cnt(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abc") for _ in range(rng.randint(3, 6)))
    c = rng.choice("abc")
    return f"cnt {c}:{s}=", str(s.count(c))


def _max(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))
    return f"max {s}=", max(s)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return f"add {a}+{b}=", str(a + b)


def _dup(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 4)))
    return f"dup {s}=", "".join(c + c for c in s)


def _rot(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"rot {s}=", _shift(s)


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _lsd_first(n: int) -> str:
    """``n`` written least-significant digit first (573 -> "375")."""
    return str(n)[::-1]


def _addc(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    a, b = _number(rng, rng.randint(lo, hi)), _number(rng, rng.randint(lo, hi))
    return f"sum {a}+{b}=", _lsd_first(a + b)


def _mul(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    a, d = _number(rng, rng.randint(lo, hi)), rng.randint(2, 9)
    return f"mul {a}x{d}=", _lsd_first(a * d)


def _count(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    s = "".join(rng.choice("abcd") for _ in range(rng.randint(lo, hi)))
    c = rng.choice("abcd")
    return f"count {c}:{s}=", str(s.count(c))


def _sortl(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
    return f"ord {s}=", "".join(sorted(s))


def _revrot(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
    return f"rr {s}=", _shift(s[::-1])


def _lookup(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    keys = rng.sample(LETTERS, rng.randint(lo, hi))
    values = [rng.choice(DIGITS) for _ in keys]
    i = rng.randrange(len(keys))
    pairs = "".join(k + v for k, v in zip(keys, values, strict=True))
    return f"get {keys[i]}:{pairs}=", values[i]


@dataclass(frozen=True)
class Family:
    """A task family with a difficulty setting: ``make(rng, lo, hi)`` and its default length range."""

    make: Callable[[random.Random, int, int], tuple[str, str]]
    lengths: tuple[int, int]


HARD: dict[str, Family] = {
    "addc": Family(_addc, (2, 3)),
    "mul": Family(_mul, (2, 3)),
    "count": Family(_count, (6, 10)),
    "sortl": Family(_sortl, (5, 7)),
    "revrot": Family(_revrot, (4, 6)),
    "lookup": Family(_lookup, (3, 5)),
}

TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "rev": _rev,
    "sort": _sort,
    "cnt": _cnt,
    "max": _max,
    "add": _add,
    "dup": _dup,
    "rot": _rot,
}
# Every family name make_splits accepts.
ALL_TASKS = [*TASKS, *HARD, LANG]


def check_answer(task: str, prompt: str, answer: str) -> bool:
    """Recompute the answer from the prompt alone; used by tests to prove the generator is right."""
    body = prompt.split(" ", 1)[1].rstrip("=")
    if task == "rev":
        return answer == body[::-1]
    if task in ("sort", "sortl"):
        return answer == "".join(sorted(body))
    if task in ("cnt", "count"):
        c, s = body.split(":")
        return answer == str(s.count(c))
    if task == "max":
        return answer == max(body)
    if task == "dup":
        return answer == "".join(c + c for c in body)
    if task == "rot":
        return answer == _shift(body)
    if task in ("add", "addc"):
        a, b = body.split("+")
        total = int(a) + int(b)
        return answer == (_lsd_first(total) if task == "addc" else str(total))
    if task == "mul":
        a, d = body.split("x")
        return answer == _lsd_first(int(a) * int(d))
    if task == "revrot":
        return answer == _shift(body[::-1])
    if task == "lookup":
        key, pairs = body.split(":")
        return answer == dict(zip(pairs[::2], pairs[1::2], strict=True))[key]
    raise ValueError(f"unknown task {task!r}")


def mix_schedule(names: list[str], mix: dict[str, int] | None = None) -> list[str]:
    """One period of the training stream's family order: each family ``mix[name]`` times (1 unless
    given), spread evenly (smooth weighted round-robin). Equal weights give plain round-robin."""
    weights = [(mix or {}).get(n, 1) for n in names]
    total = sum(weights)
    current = [0] * len(names)
    order = []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights, strict=True)]
        i = current.index(max(current))
        current[i] -= total
        order.append(names[i])
    return order


@dataclass(frozen=True)
class SplitOptions:
    """How ``make_splits`` draws beyond tasks, sizes and seed (every default is the plain task world).

    ``lengths`` overrides the length range of hard families (``HARD``). ``lang`` rows need the
    ``language`` (a ``compress.data.language.Language``). Training ``lang`` prompts carry the text's
    first ``prefix_chars`` characters (a range), so that prompts differ. ``mix`` weighs the families
    of the train stream (``mix_schedule``); held-out stays balanced.
    """

    lengths: dict[str, tuple[int, int]] | None = None
    language: Any = None
    prefix_chars: tuple[int, int] = (1, 3)
    mix: dict[str, int] | None = None


def make_splits(
    tasks: Iterable[str], n_train: int, n_heldout: int, seed: int, options: SplitOptions | None = None
) -> tuple[list[dict], list[dict]]:
    """Draw ``n_heldout`` then ``n_train`` examples, round-robin over ``tasks``.

    Held-out prompts are unique and drawn first; train prompts never equal a held-out prompt but
    may repeat (small task families have few distinct prompts), as real training data does.
    Each row is ``{"id", "task", "prompt", "answer"}``. Train is a prefix-stable stream: the first
    ``n`` rows are the same for any ``n_train >= n`` with the same seed and held-out size.

    A held-out ``lang`` row is a whole text (prompt ``<s>``) and no training row continues into a
    held-out text. ``options`` (``SplitOptions``) sets hard-family lengths, the language and the mix.
    """
    options = options or SplitOptions()
    names = list(tasks)
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(ALL_TASKS)}")
    if LANG in names and options.language is None:
        raise ValueError("the lang task needs a language (taskworld.language)")
    ranges = {name: (options.lengths or {}).get(name, fam.lengths) for name, fam in HARD.items()}
    rng = random.Random(seed)
    heldout_prompts: set[str] = set()

    def example(task: str, split: str) -> tuple[str, str, str]:
        """(prompt, answer, key): key is what must not repeat across splits."""
        if task == LANG:
            text = options.language.sample(rng).removesuffix(END)
            lo, hi = (0, 0) if split == "heldout" else options.prefix_chars
            cut = min(rng.randint(lo, hi), max(0, len(text) - 1))
            return BOS + text[:cut], text[cut:], f"{LANG}:{text}"
        if task in HARD:
            prompt, answer = HARD[task].make(rng, *ranges[task])
        else:
            prompt, answer = TASKS[task](rng)
        return prompt, answer, prompt

    def draw(n: int, split: str, unique: bool, order: list[str]) -> list[dict]:
        rows: list[dict] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise ValueError(f"task world too small for {n} {split} examples of {names}")
            task = order[len(rows) % len(order)]
            prompt, answer, key = example(task, split)
            if key in heldout_prompts:
                continue
            if unique:
                heldout_prompts.add(key)
            rows.append({"id": f"{split}-{len(rows)}", "task": task, "prompt": prompt, "answer": answer})
        return rows

    stray = sorted(set(options.mix or {}) - set(names))
    if stray:
        raise ValueError(f"mix names {stray}, which are not among the tasks {names}")
    heldout = draw(n_heldout, "heldout", unique=True, order=names)
    train = draw(n_train, "train", unique=False, order=mix_schedule(names, options.mix))
    return train, heldout


def world_splits(world: Any) -> tuple[list[dict], list[dict]]:
    """``make_splits`` for a ``TaskWorldConfig`` (its tasks, sizes, seed, lengths and language)."""
    from compress.data.language import language_of

    options = SplitOptions(
        lengths={k: tuple(v) for k, v in (world.lengths or {}).items()},
        language=language_of(world),
        prefix_chars=tuple(world.language.prefix_chars),
        mix=world.mix or None,
    )
    return make_splits(world.tasks, world.n_train, world.n_heldout, world.seed, options)
