"""Training examples from the generate stage: prompts, teacher completions and the cached top-k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compress.data.taskworld import read_jsonl
from compress.distill.trainer import encode_example


def load_cached_examples(
    data_dir: Path, logits_dir: Path | None, tokenizer, with_teacher: bool = True
) -> list[dict[str, Any]]:
    """Training examples: prompt + teacher completion ids, plus the teacher's top-k rows per token.

    The log-prob arrays are memory-mapped; each example copies only its own slice.
    """
    data_dir = Path(data_dir)
    if with_teacher:
        if logits_dir is None:
            raise ValueError("with_teacher=True needs logits_dir")
        ids = np.load(Path(logits_dir) / "ids.npy", mmap_mode="r")
        lps = np.load(Path(logits_dir) / "logprobs.npy", mmap_mode="r")
    out = []
    for row in read_jsonl(data_dir / "train.jsonl"):
        if row["n_tokens"] == 0:
            continue
        ex = encode_example(tokenizer, row["prompt"], row["token_ids"], row.get("prompt_ids"))
        if with_teacher:
            sl = slice(row["offset"], row["offset"] + row["n_tokens"])
            ex["teacher_ids"] = np.array(ids[sl])
            ex["teacher_logprobs"] = np.array(lps[sl])
        out.append(ex)
    return out
