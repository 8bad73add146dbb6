"""Distillation losses on a sparse (top-k) teacher.

The teacher is given per position as its top-k token ids and log-probs (raw distribution, T = 1, as
vLLM returns them). The student side always uses its full-vocabulary log-softmax gathered at those
ids. Formulas follow REFERENCES.md section 2:

  forward KL   KL(p || q) = sum_v p_v (log p_v - log q_v)
  tail         "renormalize": p restricted to its top-k and renormalised (DistillKit's default);
               "bucket": an extra (k+1)-th bucket with P_tail = 1 - sum_k p, Q_tail = 1 - sum_k q
               (TRL ``loss_add_tail``).

A temperature other than 1 on a cached top-k is an approximation (the full normaliser is unknown);
with "renormalize" we rescale the kept log-probs by 1/T and renormalise, and multiply the loss by
T^2 as is customary; "bucket" is only defined at T = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "renormalize",
) -> torch.Tensor:
    """Per-position forward KL(p || q) between a top-k teacher and a full student.

    Args:
        student_logits: ``[N, V]`` raw student logits.
        teacher_ids: ``[N, k]`` teacher top-k token ids (any value where the log-prob is -inf).
        teacher_logprobs: ``[N, k]`` teacher log-probs at those ids; ``-inf`` marks a missing entry.
        temperature: softmax temperature applied to both sides.
        tail: ``"renormalize"`` or ``"bucket"`` (see module docstring).

    Returns:
        ``[N]`` KL per position (float32).
    """
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
    if tail == "bucket" and temperature != 1.0:
        raise ValueError("tail='bucket' needs temperature 1 (the tail mass is only known at T = 1)")
    valid = torch.isfinite(teacher_logprobs)
    t_lp = torch.where(valid, teacher_logprobs.float(), torch.full_like(teacher_logprobs.float(), -1e4))
    s_lp_full = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_lp = s_lp_full.gather(-1, teacher_ids.long().clamp(min=0))

    p_lp = F.log_softmax(t_lp / temperature, dim=-1) if tail == "renormalize" else t_lp
    p = p_lp.exp() * valid
    kl = (p * (p_lp - s_lp)).masked_fill(~valid, 0.0).sum(-1)

    if tail == "bucket":
        p_tail = (1.0 - p.sum(-1)).clamp(min=_EPS)
        q_tail = (1.0 - (s_lp.exp() * valid).sum(-1)).clamp(min=_EPS)
        kl = kl + p_tail * (p_tail.log() - q_tail.log())
    return kl * temperature**2


def kd_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    kd_weight: float,
    temperature: float = 1.0,
    tail: str = "renormalize",
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kd_weight * KD + (1 - kd_weight) * CE`` averaged over the valid (label != -100) tokens.

    Inputs are already shifted: ``logits[b, t]`` predicts ``labels[b, t]``, and the teacher tensors
    (``[B, T, k]``) describe the same target position. With ``kd_weight == 0`` the teacher may be None.
    """
    mask = labels != -100
    n_tokens = mask.sum().clamp(min=1)
    flat_logits = logits[mask]
    ce = F.cross_entropy(flat_logits.float(), labels[mask], reduction="sum") / n_tokens
    stats = {"ce": float(ce.detach())}
    if kd_weight == 0.0:
        return ce, stats
    if teacher_ids is None or teacher_logprobs is None:
        raise ValueError("kd_weight > 0 needs teacher_ids and teacher_logprobs")
    kd = topk_forward_kl(flat_logits, teacher_ids[mask], teacher_logprobs[mask], temperature, tail).sum() / n_tokens
    stats["kd"] = float(kd.detach())
    return kd_weight * kd + (1.0 - kd_weight) * ce, stats
