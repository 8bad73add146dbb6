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
from compress.lineage import write_json
from compress.models import count_params, load_model, load_tokenizer, save_checkpoint, torch_dtype
from compress.prune.families import family_of
from compress.prune.importance import calibration_loss, measure_importance
from compress.prune.report import plot_importance, prune_markdown
from compress.prune.selection import select
from compress.prune.shape import Shape, choose_shape, shape_of
from compress.prune.surgery import build_pruned

IMPORTANCE_FILE = "importance.json"


def plan_shape(teacher_dir: Path, cfg: PruneConfig, trust_remote_code: bool = False) -> dict[str, Any]:
    """The student's shape and parameter counts, from the teacher's config.json alone (no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(teacher_dir), trust_remote_code=trust_remote_code)
    family = family_of(config)
    shape, params, teacher_params = choose_shape(config, cfg, family)
    return {
        "family": family.name,
        "teacher": shape_of(config).as_dict(),
        "student": shape.as_dict(),
        "params_before": teacher_params,
        "params_after": params,
        "ratio": params / teacher_params,
    }


def importance_key(
    teacher_id: str, texts: list[str], starts: list[int] | None, cfg: PruneConfig, dtype: str, device: str
) -> str:
    """What the scores depend on: teacher, calibration texts (and completion starts), truncation, numerics."""
    h = hashlib.sha256()
    for part in (teacher_id, cfg.calibration_seq_len, cfg.aggregation, dtype, device, len(texts), starts):
        h.update(f"{part}\0".encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()


def _importance(
    model, family, tokenizer, texts, starts, cfg: PruneConfig, path: Path, key: str, need_loss: bool, progress
) -> tuple[dict, bool]:
    """Scores from ``path`` when its key matches (and it has what is needed), else measured and written."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and (not need_loss or cached.get("loss_increase") is not None):
            return cached, True
    scores = measure_importance(
        model,
        family,
        tokenizer,
        texts,
        cfg.batch_size,
        cfg.calibration_seq_len,
        cfg.aggregation,
        need_loss,
        starts,
        progress,
    )
    scores["key"] = key
    write_json(path, scores)
    return scores, False


def prune_model(
    teacher_dir: Path,
    calibration_texts: list[str],
    cfg: PruneConfig,
    out_dir: Path,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    teacher_id: str | None = None,
    log: Callable[[str], None] = print,
    completion_starts: list[int] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Prune ``teacher_dir`` to ``out_dir`` as ``cfg`` says; return the pruning record.

    ``completion_starts[i]`` is where text i's answer begins: the calibration loss counts only
    answer tokens then (all tokens when it is not given). ``progress(fraction, message)`` hears
    about the calibration passes.

    ``importance.json`` (the scores, reused when teacher, calibration texts and settings match),
    ``prune.json`` (this record), ``prune.md`` (the importance table) and ``plots/importance.png``
    go beside ``out_dir``.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    work = out_dir.parent
    planned = plan_shape(teacher_dir, cfg, trust_remote_code)
    log(
        f"{planned['family']}: {planned['teacher']} -> {planned['student']}; parameters "
        f"{planned['params_before']:,} -> {planned['params_after']:,} ({planned['ratio']:.3f})"
    )
    model = load_model(teacher_dir, torch_dtype(dtype), device, trust_remote_code)
    family = family_of(model.config)
    tokenizer = load_tokenizer(teacher_dir, trust_remote_code)
    calib_tok = load_tokenizer(teacher_dir, trust_remote_code)  # a copy: the saved tokenizer stays as shipped
    if calib_tok.pad_token is None:  # many base models ship without one; padding is masked out anyway
        calib_tok.pad_token = calib_tok.eos_token
    starts = completion_starts
    key = importance_key(
        teacher_id or str(Path(teacher_dir).resolve()), calibration_texts, starts, cfg, dtype, str(device)
    )
    need_loss = cfg.depth_metric == "loss_increase"
    scores, reused = _importance(
        model, family, calib_tok, calibration_texts, starts, cfg, work / IMPORTANCE_FILE, key, need_loss, progress
    )
    log(("reused" if reused else "measured") + f" importance on {len(calibration_texts)} calibration texts")
    shape = Shape(**planned["student"])
    keep = select(model.config, scores, shape, cfg.selection, cfg.depth_metric, cfg.seed)
    student = build_pruned(model, family, keep).to(device)
    save_checkpoint(student, tokenizer, out_dir)
    loss_after = calibration_loss(
        student, calib_tok, calibration_texts, cfg.batch_size, cfg.calibration_seq_len, starts
    )
    n_layers = len(scores["block_influence"])
    record = {
        "method": cfg.method,
        "selection": cfg.selection,
        "depth_metric": cfg.depth_metric,
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
        "calibration_texts": len(calibration_texts),
        "importance_reused": reused,
        "device": str(device),
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
