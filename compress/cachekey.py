"""What enters a stage's cache key, marked on the fields themselves.

A stage's cache key is the sha256 of its job (``compress.jobs``): every field of the job and of the
configs inside it, recursively, unless the field says otherwise with one of two marks in its
``Annotated`` type:

- ``OutOfKey(why)``: the field never changes the stage's outputs (where a file goes, how many
  requests run at once, a path whose content is keyed by a hash beside it);
- ``KeyWhen(flag)``: the field changes the outputs only in some jobs (the KD loss settings, for a
  KD student but not for the SFT baseline); it enters the key when the job raises ``flag``
  (``Job.flags``).

A renamed field keeps its mark, and ``tests/test_cache_keys.py`` checks, field by field, that each
one moves its stage's key unless it is marked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python


@dataclass(frozen=True)
class OutOfKey:
    """This field never changes its stage's outputs: it stays out of the cache key."""

    why: str


@dataclass(frozen=True)
class KeyWhen:
    """This field enters the cache key only in jobs that raise ``flag`` (see ``Job.flags``)."""

    flag: str


def key_marks(model: type[BaseModel], name: str) -> tuple[OutOfKey | None, KeyWhen | None]:
    """The marks on field ``name`` of ``model`` (either may be None)."""
    meta = model.model_fields[name].metadata
    out = next((m for m in meta if isinstance(m, OutOfKey)), None)
    when = next((m for m in meta if isinstance(m, KeyWhen)), None)
    return out, when


def key_content(value: Any, flags: frozenset[str] = frozenset()) -> Any:
    """``value`` as JSON-able data, keeping only what may change a stage's outputs.

    A pydantic model keeps the fields that carry no ``OutOfKey`` mark and whose ``KeyWhen`` flag, if
    any, is in ``flags``; lists, tuples and dicts are walked; anything else is converted as pydantic
    would serialize it (a path as its string).
    """
    if isinstance(value, BaseModel):
        kept = {}
        for name in type(value).model_fields:
            out, when = key_marks(type(value), name)
            if out is None and (when is None or when.flag in flags):
                kept[name] = key_content(getattr(value, name), flags)
        return kept
    if isinstance(value, list | tuple):
        return [key_content(v, flags) for v in value]
    if isinstance(value, dict):
        return {str(k): key_content(v, flags) for k, v in value.items()}
    return to_jsonable_python(value)


def key_hash(value: Any, flags: frozenset[str] = frozenset()) -> str:
    """sha256 of ``key_content(value, flags)`` as canonical JSON (keys sorted)."""
    blob = json.dumps(key_content(value, flags), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
