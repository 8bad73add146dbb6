"""Training examples from the generate stage: prompts, teacher completions and the cached teacher rows.

The logit cache (``compress.generate.cache``) stays memory-mapped: an example decodes its own
tokens' rows when the data loader asks for it, so a cache of any size trains in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.distill.batches import encode_example
from compress.generate.cache import LogitCache
from compress.jsonl import read_jsonl

# Cache arrays by the name the collator and the trainer use. ``ids`` and ``logprobs`` are always
# there (top-k, or sampled ids with log p); a sampled cache ("Sparse Logit Sampling") adds
# ``counts`` (draws per id, 0 = padding) and, when the proposal was not p itself, ``proposal``
# (log r at each id).
CACHE_ARRAYS = {"ids": "teacher_ids", "logprobs": "teacher_logprobs", "counts": "teacher_counts",
                "proposal": "teacher_proposal"}  # fmt: skip


class CachedExamples(Sequence):
    """Encoded examples; with a cache, each item also carries its tokens' teacher rows, decoded on access."""

    def __init__(self, examples: list[dict[str, Any]], spans: list[tuple[int, int]], cache: LogitCache | None):
        self.examples, self.spans, self.cache = examples, spans, cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ex = dict(self.examples[i])
        if self.cache is not None:
            offset, n = self.spans[i]
            for name, arr in self.cache[offset : offset + n].items():
                if name in CACHE_ARRAYS:
                    ex[CACHE_ARRAYS[name]] = arr
        return ex

    @property
    def k(self) -> int | None:
        """Entries per cached token (None without a cache)."""
        return self.cache.k if self.cache is not None else None


def load_cached_examples(
    data_dir: Path, logits_dir: Path | None, tokenizer, with_teacher: bool = True
) -> CachedExamples:
    """Training examples: prompt + teacher completion ids, plus (``with_teacher``) the cached rows per token.

    A top-k cache gives ``teacher_ids``/``teacher_logprobs``; a sampled cache adds
    ``teacher_counts`` (and ``teacher_proposal``), and the trainer then uses the unbiased estimator.
    The cache's checksums are verified when it is opened.
    """
    cache = None
    if with_teacher:
        if logits_dir is None:
            raise ValueError("with_teacher=True needs logits_dir")
        cache = LogitCache(Path(logits_dir))
    examples, spans = [], []
    for row in read_jsonl(Path(data_dir) / "train.jsonl"):
        if row["n_tokens"] == 0:
            continue
        examples.append(encode_example(tokenizer, row["prompt"], row["token_ids"], row.get("prompt_ids")))
        spans.append((row["offset"], row["n_tokens"]))
    if cache is not None and spans and spans[-1][0] + spans[-1][1] > len(cache):
        raise ValueError(f"{logits_dir}: {len(cache)} cached tokens, {data_dir}/train.jsonl needs more")
    return CachedExamples(examples, spans, cache)
