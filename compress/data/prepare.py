"""Training prompts from the task world and from any ``datasets`` source, mixed, deduplicated, decontaminated.

A source is read with ``datasets.load_dataset`` (local JSONL/Parquet/CSV/Arrow files or directories,
or a hub dataset when reachable). Each record becomes a row:

  {"id", "source", "prompt", "prompt_ids", "answer" (or None), "text", ["task"]}

``prompt`` is what the teacher completes: the prompt field as it is, or the chat messages rendered
with the tokenizer's chat template (``add_generation_prompt=True``); when the messages end with an
assistant turn, that turn is the reference answer and is not part of the prompt. ``prompt_ids`` are
its token ids, computed once here so that the teacher (vLLM), the student (training) and the
calibration pass see the same tokens. ``text`` is the bare question (the prompt field, or the last
user turn) used to find evaluation prompts in the training data.

Bad input is a ``DataError``: one line naming the file or the field, raised before any model loads.
"""

from __future__ import annotations

import contextlib
import glob
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.config import (
    DataConfig,
    DatasetSource,
    EvaluateConfig,
    GenerateConfig,
    PruneConfig,
    SelfInstructSource,
    TaskWorldConfig,
    TaskWorldSource,
    first_line,
)
from compress.data.taskworld import END, world_splits
from compress.data.text import normalize
from compress.errors import DataError  # raised from here: callers catch it as compress.data.prepare.DataError
from compress.jobs import Checkpoint, PrepareJob

if TYPE_CHECKING:
    from compress.generate.teacher import Teacher

LOCAL_BUILDERS = {"json", "csv", "parquet", "arrow", "text"}
JSON_LINE_SUFFIXES = {".jsonl", ".ndjson"}
# GPT-3's decontamination rule: a training text that shares a 13-word n-gram with an evaluation text.
NGRAM = 13


# ---------------------------------------------------------------------------------------------- reading


SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
                   ".arrow": "arrow", ".txt": "text"}  # fmt: skip


def is_local(src: DatasetSource) -> bool:
    """True when the source reads files on this machine (a builder with files, a file, a directory)."""
    return src.path in LOCAL_BUILDERS or Path(src.path).expanduser().exists()


def local_files(src: DatasetSource, base: Path | None = None, where: str = "data.sources") -> list[Path]:
    """The local files a source reads (empty for a hub dataset); a missing file is a DataError.

    Files ``datasets`` skips in a directory (names starting with ``.`` or ``_``, such as Spark's
    ``_SUCCESS``) are skipped here too. A ``save_to_disk`` directory is read whole by
    ``load_from_disk`` and has no files to check.
    """
    if not is_local(src):
        return []  # a hub dataset: its data_files (if any) are paths inside the repository
    p = Path(src.path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        if _saved_to_disk(p):
            return []
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_")))
    patterns = src.data_files if isinstance(src.data_files, list) else [src.data_files] if src.data_files else []
    if not patterns:
        raise DataError(f"{where}.data_files: builder '{src.path}' needs data_files")
    base = base or Path.cwd()
    files: list[Path] = []
    for pat in patterns:
        if "://" in pat:
            continue  # a URL: datasets fetches it
        full = pat if Path(pat).is_absolute() else str(base / pat)
        found = sorted(Path(f) for f in glob.glob(full, recursive=True))
        if not found:
            raise DataError(f"{where}.data_files: '{pat}': data file not found")
        files += found
    return files


def _saved_to_disk(p: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def check_json_lines(path: Path) -> int:
    """Check that a JSONL file is UTF-8 JSON, one object per line; return the record count.

    ``datasets`` reports these faults as pyarrow errors without the line; this names it.
    """
    n = 0
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
            n += 1
    if n == 0:
        raise DataError(f"{path}: empty file (no records)")
    return n


def _check_files(files: list[Path]) -> None:
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty file (no records)")
        if f.suffix in JSON_LINE_SUFFIXES or (f.suffix == ".json" and _first_byte(f) == b"{"):
            check_json_lines(f)


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(1)


def _load_args(src: DatasetSource) -> tuple[str, dict[str, Any]]:
    """``load_dataset`` path and arguments; a single local file becomes its builder plus data_files."""
    p = Path(src.path).expanduser()
    kwargs: dict[str, Any] = {"split": src.split}
    if src.name:
        kwargs["name"] = src.name
    if src.revision:
        kwargs["revision"] = src.revision
    if src.data_files:
        kwargs["data_files"] = src.data_files
    if p.is_file():
        builder = SUFFIX_BUILDERS.get(p.suffix)
        if builder is None:
            raise DataError(
                f"{src.path}: unknown file type '{p.suffix}' (use path: json|parquet|csv|arrow + data_files)"
            )
        return builder, kwargs | {"data_files": str(p.resolve())}
    return src.path, kwargs


def read_source(src: DatasetSource, head: int | None = None, where: str = "data.sources") -> list[dict[str, Any]]:
    """Records of a source: the first ``head`` (streamed, nothing cached), or all (``limit`` applied).

    Local files are checked line by line first (UTF-8, JSON, not empty) so that a fault names its
    file and line; then ``datasets`` reads them. ``limit`` is a seeded sample taken on the Arrow
    table, so a large source is never turned into Python objects whole.
    """
    files = local_files(src, where=where)
    _check_files(files)
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path, kwargs = _load_args(src)
    try:
        if Path(path).is_dir() and _saved_to_disk(Path(path)):
            ds = datasets.load_from_disk(path)
            ds = ds[kwargs["split"]] if isinstance(ds, datasets.DatasetDict) else ds
            return [dict(r) for r in (ds.select(range(min(head, len(ds)))) if head else _limited(ds, src))]
        if head is not None:
            # Streaming takes no split slices ("train[:5]"): the first rows are the same anyway.
            stream = datasets.load_dataset(path, streaming=True, **kwargs | {"split": src.split.split("[")[0]})
            return [dict(r) for r in stream.take(head)]
        return [dict(r) for r in _limited(datasets.load_dataset(path, **kwargs), src)]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot read '{src.label}' (split {src.split!r}): {first_line(e)}") from None


def _limited(ds, src: DatasetSource):
    """At most ``src.limit`` rows: a seeded sample (shuffle, then the first rows), or every row."""
    if src.limit is None or src.limit >= len(ds):
        return ds
    return ds.shuffle(seed=src.seed).select(range(src.limit))


def source_fingerprint(src: DatasetSource) -> str:
    """Content identity of a source for cache keys: its local files' sha256, or the hub id and revision."""
    from compress.lineage import sha256_path

    files = local_files(src)
    if files:
        return ",".join(sha256_path(f) for f in files)
    p = Path(src.path).expanduser()
    if p.is_dir():  # save_to_disk
        return sha256_path(p)
    return f"hub:{src.path}@{src.revision or 'main'}"


# ---------------------------------------------------------------------------------------------- checking


def check_records(src: DatasetSource, records: list[dict[str, Any]], where: str) -> None:
    """Every record has the named fields, of the right shape; otherwise one line naming them."""
    if not records:
        raise DataError(f"{where}: '{src.label}' split {src.split!r} has no records")
    fields = [f for f in (src.prompt_field, src.answer_field, src.messages_field) if f]
    for i, rec in enumerate(records):
        for f in fields:
            if f not in rec:
                known = ", ".join(sorted(rec)) or "none"
                attr = next(a for a in ("prompt_field", "answer_field", "messages_field") if getattr(src, a) == f)
                raise DataError(f"{where}.{attr}: no field '{f}' in '{src.label}' record {i} (fields: {known})")
        if src.prompt_field and not isinstance(rec[src.prompt_field], str):
            raise DataError(f"{where}.prompt_field: '{src.label}' record {i}: '{src.prompt_field}' is not a string")
        if src.messages_field:
            problem = _messages_problem(rec[src.messages_field])
            if problem:
                raise DataError(f"{where}.messages_field: '{src.label}' record {i}: {problem}")


def _messages_problem(msgs: Any) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "messages must be a non-empty list of {role, content} objects"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} must be an object with string 'role' and 'content'"
        if m["role"] not in ("system", "user", "assistant", "tool", "developer"):
            return f"message {j} has unknown role {m['role']!r}"
    if not any(m["role"] == "user" for m in msgs):
        return "no user message"
    return None


def check_chat_template(template: str | None, where: str) -> None:
    """A messages source needs the teacher's tokenizer to have a chat template (``template``)."""
    if not template:
        raise DataError(f"{where}.messages_field: the teacher's tokenizer has no chat template to render messages")


# ---------------------------------------------------------------------------------------------- rendering


def render_records(src: DatasetSource, records: list[dict[str, Any]], tokenizer, index: int) -> list[dict[str, Any]]:
    """Rows (prompt, prompt_ids, answer, text) of a dataset source's records."""
    rows = []
    for i, rec in enumerate(records):
        if src.messages_field:
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec[src.messages_field]]
            answer = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else None
            prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            # The template writes BOS and the other specials itself: do not add them twice.
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            text = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
        else:
            prompt = rec[src.prompt_field]
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            a = rec.get(src.answer_field) if src.answer_field else None
            answer = None if a is None else str(a)
            text = prompt
        rows.append(
            {
                "id": f"s{index}-{i}",
                "source": src.label,
                "prompt": prompt,
                "prompt_ids": ids,
                "answer": answer,
                "text": text,
            }
        )
    return rows


def taskworld_rows(src: TaskWorldSource, taskworld: TaskWorldConfig, tokenizer) -> list[dict[str, Any]]:
    """The task world's training split (in its own order) as rows."""
    train, _ = world_splits(taskworld)
    rows = []
    for r in train[: src.limit]:
        ids = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
        rows.append(r | {"source": "taskworld", "prompt_ids": ids, "text": r["prompt"]})
    return rows


def calibration_text(row: dict[str, Any]) -> str:
    """Prompt and reference answer as one text (the task world's answers end with its newline)."""
    answer = row.get("answer") or ""
    return row["prompt"] + answer + (END if row.get("task") and answer else "")


def calibration_row(row: dict[str, Any]) -> dict[str, Any]:
    """``text`` and ``completion_start``: the character where the reference answer begins (0 = none).

    Pruning's calibration loss counts only the answer's tokens when there is one, as completion-only
    fine-tuning does: a prompt (in the task world, a random string) is not something to predict.
    """
    text = calibration_text(row)
    return {"text": text, "completion_start": len(row["prompt"]) if row.get("answer") else 0}


# ---------------------------------------------------------------------------------------------- mixing


def _ngrams(words: list[str]) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1))


class EvalIndex:
    """Evaluation prompts, for finding them in training data: exact (normalised) or a shared 13-gram."""

    def __init__(self, texts: Iterable[str]):
        self.exact: set[str] = set()
        self.grams: set[tuple[str, ...]] = set()
        for t in texts:
            n = normalize(t)
            self.exact.add(n)
            self.grams.update(_ngrams(n.split()))

    def __len__(self) -> int:
        return len(self.exact)

    def contains(self, text: str) -> bool:
        """True when ``text`` is an evaluation prompt or shares a 13-word n-gram with one."""
        n = normalize(text)
        return n in self.exact or any(g in self.grams for g in _ngrams(n.split()))


def _quotas(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` by weight (largest remainders), so the quotas add up exactly."""
    raw = [total * w / sum(weights) for w in weights]
    quotas = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - quotas[i], reverse=True)[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def mix_sources(
    per_source: list[list[dict[str, Any]]],
    data: DataConfig,
    eval_index: EvalIndex | None,
    max_prompt_tokens: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop over-long prompts, duplicates and evaluation prompts; take each source's share.

    Returns (rows, per-source stats). ``max_prompt_tokens`` is what the teacher server can take
    with room left for the completion: a longer prompt would be refused by it.
    """
    seen: set[str] = set()
    kept_per_source: list[list[dict[str, Any]]] = []
    stats = []
    for src, rows in zip(data.sources, per_source, strict=True):
        kept, dup, overlap, long = [], 0, 0, 0
        for r in rows:
            if max_prompt_tokens is not None and len(r["prompt_ids"]) > max_prompt_tokens:
                long += 1
                continue
            if data.dedup and r["prompt"] in seen:
                dup += 1
                continue
            seen.add(r["prompt"])
            if eval_index is not None and eval_index.contains(r["text"]):
                overlap += 1
                continue
            kept.append(r)
        kept_per_source.append(kept)
        label = "taskworld" if isinstance(src, TaskWorldSource) else src.label  # self_instruct has one too
        stats.append({"source": label, "read": len(rows), "too_long_dropped": long, "duplicates_dropped": dup,
                      "eval_overlap_dropped": overlap})  # fmt: skip
    if data.num_samples is None:
        chosen = kept_per_source
    else:
        rng = random.Random(data.seed)
        quotas = _quotas(data.num_samples, [s.weight for s in data.sources])
        chosen = [rng.sample(rows, min(q, len(rows))) for rows, q in zip(kept_per_source, quotas, strict=True)]
        for st, q in zip(stats, quotas, strict=True):
            st["quota"] = q
    out = [r for rows in chosen for r in rows]
    if len(data.sources) > 1:
        random.Random(data.seed).shuffle(out)
    for st, rows in zip(stats, chosen, strict=True):
        st["used"] = len(rows)
    return out, stats


def load_rows(
    src: TaskWorldSource | DatasetSource | SelfInstructSource,
    index: int,
    taskworld: TaskWorldConfig,
    tokenizer,
    where: str,
) -> list[dict[str, Any]]:
    """Read, check and render one source into rows (a self-instruct source is drawn by ``prepare_data``)."""
    if isinstance(src, SelfInstructSource):
        raise DataError(f"{where}: a self_instruct source needs the teacher: only data.sources may be self_instruct")
    if isinstance(src, TaskWorldSource):
        return taskworld_rows(src, taskworld, tokenizer)
    records = read_source(src, where=where)
    check_records(src, records, where)
    if src.messages_field:
        check_chat_template(getattr(tokenizer, "chat_template", None), where)
    return render_records(src, records, tokenizer, index)


HELDOUT_PROMPTS = "heldout_prompts.jsonl"


def uses_self_instruct(data: DataConfig) -> bool:
    """True when a source is drawn from the teacher (then the prepare stage serves it)."""
    return any(isinstance(s, SelfInstructSource) for s in data.sources)


def standalone_job(teacher_dir: Path, data: DataConfig, out_dir: Path, **fields: Any) -> PrepareJob:
    """A ``PrepareJob`` for data prepared outside a run (bench scripts, tests), into ``out_dir``.

    Unless ``fields`` say otherwise: the default task world, the first 128 training rows as the
    calibration texts, no prompt-length limit, no evaluation-set identity, the default serving
    settings and no self-instruct teacher; on the CPU.
    """
    defaults: dict[str, Any] = {
        "taskworld": TaskWorldConfig(),
        "uses_taskworld": True,
        "calibration_samples": PruneConfig().calibration_samples,
        "source_content": [],
        "max_prompt_tokens": None,
        "teacher": Checkpoint(path=Path(teacher_dir), identity=None),
        "eval_id": "",
        "evaluate": EvaluateConfig(),
        "tasks_dir": Path(out_dir).parent / "eval" / "tasks",
        "serving": GenerateConfig(),
        "self_instruct_teacher": None,
        "device": "cpu",
    }
    return PrepareJob(data=data, out_dir=Path(out_dir), **(defaults | fields))


def prepare_data(
    job: PrepareJob,
    eval_texts: list[str],
    progress: Callable[[float, str], None] | None = None,
    teacher: Callable[[], contextlib.AbstractContextManager[Teacher]] | None = None,
) -> dict[str, Any]:
    """Write ``prompts.jsonl`` (training prompts) and ``calibration.jsonl`` into ``job.out_dir``.

    Sources are rendered with ``job.teacher``'s tokenizer. ``eval_texts`` are the evaluation
    prompts; with ``job.data.decontaminate`` a training prompt that matches one is dropped. The
    calibration texts are the first ``job.calibration_samples`` rows of ``job.calibration_source``,
    or, without one, of the training rows. Returns the data report, also written as
    ``data_report.json``.

    Self-instruct sources (``compress.data.self_instruct``) are drawn through ``teacher()``, opened
    once after every other source has been read (a bad file fails before a server starts); their
    held-out prompts go to ``heldout_prompts.jsonl`` and count as evaluation prompts for
    decontamination.
    """
    from compress.jsonl import write_jsonl
    from compress.lineage import write_json
    from compress.models import load_tokenizer

    data, out_dir = job.data, Path(job.out_dir)
    tokenizer = load_tokenizer(job.teacher.path, job.teacher.trust_remote_code)
    per_source = _read_sources(job, tokenizer, progress)
    heldout: list[dict[str, Any]] = []
    drawn: list[dict[str, Any]] = []
    if uses_self_instruct(data):
        heldout, drawn = _draw_self_instruct(data, tokenizer, teacher, per_source, progress)
    index = EvalIndex([*eval_texts, *(r["text"] for r in heldout)]) if data.decontaminate else None
    rows, stats = mix_sources(per_source, data, index, job.max_prompt_tokens)
    if not rows:
        raise DataError("data.sources: no training prompts left after the length, duplicate and evaluation filters")
    calib_rows = rows
    if job.calibration_source is not None:
        calib_rows = load_rows(job.calibration_source, 0, job.taskworld, tokenizer, "prune.calibration_source")
    write_jsonl(rows, out_dir / "prompts.jsonl")
    if uses_self_instruct(data):
        write_jsonl(heldout, out_dir / HELDOUT_PROMPTS)
    write_jsonl([calibration_row(r) for r in calib_rows[: job.calibration_samples]], out_dir / "calibration.jsonl")
    report = {
        "prompts": len(rows),
        "too_long_dropped": sum(s["too_long_dropped"] for s in stats),
        "max_prompt_tokens": job.max_prompt_tokens,
        "duplicates_dropped": sum(s["duplicates_dropped"] for s in stats),
        "eval_overlap_dropped": sum(s["eval_overlap_dropped"] for s in stats),
        "eval_prompts_checked": len(index) if index is not None else 0,
        "calibration_texts": min(job.calibration_samples, len(calib_rows)),
        "sources": stats,
    }
    if uses_self_instruct(data):
        report |= {"self_instruct": drawn, "heldout_prompts": len(heldout), "heldout_path": HELDOUT_PROMPTS}
    write_json(out_dir / "data_report.json", report)
    if progress:
        progress(1.0, f"{len(rows)} prompts")
    return report


def _read_sources(
    job: PrepareJob, tokenizer, progress: Callable[[float, str], None] | None
) -> list[list[dict[str, Any]]]:
    """Every source's rows but the self-instruct ones' (left empty: drawn from the teacher later)."""
    n = len(job.data.sources)
    per_source: list[list[dict[str, Any]]] = [[] for _ in job.data.sources]
    for i, src in enumerate(job.data.sources):
        if isinstance(src, SelfInstructSource):
            continue
        per_source[i] = load_rows(src, i, job.taskworld, tokenizer, f"data.sources[{i}]")
        if progress:
            progress((i + 1) / (n + 1), f"read source {i}: {len(per_source[i])} rows")
    return per_source


def _draw_self_instruct(
    data: DataConfig,
    tokenizer,
    teacher: Callable[[], contextlib.AbstractContextManager[Teacher]] | None,
    per_source: list[list[dict[str, Any]]],
    progress: Callable[[float, str], None] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw every self-instruct source into ``per_source`` through one teacher; (held-out rows, reports)."""
    from compress.data.self_instruct import draw_prompts

    if teacher is None:
        raise DataError("data.sources: a self_instruct source needs a teacher to draw from (none was given)")
    n = len(data.sources)
    heldout, reports = [], []
    with teacher() as t:
        for i, src in enumerate(data.sources):
            if not isinstance(src, SelfInstructSource):
                continue

            def sub(fraction: float, message: str, i: int = i) -> None:
                if progress:
                    progress((i + fraction) / (n + 1), f"source {i} (self_instruct): {message}")

            result = draw_prompts(src, tokenizer, t, i, f"data.sources[{i}]", sub)
            per_source[i] = result.rows
            heldout += result.heldout
            reports.append({"index": i, **result.report})
            sub(1.0, f"{len(result.rows)} training + {len(result.heldout)} held-out prompts")
    return heldout, reports
