"""Which way a metric points: one source of truth for the report, the plots, the card and the gates.

lm-eval records each metric's direction in the results it returns (``higher_is_better`` per task
and metric); ``evaluation.harness.parse_scores`` keeps it on every score as ``"higher_is_better"``.
A recorded direction always wins. Where none was recorded (a score computed here, a run made before
directions were kept), the metric's name decides: lm-eval's registry marks ``perplexity``,
``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``, ``brier_score`` and ``ter`` lower-is-
better, and so are our own ``kl`` (KL(teacher || student) per token) and ``nll``; every other
metric (``acc``, ``exact_match``, ``top1_agreement``, ...) is higher-is-better, lm-eval's default.

``retention`` is how much of the teacher's quality a model keeps, in the metric's own direction:
``model / teacher`` when higher is better, ``teacher / model`` when lower is better, so that 1.0 is
"as good as the teacher" and below 1.0 is worse, either way.

Pure functions, no torch, no Prefect: ``compress`` and ``evaluation`` both use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# lm-eval's lower-is-better metrics (lm_eval.api.metrics, ``higher_is_better=False``) and ours.
# Kept as a table here instead of asking lm-eval's registry: compress/ must not import lm-eval
# (it pulls in datasets and evaluate), and gates are checked at config load.
LOWER_IS_BETTER = frozenset(
    {
        "perplexity",
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
        "brier_score",
        "ter",
        "kl",
        "nll",
    }
)


def base_name(metric: str) -> str:
    """The metric without lm-eval's filter suffix: ``exact_match,strict-match`` -> ``exact_match``."""
    return metric.split(",", 1)[0].strip()


def lower_is_better(metric: str, higher_is_better: bool | None = None) -> bool:
    """Whether a smaller value of ``metric`` is better.

    ``higher_is_better`` is the direction lm-eval recorded for it (None: not recorded); when given
    it wins over the name table (``LOWER_IS_BETTER``, matched without the filter suffix).
    """
    if higher_is_better is not None:
        return not higher_is_better
    return base_name(metric) in LOWER_IS_BETTER


def score_lower_is_better(metric: str, score: Mapping[str, Any] | None) -> bool:
    """``lower_is_better`` for one score entry ``{"value", "stderr", "higher_is_better"?}``."""
    recorded = (score or {}).get("higher_is_better")
    return lower_is_better(metric, recorded if isinstance(recorded, bool) else None)


def models_lower_is_better(models: Mapping[str, Mapping[str, Any]], task: str, metric: str) -> bool:
    """The direction of ``task``/``metric`` across models in summary form (``{name: {"scores": ...}}``).

    The first model that carries a recorded direction for it decides; otherwise the name does.
    """
    for m in models.values():
        score = ((m.get("scores") or {}).get(task) or {}).get(metric)
        if score is not None and isinstance(score.get("higher_is_better"), bool):
            return not score["higher_is_better"]
    return lower_is_better(metric)


def arrow(lower: bool) -> str:
    """``↓`` for a lower-is-better metric, ``↑`` for a higher-is-better one (table headers, plots)."""
    return "↓" if lower else "↑"


def retention(value: float | None, teacher: float | None, lower: bool) -> float | None:
    """The model's quality relative to the teacher's, 1.0 = as good, < 1.0 = worse (module docstring).

    None where the ratio means nothing: a value missing, a teacher at or below 0 (the teacher's KL
    to itself is 0; a ratio to it is 0 or infinite whatever the model does), or, when lower is
    better, a model at or below 0.
    """
    if value is None or teacher is None or teacher <= 0:
        return None
    if lower:
        return None if value <= 0 else teacher / value
    return value / teacher
