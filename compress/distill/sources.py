"""Training examples from the generate stage: prompts, teacher completions and the cached top-k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compress.data.taskworld import read_jsonl
from compress.distill.trainer import encode_example

# Per-token arrays of the logit cache, by the name the collator and the trainer use. ``ids`` and
# ``logprobs`` are always there (top-k, or sampled ids with log p); a sampled cache ("Sparse Logit
# Sampling") adds ``counts`` (draws per id, 0 = padding) and, when the proposal was not p itself,
# ``proposal`` (log r at each id).
CACHE_ARRAYS = {"ids": "teacher_ids", "logprobs": "teacher_logprobs", "counts": "teacher_counts",
                "proposal": "teacher_proposal"}  # fmt: skip


def load_cached_examples(
    data_dir: Path, logits_dir: Path | None, tokenizer, with_teacher: bool = True
) -> list[dict[str, Any]]:
    """Training examples: prompt + teacher completion ids, plus the teacher's cached rows per token.

    The cache arrays are memory-mapped; each example copies only its own slice. A top-k cache gives
    ``teacher_ids``/``teacher_logprobs``; a sampled cache adds ``teacher_counts`` (and
    ``teacher_proposal``), and the trainer then uses the unbiased sampled estimator.
    """
    data_dir = Path(data_dir)
    arrays: dict[str, np.ndarray] = {}
    if with_teacher:
        if logits_dir is None:
            raise ValueError("with_teacher=True needs logits_dir")
        for name, key in CACHE_ARRAYS.items():
            path = Path(logits_dir) / f"{name}.npy"
            if path.is_file():
                arrays[key] = np.load(path, mmap_mode="r")
        for required in ("ids", "logprobs"):
            if CACHE_ARRAYS[required] not in arrays:
                raise ValueError(f"{logits_dir}: no {required}.npy (not a teacher logit cache)")
    out = []
    for row in read_jsonl(data_dir / "train.jsonl"):
        if row["n_tokens"] == 0:
            continue
        ex = encode_example(tokenizer, row["prompt"], row["token_ids"], row.get("prompt_ids"))
        sl = slice(row["offset"], row["offset"] + row["n_tokens"])
        for key, arr in arrays.items():
            ex[key] = np.array(arr[sl])
        out.append(ex)
    return out
