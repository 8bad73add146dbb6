"""Training examples and their batches: encoded prompt + completion, padded or packed.

Features:
  * ``encode_example``: prompt ids + completion ids, the prompt masked out of the labels (-100),
    so that only completion tokens carry loss;
  * ``make_collator``: right-padded batches with an attention mask, or padding-free packed rows
    (first-fit decreasing, ``position_ids`` from 0 per example, transformers masks attention per
    example); the teacher's cached rows (top-k ids/log-probs, sampled counts and proposal) laid out
    per token as ``[B, T, k]`` beside the labels;
  * ``pad_id``: the id that pads a batch (the tokenizer's pad, else EOS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# Cache fields laid out per token by the collator, with the value that pads them (a padded row has
# log-prob -inf and count 0, so it weighs nothing).
TEACHER_FIELDS = {"teacher_ids": (torch.long, 0), "teacher_logprobs": (torch.float32, float("-inf")),
                  "teacher_counts": (torch.float32, 0.0), "teacher_proposal": (torch.float32, 0.0)}  # fmt: skip

Collator = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def encode_example(
    tokenizer, prompt: str, completion_ids: Sequence[int], prompt_ids: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """``input_ids`` = prompt ids + completion ids; ``labels`` mask the prompt with -100.

    ``prompt_ids`` are used as given when the data stage tokenized the prompt already.
    """
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": list(prompt_ids) + list(completion_ids),
        "labels": [-100] * len(prompt_ids) + list(completion_ids),
    }


class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts as a torch Dataset."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def pad_id(tokenizer) -> int:
    """The pad id, or EOS for tokenizers that have none (padding is masked out of the loss)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return pad


def make_collator(pad: int, top_k: int | None, pack: bool = False) -> Collator:
    """Right-pad a batch; lay the teacher's cached rows out as ``[B, T, k]`` aligned with ``labels``.

    ``top_k`` set: the examples carry ``teacher_ids``/``teacher_logprobs`` (and, from a sampled cache,
    ``teacher_counts``/``teacher_proposal``) with one row per completion token.

    ``pack``: padding-free batches. The examples are packed first-fit into rows no longer than the
    longest of them, each with its own ``position_ids`` from 0 and no ``attention_mask``, so that
    transformers masks attention to a block per example (``find_packed_sequence_indices``). The loss
    is the same as padded (the first token of each example is never a target, as in a padded row).
    """

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(ex["input_ids"]) for ex in batch]
        width = max(lengths)
        rows = _first_fit(lengths, width) if pack else [[i] for i in range(len(batch))]
        n = len(rows)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        out = {"input_ids": input_ids, "labels": labels}
        fields = [f for f in TEACHER_FIELDS if top_k and f in batch[0]]
        for f in fields:
            dtype, fill = TEACHER_FIELDS[f]
            out[f] = torch.full((n, width, np.asarray(batch[0][f]).shape[-1]), fill, dtype=dtype)
        positions = torch.zeros((n, width), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                ex, end = batch[i], at + lengths[i]
                input_ids[r, at:end] = torch.tensor(ex["input_ids"])
                labels[r, at:end] = torch.tensor(ex["labels"])
                labels[r, at] = -100  # nothing of its own predicts an example's first token
                positions[r, at:end] = torch.arange(lengths[i])
                for f in fields:
                    rows_f = torch.as_tensor(np.asarray(ex[f]))
                    out[f][r, end - len(rows_f) : end] = rows_f.to(out[f].dtype)  # the completion: its end
                at = end
            # The padding tail counts from 0 too: a block of its own, outside every example's attention.
            positions[r, at:] = torch.arange(width - at)
        if pack:
            out["position_ids"] = positions
        else:
            out["attention_mask"] = _real_tokens(lengths, width)
        return out

    return collate


def _real_tokens(lengths: list[int], width: int) -> torch.Tensor:
    """``[B, width]`` 1 where a right-padded row has a token, 0 on its padding."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the examples per packed row, longest first into the first row with room
    (first-fit decreasing: within 22% of the fewest rows). Written here as it is ten lines."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows
