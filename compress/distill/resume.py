"""Resume a crashed training run from its last checkpoint, only when it is the same run.

Features:
  * ``fingerprint``: a hash of everything that decides the trained weights (the start weights,
    the examples with their cached teacher rows, every setting);
  * ``resume_point``: the last Trainer checkpoint of the work directory when its stamp matches the
    fingerprint; otherwise the directory starts afresh, stamped;
  * ``agreed_resume_point``: the same under torchrun, process 0 deciding for every process (it may
    have wiped a stale directory).

The resume itself is Trainer's ``resume_from_checkpoint``: weights, optimizer, scheduler, RNG and
the data position.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from transformers.trainer_utils import get_last_checkpoint

from compress.distill.batches import TEACHER_FIELDS


def fingerprint(init_dir: Path | None, model, examples: Sequence[dict[str, Any]], parts: dict[str, Any]) -> str:
    """What decides the trained weights: the start weights, the data and every setting."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(str(init_dir).encode() if init_dir else b"")
    for p in model.state_dict().values():
        # The first values of each tensor: telling, and cheap even for a model on a GPU.
        h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    for ex in examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        for f in TEACHER_FIELDS:
            if f in ex:
                h.update(np.asarray(ex[f]).tobytes())
    return h.hexdigest()


def resume_point(work: Path, job_fingerprint: str) -> str | None:
    """The last checkpoint in ``work`` when it was made by this same job; otherwise start afresh."""
    stamp = work / "fingerprint.txt"
    if work.is_dir() and stamp.is_file() and stamp.read_text().strip() == job_fingerprint:
        return get_last_checkpoint(str(work))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(job_fingerprint)
    return None


def agreed_resume_point(work: Path, job_fingerprint: str, main: bool) -> str | None:
    """``resume_point`` as the main process finds it, handed to every process of a torchrun job."""
    resume = resume_point(work, job_fingerprint) if main else None
    if dist.is_available() and dist.is_initialized():
        box = [resume]
        dist.broadcast_object_list(box, src=0)
        resume = box[0]
    return resume
