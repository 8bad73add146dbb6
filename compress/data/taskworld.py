"""The built-in task world: small, checkable text tasks with disjoint train / held-out splits.

Every example is a prompt such as ``rev kqzd=`` and a single correct answer such as ``dzqk``; the
model sees ``prompt + answer + "\\n"``. Tasks are deterministic functions of a seed, so a split is
reproducible byte for byte, and the held-out split never shares a prompt with the train split.

Tasks:
  rev   reverse a string of 3-6 lowercase letters
  sort  sort 3-6 digits ascending
  cnt   count the occurrences of a letter in a string of 4-8 letters from a small alphabet
  max   the largest of 3-6 digits
  add   sum of two numbers 0-49
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
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"rev {s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))
    return f"sort {s}=", "".join(sorted(s))


def _cnt(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice("abcd") for _ in range(rng.randint(4, 8)))
    c = rng.choice("abcd")
    return f"cnt {c}:{s}=", str(s.count(c))


def _max(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))
    return f"max {s}=", max(s)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a}+{b}=", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "rev": _rev,
    "sort": _sort,
    "cnt": _cnt,
    "max": _max,
    "add": _add,
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
    if task == "add":
        a, b = body.split("+")
        return answer == str(int(a) + int(b))
    raise ValueError(f"unknown task {task!r}")


def make_splits(tasks: Iterable[str], n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw ``n_heldout`` then ``n_train`` examples per split, round-robin over ``tasks``.

    Held-out prompts are drawn first and excluded from train, so the two splits are disjoint.
    Each row is ``{"id", "task", "prompt", "answer"}``.
    """
    names = list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(n: int, split: str) -> list[dict]:
        rows: list[dict] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"task world too small for {n} unique {split} examples")
            task = names[len(rows) % len(names)]
            prompt, answer = TASKS[task](rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"id": f"{split}-{len(rows)}", "task": task, "prompt": prompt, "answer": answer})
        return rows

    heldout = draw(n_heldout, "heldout")
    train = draw(n_train, "train")
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
