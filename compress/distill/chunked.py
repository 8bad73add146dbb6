"""KD + CE with the lm_head inside the loss, computed a chunk of tokens at a time.

The student's ``[tokens, vocab]`` float32 logits are the largest tensor of KD training (4096 tokens
x 128256 ids is 2.1 GB, and autograd keeps several of them). Here they never exist whole: for each
chunk of ``chunk_size`` tokens the logits are computed from the final hidden states, the loss and
its gradient with respect to those logits are taken at once, and the gradients with respect to the
hidden states and the lm_head weight are accumulated; the chunk's logits are then freed. Peak
memory grows with the chunk size, not with the sequence length, and no matmul is repeated (the
same design as Liger-Kernel's fused linear distillation losses; torchtune's chunked KL still holds
all logits). An online teacher's logits are made the same way, chunk by chunk, without gradients.

Features:
  * ``kd_ce_sums``: ``kd_weight * KD + (1 - kd_weight) * CE`` summed over the tokens, with KD and CE
    apart for the log, and the gradients to the hidden states and the head (weight, bias);
  * ``KDMix``: the divergence (``LossSpec``), its weight and the chunk size (None: about
    ``CHUNK_ELEMENTS`` logits per chunk, ``auto_chunk``);
  * ``Head``: a linear output layer with Gemma-2's logit soft-capping;
  * three teacher forms: ``DenseTeacher`` (full logits, or hidden states and a head: an online
    teacher), ``TopKTeacher`` (the cache's top-k, tail renormalised or bucketed) and
    ``SampledTeacher`` (sampled ids with their counts: the unbiased estimator).

Written by hand because no maintained library offers it for our losses on CPU and GPU alike:
Liger-Kernel's fused losses are Triton (GPU only) and cover JSD and forward KL, not the top-k and
sampled teacher forms, skew KL or TVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from compress.distill.losses import LossSpec, dense_loss, sampled_loss, topk_loss


@dataclass
class Head:
    """An output layer: ``logits = softcap(hidden @ weight.T + bias)`` (Gemma-2 caps its logits)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = F.linear(hidden, self.weight, self.bias).float()
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z


@dataclass
class DenseTeacher:
    """Full teacher logits, given (``logits``) or made per chunk from its hidden states and head."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: Head | None = None

    def rows(self, a: int, b: int) -> DenseTeacher:
        if self.logits is not None:
            return DenseTeacher(logits=self.logits[a:b])
        with torch.no_grad():
            return DenseTeacher(logits=self.head.logits(self.hidden[a:b]))  # type: ignore[union-attr,index]

    def loss(self, spec: LossSpec, student_logits: torch.Tensor) -> torch.Tensor:
        return dense_loss(spec, student_logits, self.logits)  # type: ignore[arg-type]


@dataclass
class TopKTeacher:
    """The cache's top-k ids and raw log-probs per token (``-inf`` = missing)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: str = "renormalize"

    def rows(self, a: int, b: int) -> TopKTeacher:
        return TopKTeacher(self.ids[a:b], self.logprobs[a:b], self.tail)

    def loss(self, spec: LossSpec, student_logits: torch.Tensor) -> torch.Tensor:
        return topk_loss(spec, student_logits, self.ids, self.logprobs, self.tail)


@dataclass
class SampledTeacher:
    """Sampled teacher ids with their counts, log p and the proposal's log r (None: r = p)."""

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    proposal: torch.Tensor | None = None

    def rows(self, a: int, b: int) -> SampledTeacher:
        prop = None if self.proposal is None else self.proposal[a:b]
        return SampledTeacher(self.ids[a:b], self.counts[a:b], self.logprobs[a:b], prop)

    def loss(self, spec: LossSpec, student_logits: torch.Tensor) -> torch.Tensor:
        return sampled_loss(spec, student_logits, self.ids, self.counts, self.logprobs, self.proposal)


Teacher = DenseTeacher | TopKTeacher | SampledTeacher
# Logits per chunk when the size is automatic: 2^23 float32 values (32 MiB) per [chunk, vocab]
# tensor. A dense JSD keeps about 16 such tensors alive at its peak (measured), so about 0.5 GB;
# 65 tokens at Llama 3's 128256 ids, 262 at 32000. Larger chunks were no faster on CPU
# (bench/kd_trainer.py: 1048 tokens at 32000 ids peaked 0.76 GB higher at the same speed;
# bench/kd_loss.py at 128256 ids: 131 tokens took 45 s and 2.2 GB, 65 tokens 37 s and 1.8 GB).
CHUNK_ELEMENTS = 1 << 23


def auto_chunk(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab`` ids (``CHUNK_ELEMENTS`` logits per chunk)."""
    return max(1, CHUNK_ELEMENTS // vocab)


@dataclass(frozen=True)
class KDMix:
    """How the chunked loss mixes its terms: ``kd_weight * KD + (1 - kd_weight) * CE``, KD by ``spec``.

    ``chunk_size`` tokens per chunk; None sizes chunks to about ``CHUNK_ELEMENTS`` logits each.
    """

    spec: LossSpec = field(default_factory=LossSpec)
    kd_weight: float = 0.0
    chunk_size: int | None = None


def kd_ce_sums(
    hidden: torch.Tensor, head: Head, labels: torch.Tensor, teacher: Teacher | None, mix: KDMix
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum of kd_weight*KD + (1-kd_weight)*CE, sum of KD, sum of CE)`` over the given tokens.

    ``hidden`` is ``[N, H]`` (final hidden states of the positions to score, already shifted and
    masked), ``labels`` ``[N]``; the teacher describes the same N positions. Only the first sum
    carries gradients (to ``hidden`` and to the head's weight and bias where they require them).
    Divide by the number of tokens (global under gradient accumulation) to get the mean.
    """
    chunk_size = mix.chunk_size or auto_chunk(head.weight.shape[0])
    if mix.kd_weight > 0 and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    bias = head.bias if head.bias is not None else hidden.new_zeros(0)
    # Inside autograd.Function.forward grad mode always reads False: ask here.
    plan = _Plan(head.softcap, labels, teacher, replace(mix, chunk_size=chunk_size), torch.is_grad_enabled())
    return _ChunkedKDCE.apply(hidden, head.weight, bias, plan)


@dataclass(frozen=True)
class _Plan:
    """Everything of one ``kd_ce_sums`` call that takes no gradient."""

    softcap: float | None
    labels: torch.Tensor
    teacher: Teacher | None
    mix: KDMix  # its chunk size resolved
    want_grad: bool


class _ChunkedKDCE(torch.autograd.Function):
    """Forward computes the sums and, chunk by chunk, the gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        softcap, spec, kd_weight, chunk_size = plan.softcap, plan.mix.spec, plan.mix.kd_weight, plan.mix.chunk_size
        needs = tuple(plan.want_grad and x for x in (hidden.requires_grad, weight.requires_grad, bias.requires_grad))
        needs = (needs[0], needs[1], needs[2] and bias.numel() > 0)
        head = Head(weight.detach(), bias.detach() if bias.numel() else None, softcap)
        g_hidden = torch.zeros_like(hidden) if needs[0] else None
        g_weight = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        g_bias = torch.zeros_like(bias, dtype=torch.float32) if needs[2] else None
        totals = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk_size):
            b = min(a + chunk_size, hidden.shape[0])
            h = hidden[a:b].detach()
            with torch.enable_grad():
                z = F.linear(h, head.weight, head.bias).float().requires_grad_(any(needs))
                logits = torch.tanh(z / softcap) * softcap if softcap else z
                # At kd_weight 1 the CE is only logged: no gradient (and no backward pass) through it.
                ce = F.cross_entropy(logits if kd_weight < 1 else logits.detach(), plan.labels[a:b], reduction="sum")
                kd = plan.teacher.rows(a, b).loss(spec, logits).sum() if kd_weight > 0 else torch.zeros_like(ce)
                loss = kd_weight * kd + (1.0 - kd_weight) * ce
                if z.requires_grad:
                    (g_z,) = torch.autograd.grad(loss, z)
            totals += torch.stack([loss.detach(), kd.detach(), ce.detach()])
            if z.requires_grad:
                if g_hidden is not None:
                    g_hidden[a:b] = (g_z.to(head.weight.dtype) @ head.weight).to(hidden.dtype)
                if g_weight is not None:
                    g_weight.addmm_(g_z.t(), h.float())  # in place: no [vocab, hidden] temporary per chunk
                if g_bias is not None:
                    g_bias += g_z.sum(0)
            del z, logits, loss  # the chunk's [chunk, vocab] tensors go before the next chunk's come
        # Kept on ctx, not saved for backward: backward hands these very tensors to autograd (no copy
        # of a gradient as large as the lm_head), which it can only do if nothing else holds them.
        ctx.grads = [g_hidden, g_weight, g_bias]
        ctx.dtypes = (weight.dtype, bias.dtype)
        loss_sum, kd_sum, ce_sum = totals.unbind()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_ce):
        if ctx.grads is None:
            raise RuntimeError("kd_ce_sums: a second backward through the same loss is not supported")
        g_hidden, g_weight, g_bias = ctx.grads
        ctx.grads = None
        return (
            g_hidden.mul_(g_loss) if g_hidden is not None else None,
            g_weight.mul_(g_loss).to(ctx.dtypes[0]) if g_weight is not None else None,
            g_bias.mul_(g_loss).to(ctx.dtypes[1]) if g_bias is not None else None,
            None,  # the plan
        )
