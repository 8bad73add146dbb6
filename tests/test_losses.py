import pytest
import torch
import torch.nn.functional as F

from compress.distill.losses import kd_ce_loss, topk_forward_kl


def _full_kl(t_logits, s_logits):
    p = F.softmax(t_logits, -1)
    return (p * (F.log_softmax(t_logits, -1) - F.log_softmax(s_logits, -1))).sum(-1)


def test_full_vocab_topk_equals_exact_kl():
    torch.manual_seed(0)
    V = 12
    t, s = torch.randn(5, V), torch.randn(5, V)
    lp = F.log_softmax(t, -1)
    vals, ids = lp.topk(V, -1)
    for tail in ("renormalize", "bucket"):
        got = topk_forward_kl(s, ids, vals, tail=tail)
        torch.testing.assert_close(got, _full_kl(t, s), atol=1e-5, rtol=1e-5)


def test_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(1)
    t = torch.randn(4, 30)
    vals, ids = F.log_softmax(t, -1).topk(5, -1)
    assert topk_forward_kl(t, ids, vals, tail="bucket").abs().max() < 1e-5
    assert (topk_forward_kl(torch.randn(4, 30), ids, vals) > 0).all()


def test_renormalized_topk_matches_manual():
    torch.manual_seed(2)
    s = torch.randn(3, 10)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lps = torch.log(torch.tensor([[0.6, 0.2], [0.5, 0.1], [0.3, 0.3]]))
    p = torch.tensor([[0.75, 0.25], [5 / 6, 1 / 6], [0.5, 0.5]])
    q = F.log_softmax(s, -1).gather(-1, ids)
    want = (p * (p.log() - q)).sum(-1)
    torch.testing.assert_close(topk_forward_kl(s, ids, lps), want)


def test_missing_entries_are_ignored():
    s = torch.randn(2, 8)
    ids = torch.tensor([[1, 0], [2, 0]])
    lps = torch.tensor([[0.0, float("-inf")], [0.0, float("-inf")]])
    want = -F.log_softmax(s, -1).gather(-1, ids[:, :1]).squeeze(-1)
    torch.testing.assert_close(topk_forward_kl(s, ids, lps), want)


def test_gradient_flows_to_student_only():
    s = torch.randn(3, 9, requires_grad=True)
    vals, ids = F.log_softmax(torch.randn(3, 9), -1).topk(4, -1)
    topk_forward_kl(s, ids, vals).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_ce_mixing_and_masking():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[-100, 1, 2, -100], [3, -100, 4, 5]])
    vals, ids = F.log_softmax(torch.randn(2, 4, 10), -1).topk(3, -1)
    ce_only, _ = kd_ce_loss(logits, labels, None, None, kd_weight=0.0)
    m = labels != -100
    torch.testing.assert_close(ce_only, F.cross_entropy(logits[m], labels[m]))
    mixed, stats = kd_ce_loss(logits, labels, ids, vals, kd_weight=0.5)
    kd = topk_forward_kl(logits[m], ids[m], vals[m]).mean()
    torch.testing.assert_close(mixed, 0.5 * kd + 0.5 * ce_only)
    assert stats["kd"] == pytest.approx(float(kd)) and stats["ce"] == pytest.approx(float(ce_only))
    with pytest.raises(ValueError, match="needs teacher"):
        kd_ce_loss(logits, labels, None, None, kd_weight=0.5)


def test_bucket_rejects_temperature():
    with pytest.raises(ValueError, match="temperature 1"):
        topk_forward_kl(torch.randn(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 2.0, "bucket")
