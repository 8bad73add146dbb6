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
    ce_only, _ = kd_ce_loss(logits, labels, None, kd_weight=0.0)
    m = labels != -100
    torch.testing.assert_close(ce_only, F.cross_entropy(logits[m], labels[m]))
    mixed, stats = kd_ce_loss(logits, labels, (ids, vals), kd_weight=0.5)
    kd = topk_forward_kl(logits[m], ids[m], vals[m]).mean()
    torch.testing.assert_close(mixed, 0.5 * kd + 0.5 * ce_only)
    assert stats["kd"] == pytest.approx(float(kd)) and stats["ce"] == pytest.approx(float(ce_only))
    with pytest.raises(ValueError, match="needs teacher"):
        kd_ce_loss(logits, labels, None, kd_weight=0.5)


def test_bucket_rejects_temperature():
    with pytest.raises(ValueError, match="temperature 1"):
        topk_forward_kl(torch.randn(1, 4), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 2.0, "bucket")


# --- every divergence against a naive full-vocabulary reference (docs/references.md#kd-losses) ---

from compress.distill.losses import LOSSES, LossSpec, dense_loss, sampled_loss, topk_loss  # noqa: E402


def _naive(name: str, t_logits, s_logits, temperature=1.0, alpha=0.1, beta=0.5):
    """Straight from the formulas, on probabilities (no log-space tricks)."""
    p = F.softmax(t_logits / temperature, -1)
    q = F.softmax(s_logits / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        out = kl(p, q)
    elif name == "reverse_kl":
        out = kl(q, p)
    elif name == "skew_forward_kl":
        out = kl(p, alpha * p + (1 - alpha) * q)
    elif name == "skew_reverse_kl":
        out = kl(q, (1 - alpha) * p + alpha * q)
    elif name == "jsd":
        if beta == 0.0:
            out = kl(p, q)
        elif beta == 1.0:
            out = kl(q, p)
        else:
            m = beta * p + (1 - beta) * q
            out = beta * kl(p, m) + (1 - beta) * kl(q, m)
    else:
        out = 0.5 * (p - q).abs().sum(-1)
    return out * temperature**2


SETTINGS = [(name, 1.0, {}) for name in LOSSES] + [
    ("forward_kl", 2.0, {}),
    ("reverse_kl", 0.5, {}),
    ("skew_forward_kl", 1.0, {"alpha": 0.3}),
    ("skew_reverse_kl", 2.0, {"alpha": 0.3}),
    ("jsd", 1.0, {"beta": 0.0}),
    ("jsd", 1.0, {"beta": 1.0}),
    ("jsd", 1.5, {"beta": 0.9}),
    ("tvd", 2.0, {}),
]


@pytest.mark.parametrize(("name", "temperature", "kw"), SETTINGS)
def test_dense_loss_equals_naive_value_and_gradient(name, temperature, kw):
    torch.manual_seed(10)
    t = torch.randn(6, 50) * 2
    s1 = (torch.randn(6, 50) * 2).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    got = dense_loss(LossSpec(name, temperature, **kw), s1, t)
    want = _naive(name, t, s2, temperature, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn(6)  # a random upstream gradient, so every position's gradient is checked
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_with_k_equal_vocab_is_dense(name, tail):
    torch.manual_seed(11)
    t, s = torch.randn(5, 40), torch.randn(5, 40, requires_grad=True)
    s2 = s.detach().clone().requires_grad_()
    vals, ids = F.log_softmax(t, -1).topk(40, -1)
    got = topk_loss(LossSpec(name), s, ids, vals, tail)
    want = dense_loss(LossSpec(name), s2, t)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_topk_bucket_is_the_divergence_over_k_plus_one_outcomes(name):
    torch.manual_seed(12)
    t, s = torch.randn(4, 30), torch.randn(4, 30)
    lp_t, lp_s = F.log_softmax(t, -1), F.log_softmax(s, -1)
    vals, ids = lp_t.topk(5, -1)
    got = topk_loss(LossSpec(name), s, ids, vals, "bucket")
    q_k = lp_s.gather(-1, ids).exp()
    p_k = vals.exp()
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got, _naive(name, p.log(), q.log()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "kw"), [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}),
                                          ("tvd", {}), ("skew_forward_kl", {}), ("skew_reverse_kl", {})])  # fmt: skip
def test_sampled_estimator_converges_to_dense(name, kw):
    """Draws from the teacher (r = p) and from a flatter proposal: the mean over draws approaches the dense
    value and gradient, within 5 standard errors of that mean (an unbiased estimator passes; a biased one,
    such as a renormalised top-k, would not as the draws grow)."""
    torch.manual_seed(13)
    V, positions, draws, repeats = 20, 3, 64, 400
    t, s = torch.randn(positions, V), torch.randn(positions, V, requires_grad=True)
    spec = LossSpec(name, **kw)
    dense = dense_loss(spec, s, t)
    g_dense = torch.autograd.grad(dense.sum(), s)[0]
    log_p = F.log_softmax(t, -1)
    for proposal in ("teacher", "flat"):
        log_r = log_p if proposal == "teacher" else F.log_softmax(t / 3.0, -1)
        values, grads = [], []
        for _ in range(repeats):
            x = torch.multinomial(log_r.exp(), draws, replacement=True)  # [positions, draws]
            ids, counts = _unique_counts(x, V)
            loss = sampled_loss(spec, s, ids, counts, log_p.gather(-1, ids),
                                None if proposal == "teacher" else log_r.gather(-1, ids))  # fmt: skip
            values.append(loss.detach())
            grads.append(torch.autograd.grad(loss.sum(), s)[0])
        for got, want in ((torch.stack(values), dense.detach()), (torch.stack(grads), g_dense)):
            se = got.std(0) / repeats**0.5
            assert ((got.mean(0) - want).abs() <= 5 * se + 1e-4).all(), (proposal, got.mean(0) - want, se)
            assert se.max() < 0.05  # and the draws do pin it down


def _unique_counts(x: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the distinct drawn ids and their counts, padded with count 0 (as the cache stores them)."""
    counts_full = torch.zeros(x.shape[0], V).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float))
    m = int((counts_full > 0).sum(-1).max())
    counts, ids = counts_full.topk(m, -1)
    return ids, counts


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        LossSpec("kl")
    with pytest.raises(ValueError, match="alpha and beta"):
        LossSpec("jsd", beta=1.5)
    with pytest.raises(ValueError, match="bucket"):
        topk_loss(LossSpec("forward_kl", 2.0), torch.randn(2, 5), torch.zeros(2, 2), torch.zeros(2, 2), "bucket")
