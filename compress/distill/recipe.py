"""The distill stage: train the pruned student on the generated data, by KD or by SFT only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config import DistillConfig
from compress.distill.sources import load_cached_examples
from compress.distill.trainer import Progress, train_causal_lm
from compress.lineage import read_json
from compress.models import count_params, load_model, load_tokenizer


def distill_student(
    student_dir: Path,
    data_dir: Path,
    logits_dir: Path,
    cfg: DistillConfig,
    out_dir: Path,
    use_teacher_logits: bool = True,
    progress: Progress | None = None,
    device: str = "cpu",
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``student_dir`` on ``data_dir`` (teacher top-k in ``logits_dir``) into ``out_dir``.

    With ``use_teacher_logits`` the loss is ``kd_weight * KL(teacher top-k || student) +
    (1 - kd_weight) * CE``; without, it is CE on the teacher's completions (the SFT baseline).
    ``log_path`` receives the loss curve as JSON lines.
    """
    tokenizer = load_tokenizer(student_dir)
    examples = load_cached_examples(data_dir, logits_dir, tokenizer, with_teacher=use_teacher_logits)
    if not examples:
        raise ValueError(f"{data_dir}/train.jsonl has no usable rows (every completion is empty)")
    k = (read_json(Path(logits_dir) / "meta.json") or {}).get("k")
    model = load_model(student_dir, device=device)  # float32 master weights, whatever the checkpoint's dtype
    metrics = train_causal_lm(
        student_dir,
        examples,
        out_dir,
        cfg.train,
        kd_weight=cfg.kd_weight if use_teacher_logits else 0.0,
        temperature=cfg.temperature,
        tail=cfg.tail,
        top_k=k,
        progress=progress,
        model=model,
        tokenizer=tokenizer,
        device=device,
        log_path=log_path,
    )
    return metrics | {"params": count_params(model), "examples": len(examples), "kd": use_teacher_logits}
