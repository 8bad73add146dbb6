"""Prune a teacher checkpoint to a student checkpoint: depth, width or both.

Steps, each its own module:
  1. shape      the student's sizes from explicit sizes or ``target_ratio`` (``shape.py``);
  2. importance layers, heads, neurons, channels on calibration texts, cached by content key as
                ``importance.json`` so a second prune to another size skips the forward passes
                (``importance.py``);
  3. selection  importance, or the random / last-layers baselines (``selection.py``);
  4. surgery    slice the state dict and load it strictly into the new config (``surgery.py``);
  5. save       a stock checkpoint (config.json, safetensors, tokenizer, generation config) that
                loads in transformers and vLLM; calibration loss before and after; a report.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.config import PruneConfig
from compress.jobs import Checkpoint, PruneJob
from compress.jsonl import read_jsonl, write_jsonl
from compress.lineage import write_json
from compress.models import count_params, load_model, load_tokenizer, save_checkpoint, torch_dtype
from compress.prune.families import Family, family_of
from compress.prune.importance import Calibration, calibration_loss, measure_importance
from compress.prune.plan import plan_shape
from compress.prune.report import plot_importance, prune_markdown
from compress.prune.selection import select
from compress.prune.shape import Shape
from compress.prune.surgery import build_pruned

IMPORTANCE_FILE = "importance.json"


def read_calibration(path: Path) -> tuple[list[str], list[int]]:
    """The texts of a calibration file (``calibration.jsonl``) and where each one's answer begins (0: none)."""
    rows = read_jsonl(path)
    missing = next((i for i, r in enumerate(rows) if "text" not in r), None)
    if missing is not None:
        raise ValueError(f"{path}: row {missing} has no 'text' field")
    return [r["text"] for r in rows], [r.get("completion_start", 0) for r in rows]


def standalone_job(
    teacher_dir: Path,
    texts: list[str],
    prune: PruneConfig,
    out_dir: Path,
    starts: list[int] | None = None,
    **fields: Any,
) -> PruneJob:
    """A ``PruneJob`` for pruning outside a run (bench scripts, tests) on ``texts``.

    The texts (and ``starts``, where each answer begins) are written to ``calibration.jsonl`` beside
    ``out_dir``. Unless ``fields`` say otherwise: a teacher of unknown identity (its resolved path
    keys the importance scores), ``auto`` dtype, on the CPU.
    """
    out_dir = Path(out_dir)
    rows = [{"text": t, "completion_start": s} for t, s in zip(texts, starts or [0] * len(texts), strict=True)]
    defaults: dict[str, Any] = {
        "teacher": Checkpoint(path=Path(teacher_dir), identity=None),
        "calibration_sha": None,
        "dtype": "auto",
        "device": "cpu",
    }
    calibration = write_jsonl(rows, out_dir.parent / "calibration.jsonl")
    return PruneJob(calibration=calibration, prune=prune, out_dir=out_dir, **(defaults | fields))


def importance_key(job: PruneJob, calibration: Calibration) -> str:
    """What the scores depend on: teacher, calibration texts (and completion starts), truncation, numerics."""
    teacher_id = job.teacher.identity or str(Path(job.teacher.path).resolve())
    texts, prune = calibration.texts, job.prune
    h = hashlib.sha256()
    for part in (teacher_id, prune.calibration_seq_len, prune.aggregation, job.dtype, job.device, len(texts)):
        h.update(f"{part}\0".encode())
    h.update(f"{calibration.starts}\0".encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()


def _importance(
    model, family: Family, calibration: Calibration, job: PruneJob, progress: Callable[[float, str], None] | None
) -> tuple[dict, bool]:
    """Scores from ``importance.json`` beside the student when its key matches (and it has what is
    needed), else measured and written there."""
    path = job.out_dir.parent / IMPORTANCE_FILE
    key = importance_key(job, calibration)
    need_loss = job.prune.depth_metric == "loss_increase"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and (not need_loss or cached.get("loss_increase") is not None):
            return cached, True
    scores = measure_importance(model, family, calibration, job.prune.aggregation, need_loss, progress)
    scores["key"] = key
    write_json(path, scores)
    return scores, False


def _calibration(job: PruneJob) -> Calibration:
    """The calibration texts of ``job``, batched and truncated as ``job.prune`` says.

    Their tokenizer is a copy of the teacher's with a pad token, so that the saved one stays as shipped.
    """
    texts, starts = read_calibration(job.calibration)
    tokenizer = load_tokenizer(job.teacher.path, job.teacher.trust_remote_code)
    if tokenizer.pad_token is None:  # many base models ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return Calibration(tokenizer, texts, starts, job.prune.batch_size, job.prune.calibration_seq_len)


def prune_model(
    job: PruneJob, log: Callable[[str], None] = print, progress: Callable[[float, str], None] | None = None
) -> dict[str, Any]:
    """Prune ``job.teacher`` to ``job.out_dir`` as ``job.prune`` says; return the pruning record.

    The calibration texts are the rows of ``job.calibration`` (JSONL, ``text`` and optionally
    ``completion_start``, the character where the answer begins: the calibration loss counts only
    answer tokens then). ``progress(fraction, message)`` hears about the calibration passes.

    ``importance.json`` (the scores, reused when teacher, calibration texts and settings match),
    ``prune.json`` (this record), ``prune.md`` (the importance table) and ``plots/importance.png``
    go beside ``job.out_dir``.
    """
    t0 = time.time()
    calibration = _calibration(job)
    prune, teacher, work = job.prune, job.teacher, job.out_dir.parent
    planned = plan_shape(teacher.path, prune, teacher.trust_remote_code)
    log(
        f"{planned['family']}: {planned['teacher']} -> {planned['student']}; parameters "
        f"{planned['params_before']:,} -> {planned['params_after']:,} ({planned['ratio']:.3f})"
    )
    model = load_model(teacher.path, torch_dtype(job.dtype), job.device, teacher.trust_remote_code)
    family = family_of(model.config)
    tokenizer = load_tokenizer(teacher.path, teacher.trust_remote_code)
    scores, reused = _importance(model, family, calibration, job, progress)
    log(("reused" if reused else "measured") + f" importance on {len(calibration.texts)} calibration texts")
    keep = select(model.config, scores, Shape(**planned["student"]), prune.selection, prune.depth_metric, prune.seed)
    student = build_pruned(model, family, keep).to(job.device)
    save_checkpoint(student, tokenizer, job.out_dir)
    loss_after = calibration_loss(student, calibration)
    n_layers = len(scores["block_influence"])
    record = {
        "method": prune.method,
        "selection": prune.selection,
        "depth_metric": prune.depth_metric,
        "family": family.name,
        "teacher_shape": planned["teacher"],
        "student_shape": planned["student"],
        "kept_layers": keep.layers,
        "dropped_layers": [i for i in range(n_layers) if i not in keep.layers],
        "kept_heads": keep.heads,
        "kept_kv_heads": keep.kv_heads,
        "params_before": count_params(model),
        "params_after": count_params(student),
        "calibration_loss_before": scores["calibration_loss"],
        "calibration_loss_after": loss_after,
        "calibration_texts": len(calibration.texts),
        "importance_reused": reused,
        "device": job.device,
        "seconds": round(time.time() - t0, 2),
    }
    record["ratio"] = record["params_after"] / record["params_before"]
    write_json(work / "prune.json", record)
    plot_importance(scores, record, work / "plots" / "importance.png")
    (work / "prune.md").write_text(prune_markdown(scores, record))
    log(
        f"kept layers {keep.layers}; calibration loss {record['calibration_loss_before']:.4f} -> "
        f"{loss_after:.4f}; parameters {record['params_before']:,} -> {record['params_after']:,}"
    )
    return record
