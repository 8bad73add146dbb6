"""Chunked KD + CE: equal to the unchunked computation in value and gradient, for every teacher form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.distill.chunked import DenseTeacher, Head, KDMix, SampledTeacher, TopKTeacher, kd_ce_sums
from compress.distill.losses import LOSSES, LossSpec, dense_loss, sampled_loss, topk_loss

N, H, V = 37, 16, 50  # N is not a multiple of the chunk sizes below


def _setup(seed=0, bias=True, softcap=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    head = Head(torch.randn(V, H, generator=g, requires_grad=True) * 0.5,
                torch.randn(V, generator=g, requires_grad=True) if bias else None, softcap)  # fmt: skip
    head.weight.retain_grad()
    labels = torch.randint(0, V, (N,), generator=g)
    t_hidden = torch.randn(N, H, generator=g)
    t_head = Head(torch.randn(V, H, generator=g) * 0.5, None, softcap)
    return hidden, head, labels, t_hidden, t_head


def _reference(hidden, head, labels, loss_of, kd_weight):
    """Everything at once: full logits, autograd end to end."""
    logits = head.logits(hidden)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    kd = loss_of(logits).sum()
    return kd_weight * kd + (1 - kd_weight) * ce, kd, ce


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("chunk", [1, 8, 1024])
def test_chunked_equals_unchunked_online_teacher(name, chunk):
    hidden, head, labels, t_hidden, t_head = _setup(softcap=30.0 if name == "jsd" else None)
    spec = LossSpec(name, temperature=1.5)
    teacher = DenseTeacher(hidden=t_hidden, head=t_head)
    got, kd, ce = kd_ce_sums(hidden, head, labels, teacher, KDMix(spec, kd_weight=0.7, chunk_size=chunk))
    want, kd_ref, ce_ref = _reference(hidden, head, labels, lambda z: dense_loss(spec, z, t_head.logits(t_hidden)), 0.7)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kd, kd_ref.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce, ce_ref.detach(), atol=1e-4, rtol=1e-5)
    params = [hidden, head.weight, head.bias]
    for g1, g2 in zip(_grads(got, params), _grads(want, params), strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_chunked_equals_unchunked_topk_and_sampled(name, tail):
    hidden, head, labels, t_hidden, t_head = _setup(seed=1, bias=False)
    spec = LossSpec(name)
    log_p = F.log_softmax(t_head.logits(t_hidden), -1)
    vals, ids = log_p.topk(6, -1)
    draws = torch.multinomial(log_p.exp(), 16, replacement=True, generator=torch.Generator().manual_seed(2))
    counts = torch.zeros(N, V).scatter_add_(1, draws, torch.ones(N, 16))
    c, s_ids = counts.topk(10, -1)
    s_lp = log_p.gather(-1, s_ids)
    cases = [
        (TopKTeacher(ids, vals, tail), lambda z: topk_loss(spec, z, ids, vals, tail)),
        (SampledTeacher(s_ids, c, s_lp), lambda z: sampled_loss(spec, z, s_ids, c, s_lp)),
    ]
    for teacher, loss_of in cases:
        got, _, _ = kd_ce_sums(hidden, head, labels, teacher, KDMix(spec, kd_weight=0.5, chunk_size=5))
        want, _, _ = _reference(hidden, head, labels, loss_of, 0.5)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        for g1, g2 in zip(_grads(got, [hidden, head.weight]), _grads(want, [hidden, head.weight]), strict=True):
            torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_ce_only_and_frozen_head_and_no_grad():
    hidden, head, labels, _, _ = _setup(seed=3)
    frozen = Head(head.weight.detach(), head.bias.detach())
    got, kd, _ = kd_ce_sums(hidden, frozen, labels, None, KDMix(LossSpec(), kd_weight=0.0, chunk_size=7))
    want = F.cross_entropy(frozen.logits(hidden), labels, reduction="sum")
    torch.testing.assert_close(got, want)
    assert kd.item() == 0.0 and not kd.requires_grad
    (g,) = torch.autograd.grad(got, hidden)
    (g_ref,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        loss, _, _ = kd_ce_sums(hidden, head, labels, None, KDMix(LossSpec(), kd_weight=0.0))
    assert not loss.requires_grad


def test_kd_needs_a_teacher():
    hidden, head, labels, _, _ = _setup()
    with pytest.raises(ValueError, match="needs a teacher"):
        kd_ce_sums(hidden, head, labels, None, KDMix(LossSpec(), kd_weight=0.5))
