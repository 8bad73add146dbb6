"""Text as training and evaluation prompts are compared (deduplication, decontamination)."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Lower case, single spaces: the form in which training and evaluation prompts are compared."""
    return " ".join(text.lower().split())
