"""Distillation losses: every major divergence, on a dense, top-k or sampled teacher.

Notation (docs/references.md#kd-losses): p teacher, q student, both ``softmax(logits / T)``.

  forward_kl        KL(p || q)            = sum p (log p - log q)
  reverse_kl        KL(q || p)            = sum q (log q - log p)
  skew_forward_kl   KL(p || a p + (1-a) q)                       DistiLLM, a = ``alpha``
  skew_reverse_kl   KL(q || (1-a) p + a q)
  jsd               b KL(p || m) + (1-b) KL(q || m), m = b p + (1-b) q   GKD / TRL, b = ``beta``;
                    b = 0 is KL(p || q) and b = 1 is KL(q || p), as in TRL
  tvd               1/2 sum |p - q|

Each is a sum over the vocabulary of an elementwise term ``g(p_v, q_v)`` (``terms``), which is
what makes the three teacher forms one implementation:

- dense: the teacher's full logits (online teacher, or tests): ``sum_v g(p_v, q_v)``;
- top-k (the generate stage's cache): ids and raw log-probs at T = 1 for the teacher's k most
  likely tokens. ``tail="bucket"`` adds a (k+1)-th outcome on both sides, ``P_tail = 1 - sum_k p``
  and ``Q_tail = 1 - sum_k q`` (TRL ``loss_add_tail``), so both are exact distributions over k + 1
  outcomes. ``tail="renormalize"`` restricts the teacher to its k ids and renormalises it
  (DistillKit's default); the student is renormalised over the same ids too, except for forward KL,
  which keeps the student's full-vocabulary log-probs (the usual top-k cross-entropy form, whose
  gradient also pushes the student's mass into the teacher's top-k). With k = V every variant is
  the dense loss. A temperature other than 1 on a top-k cache is an approximation (the teacher's
  full normaliser is unknown): the kept log-probs are rescaled by 1/T and renormalised;
  ``bucket`` needs T = 1;
- sampled ("Sparse Logit Sampling"): per position, ids drawn from a proposal r with their counts
  c, the teacher's log p and the proposal's log r at those ids. ``(1/N) sum_x c_x g(p_x, q_x) / r_x``
  is an unbiased estimate of ``sum_v g(p_v, q_v)`` (value and gradient) for every loss here, with
  N the number of draws; with r = p forward KL needs no ratio at all. Variance grows where q puts
  mass that p does not (reverse-type losses).

Every loss is multiplied by T^2 (the usual scaling that keeps gradient magnitudes comparable across
temperatures). Results are per position (``[N]``, float32); the caller masks and reduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd"]
LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd")
_NEG = -1e4  # stands for log 0: finite, so that 0 * (log 0 - x) is 0 with finite gradients
_EPS = 1e-8


@dataclass(frozen=True)
class LossSpec:
    """Which divergence, and its settings."""

    name: LossName = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.1  # skew losses: the mixing weight
    beta: float = 0.5  # jsd: the interpolation weight

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.name!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ValueError("alpha and beta must lie in [0, 1]")


def _mix_log(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a and log b, stable."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a (log a - log b): the terms of KL(a || b)."""
    return log_a.exp() * (log_a - log_b)


def terms(spec: LossSpec, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``g(p_v, q_v)`` of the divergence (same shape as the inputs); its sum is the loss.

    ``log_p`` and ``log_q`` are log-probabilities; ``-inf`` (or anything below -1e4) means 0.
    """
    log_p = log_p.float().clamp(min=_NEG)
    log_q = log_q.float().clamp(min=_NEG)
    name = spec.name
    if name == "jsd" and spec.beta == 0.0:
        name = "forward_kl"
    elif name == "jsd" and spec.beta == 1.0:
        name = "reverse_kl"
    if name == "forward_kl":
        return _kl_terms(log_p, log_q)
    if name == "reverse_kl":
        return _kl_terms(log_q, log_p)
    if name == "skew_forward_kl":
        return _kl_terms(log_p, _mix_log(log_p, log_q, spec.alpha))
    if name == "skew_reverse_kl":
        return _kl_terms(log_q, _mix_log(log_q, log_p, spec.alpha))
    if name == "jsd":
        log_m = _mix_log(log_p, log_q, spec.beta)
        return spec.beta * _kl_terms(log_p, log_m) + (1.0 - spec.beta) * _kl_terms(log_q, log_m)
    return 0.5 * (log_p.exp() - log_q.exp()).abs()  # tvd


def _tempered(logits: torch.Tensor, t: float) -> torch.Tensor:
    """float32 logits / T (no division, a full [N, V] pass, at T = 1)."""
    return logits.float() if t == 1.0 else logits.float() / t


def dense_loss(spec: LossSpec, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position loss between full-vocabulary student and teacher logits (``[N, V]`` each)."""
    t = spec.temperature
    log_q = F.log_softmax(_tempered(student_logits, t), dim=-1)
    log_p = F.log_softmax(_tempered(teacher_logits, t), dim=-1)
    return terms(spec, log_p, log_q).sum(-1) * t**2


def topk_loss(
    spec: LossSpec,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    tail: str = "renormalize",
) -> torch.Tensor:
    """Per-position loss against a top-k teacher (``[N, k]`` ids and raw log-probs; ``-inf`` = missing)."""
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
    t = spec.temperature
    if tail == "bucket" and t != 1.0:
        raise ValueError("tail='bucket' needs temperature 1 (the tail mass is only known at T = 1)")
    valid = torch.isfinite(teacher_logprobs)
    log_q_full = F.log_softmax(_tempered(student_logits, t), dim=-1)
    log_q = log_q_full.gather(-1, teacher_ids.long().clamp(min=0)).masked_fill(~valid, _NEG)
    t_lp = teacher_logprobs.float().masked_fill(~valid, _NEG)
    if tail == "bucket":
        log_p_tail = _log1m_sum_exp(t_lp)
        log_q_tail = _log1m_sum_exp(log_q)
        log_p = torch.cat([t_lp, log_p_tail[:, None]], dim=-1)
        log_q = torch.cat([log_q, log_q_tail[:, None]], dim=-1)
    else:
        log_p = F.log_softmax(t_lp / t, dim=-1).masked_fill(~valid, _NEG)
        if spec.name != "forward_kl":
            log_q = (log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)).masked_fill(~valid, _NEG)
    return terms(spec, log_p, log_q).sum(-1) * t**2


def _log1m_sum_exp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(log_x)) over the last dim, floored at log(eps)."""
    return torch.log((1.0 - log_x.exp().sum(-1)).clamp(min=_EPS))


def sampled_loss(
    spec: LossSpec,
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    proposal_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position unbiased estimate of the loss from sampled teacher ids (module docstring).

    ``ids``, ``counts`` (draws of that id; 0 = padding), ``teacher_logprobs`` (log p at the id, T = 1)
    and ``proposal_logprobs`` (log r at the id; None means r = p) are ``[N, m]``. The number of draws
    is ``counts.sum(-1)``. A temperature other than 1 is not defined here (p^(1/T) needs the normaliser).
    """
    if spec.temperature != 1.0:
        raise ValueError("sampled teacher: temperature must be 1 (the tempered normaliser is unknown)")
    counts = counts.float()
    n = counts.sum(-1, keepdim=True).clamp(min=1.0)
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, ids.long().clamp(min=0))
    log_p = teacher_logprobs.float()
    log_r = log_p if proposal_logprobs is None else proposal_logprobs.float()
    drawn = counts > 0
    # Padding (count 0) may carry any log p (-inf, -1e4): keep its 1/r finite before it is zeroed.
    weight = counts / n * torch.exp(-torch.where(drawn, log_r, torch.zeros_like(log_r)))
    return (weight * terms(spec, log_p, log_q)).sum(-1)


def kd_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor] | None,
    kd_weight: float,
    spec: LossSpec | None = None,
    tail: str = "renormalize",
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_weight * KD + (1 - kd_weight) * CE`` averaged over the valid (label != -100) tokens.

    Inputs are already shifted: ``logits[b, t]`` predicts ``labels[b, t]``, and the teacher's top-k
    ``(ids, logprobs)`` (``[B, T, k]`` each) describe the same target position. With
    ``kd_weight == 0`` the teacher may be None. ``spec`` picks the divergence (default: forward KL
    at temperature 1). The unchunked reference of ``compress.distill.chunked.kd_ce_sums``.
    """
    spec = spec or LossSpec("forward_kl")
    mask = labels != -100
    n_tokens = mask.sum().clamp(min=1)
    flat_logits = logits[mask]
    ce = F.cross_entropy(flat_logits.float(), labels[mask], reduction="sum") / n_tokens
    stats = {"ce": float(ce.detach())}
    if kd_weight == 0.0:
        return ce, stats
    if teacher is None:
        raise ValueError("kd_weight > 0 needs teacher_ids and teacher_logprobs (the teacher argument)")
    teacher_ids, teacher_logprobs = teacher
    kd = topk_loss(spec, flat_logits, teacher_ids[mask], teacher_logprobs[mask], tail).sum() / n_tokens
    stats["kd"] = float(kd.detach())
    return kd_weight * kd + (1.0 - kd_weight) * ce, stats


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "renormalize",
) -> torch.Tensor:
    """Per-position forward KL against a top-k teacher (``topk_loss`` with ``forward_kl``)."""
    return topk_loss(LossSpec("forward_kl", temperature), student_logits, teacher_ids, teacher_logprobs, tail)
