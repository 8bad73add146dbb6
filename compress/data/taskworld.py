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
match after 3000 steps), so the embedded default uses the other five.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# Every character that can appear in a prompt or an answer; the tokenizer is built from this.
ALPHABET = LETTERS + DIGITS + " =+:\n"
END = "\n"


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


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "rev": _rev,
    "sort": _sort,
    "cnt": _cnt,
    "max": _max,
    "add": _add,
    "dup": _dup,
    "rot": _rot,
}


def check_answer(task: str, prompt: str, answer: str) -> bool:
    """Recompute the answer from the prompt alone; used by tests to prove the generator is right."""
    body = prompt.split(" ", 1)[1].rstrip("=")
    if task == "rev":
        return answer == body[::-1]
    if task == "sort":
        return answer == "".join(sorted(body))
    if task == "cnt":
        c, s = body.split(":")
        return answer == str(s.count(c))
    if task == "max":
        return answer == max(body)
    if task == "dup":
        return answer == "".join(c + c for c in body)
    if task == "rot":
        return answer == _shift(body)
    if task == "add":
        a, b = body.split("+")
        return answer == str(int(a) + int(b))
    raise ValueError(f"unknown task {task!r}")


def make_splits(tasks: Iterable[str], n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw ``n_heldout`` then ``n_train`` examples, round-robin over ``tasks``.

    Held-out prompts are unique and drawn first; train prompts never equal a held-out prompt but
    may repeat (small task families have few distinct prompts), as real training data does.
    Each row is ``{"id", "task", "prompt", "answer"}``. Train is a prefix-stable stream: the first
    ``n`` rows are the same for any ``n_train >= n`` with the same seed and held-out size.
    """
    names = list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    heldout_prompts: set[str] = set()

    def draw(n: int, split: str, unique: bool) -> list[dict]:
        rows: list[dict] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise ValueError(f"task world too small for {n} {split} examples of {names}")
            task = names[len(rows) % len(names)]
            prompt, answer = TASKS[task](rng)
            if prompt in heldout_prompts:
                continue
            if unique:
                heldout_prompts.add(prompt)
            rows.append({"id": f"{split}-{len(rows)}", "task": task, "prompt": prompt, "answer": answer})
        return rows

    heldout = draw(n_heldout, "heldout", unique=True)
    train = draw(n_train, "train", unique=False)
    return train, heldout


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    """Write rows as JSON lines (atomically: a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file into a list of dicts."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
