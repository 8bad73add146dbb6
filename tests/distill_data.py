"""Distillation data made here with transformers, in the generate stage's layout (no vLLM needed).

Greedy completions of the task world's training prompts by the shipped tiny teacher, with the
teacher's cache per completion token, written by the generate stage's own code with its
transformers backend: ``data/train.jsonl`` and ``logits/`` (``compress.generate.cache``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config import DistillConfig, GenerateConfig, TaskWorldConfig
from compress.data.taskworld import make_splits
from compress.generate.generate import vocab_size
from compress.generate.run import Generator
from compress.generate.teacher import HFTeacher
from compress.jobs import Checkpoint, DistillJob
from compress.models import load_tokenizer
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "teacher-tiny"
# The task world's generation settings (one-line answers): the defaults are a chat model's.
TOY = {"max_tokens": 16, "stop": ["\n"]}


def make_distill_data(
    out: Path, n: int = 48, k: int = 8, max_new: int = 12, teacher_dir: Path = TEACHER, draws: int = 0
) -> Path:
    """Write ``out/data`` and ``out/logits`` for ``n`` prompts; return ``out``.

    ``draws`` > 0 makes a sampled cache instead of top-k ("Sparse Logit Sampling", proposal = p):
    per token, ``draws`` ids drawn from the teacher, stored as distinct ids with their counts and log p.
    """
    world = TaskWorldConfig()
    rows, _ = make_splits(world.tasks, n, 4, world.seed)
    cfg = GenerateConfig(top_k=k, max_tokens=max_new, logits="sampled" if draws else "topk", draws=max(draws, 1),
                         stop=TOY["stop"], shard_size=64, prompts_per_request=16)  # fmt: skip
    gen = Generator(rows, cfg, HFTeacher(teacher_dir), load_tokenizer(teacher_dir), out / "generate.work")
    gen.run(out / "data", out / "logits", vocab_size(teacher_dir))
    return out


def distill_job(student: Path, data: Path, distill: DistillConfig, out: Path, **fields: Any) -> DistillJob:
    """A distill job on ``make_distill_data``'s output ``data``: KD from its cache on CPU, unless
    ``fields`` say otherwise; ``teacher=<a path>`` is the online teacher's checkpoint."""
    teacher = fields.pop("teacher", None)
    job = {
        "student": Checkpoint(path=student, identity=None),
        "data_dir": data / "data",
        "logits_dir": data / "logits",
        "data_sha": None,
        "distill": distill,
        "kd": True,
        "teacher": Checkpoint(path=teacher, identity=None) if teacher is not None else None,
        "device": "cpu",
        "out_dir": out,
    }
    return DistillJob(**job | fields)
