"""Bring your own student: a small checkpoint the user already has, distilled into without pruning.

Token-level KD compares the two models' distributions id by id, so the student must share the
teacher's tokenizer: the same vocabulary (token -> id) and, for chat data, the same chat template
(otherwise the prompts the teacher completed are not the prompts the student is trained on).
``check_compatible`` says which of the two differs, in one line, before any stage runs.
``adopt_student`` copies the checkpoint into the run directory, where the pruned student would
be, so that every later stage, the lineage and the report treat both the same way.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.jobs import AdoptJob

# What a checkpoint directory holds besides weights (weights: *.safetensors and their index).
CHECKPOINT_FILES = (
    *("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    *("chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt"),
)


class StudentMismatch(ValueError):
    """The student cannot be distilled from this teacher token by token (one line: what differs)."""


def first_vocab_difference(a: dict[str, int], b: dict[str, int]) -> tuple[str, int] | None:
    """The (token, id) of lowest id on which two vocabularies disagree, or None when they are equal."""
    if a == b:
        return None
    return min(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])


def vocab_difference(teacher_tok, student_tok) -> str | None:
    """How the student's vocabulary differs from the teacher's, in words, or None when they are equal.

    The words are the two sizes (student first) and the first id that differs, for a one-line error.
    """
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    diff = first_vocab_difference(a, b)
    if diff is None:
        return None
    tok, i = diff
    return f"{len(b):,} vs {len(a):,} tokens; first difference: id {i} {tok!r}"


def check_compatible(teacher_tok, student_tok, where: str = "student.path") -> None:
    """Refuse a student whose vocabulary or chat template differs from the teacher's."""
    diff = vocab_difference(teacher_tok, student_tok)
    if diff is not None:
        raise StudentMismatch(
            f"{where}: the student's vocabulary differs from the teacher's ({diff}): "
            "token-level KD needs the teacher's tokenizer"
        )
    ta, tb = getattr(teacher_tok, "chat_template", None) or None, getattr(student_tok, "chat_template", None) or None
    if ta != tb:
        what = (
            "the student has no chat template (the teacher has one)"
            if tb is None
            else "the student has a chat template, the teacher none"
            if ta is None
            else "the student's chat template differs from the teacher's"
        )
        raise StudentMismatch(f"{where}: {what}: the prompts the teacher answered would not be the student's")


def adopt_student(job: AdoptJob) -> dict[str, Any]:
    """Copy ``job.student``'s checkpoint into ``job.out_dir`` (atomically) and return the stage's record.

    The record has the prune stage's fields that later stages and the report read (parameters
    before and after, the ratio, the shapes); ``kept_layers`` is None: no layer of the student is
    known to come from a teacher layer, so a hidden-state loss pairs layers by even spacing.
    """
    from transformers import AutoConfig

    from compress.models import checkpoint_params
    from compress.prune.shape import shape_of

    t0 = time.time()
    src, out_dir = Path(job.student.path), Path(job.out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json")
                            or f.name in CHECKPOINT_FILES):  # fmt: skip
            shutil.copy2(f, tmp / f.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    params, teacher_params = checkpoint_params(out_dir), checkpoint_params(job.teacher.path)
    return {
        "method": "given",
        "adopted_from": str(src),
        "student_shape": shape_of(AutoConfig.from_pretrained(str(out_dir))).as_dict(),
        "kept_layers": None,
        "params_before": teacher_params,
        "params_after": params,
        "ratio": params / teacher_params,
        "seconds": round(time.time() - t0, 2),
    }
