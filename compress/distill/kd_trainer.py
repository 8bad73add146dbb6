"""The ``transformers.Trainer`` of the distill and bootstrap runs, and the objective it trains.

Features:
  * ``Objective``: plain CE (SFT baseline, teacher bootstrap) or ``kd_weight * KD + (1 - kd_weight)
    * CE (+ hidden_weight * hidden-state MSE)``, KD being any divergence of
    ``compress.distill.losses``;
  * ``KDTrainer.compute_loss``: the loss chunked over tokens with the lm_head inside it
    (``compress.distill.chunked``): the full ``[tokens, vocab]`` logits never exist at once;
  * the teacher from the batch (the generate stage's top-k or sampled cache, per token) or a model
    in the same process (no gradients, its vocabulary cut to the ids both models share);
  * normalisation by the global count of completion tokens of the optimizer step (Trainer's
    ``num_items_in_batch``), so that gradient accumulation and several processes give the same loss;
  * the mean KD, CE and hidden MSE of each logging window logged beside the loss, and the count of
    completion tokens the loss saw (both summed over processes);
  * the hidden-state projection trained with the student (its own parameter group, gradients
    averaged over processes by hand: it lives outside the DDP-wrapped model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer

from compress.distill.batches import TEACHER_FIELDS
from compress.distill.chunked import DenseTeacher, KDMix, SampledTeacher, Teacher, TopKTeacher, kd_ce_sums
from compress.distill.heads import decoder_states, output_head, shared_vocab
from compress.distill.losses import LossSpec


@dataclass(frozen=True)
class Objective:
    """What the student is trained against. The default is plain CE (SFT, teacher bootstrap)."""

    kd_weight: float = 0.0
    spec: LossSpec = field(default_factory=LossSpec)
    tail: str = "renormalize"
    hidden_weight: float = 0.0
    chunk_size: int | None = None
    # The teacher layer (0-based) whose output each student layer matches in the hidden-state loss:
    # a pruned student's kept layers. None: evenly spaced (``HiddenMSE``).
    hidden_layer_map: tuple[int, ...] | None = None

    @property
    def mix(self) -> KDMix:
        """The KD + CE part, as the chunked loss takes it."""
        return KDMix(self.spec, self.kd_weight, self.chunk_size)


class KDTrainer(Trainer):
    """``Trainer`` whose loss is ``kd_weight * KD + (1 - kd_weight) * CE (+ hidden MSE)``, chunked.

    The KD term is any ``LossSpec`` against the cached top-k (``teacher_ids``/``teacher_logprobs``
    in the batch) or an online teacher model (``teacher_model``, run without gradients). The mean
    KD, CE and hidden MSE of each logging window are logged beside the loss (summed over processes).
    """

    def __init__(self, *args, objective: Objective | None = None, teacher_model=None, hidden_mse=None, **kw):
        super().__init__(*args, **kw)
        self.objective = objective or Objective()
        self.teacher_model, self.hidden_mse = teacher_model, hidden_mse
        self.vocab = shared_vocab(self.model, teacher_model) if teacher_model is not None else None
        # Our loss divides by the global count of target tokens: have Trainer count them for every
        # model, over labels[:, 1:] as our shift does.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._window = torch.zeros(4, dtype=torch.float64)  # KD, CE, hidden MSE sums, tokens since the last log
        self._tokens_seen = torch.zeros((), dtype=torch.float64)  # completion tokens in the loss, this session
        if hidden_mse is not None and self.args.world_size > 1:
            # The projection lives outside the DDP-wrapped model: average its gradients by hand.
            world = self.args.world_size
            for p in hidden_mse.parameters():
                p.register_hook(lambda g: _all_reduce_(g) / world)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        obj = self.objective
        labels = inputs.pop("labels")
        cached = {f: inputs.pop(f, None) for f in TEACHER_FIELDS}  # not model inputs
        ids, attn, pos = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
        # Shift: position t predicts token t+1; the teacher rows are stored at the target position.
        mask = labels[:, 1:] != -100
        with_layers = self.hidden_mse is not None and obj.hidden_weight > 0
        final, layers = decoder_states(model, ids, attn, with_layers, pos)
        hidden = final[:, :-1][mask]
        teacher, hidden_sum = None, torch.zeros((), device=hidden.device)
        if self.teacher_model is not None and (obj.kd_weight > 0 or with_layers):
            with torch.no_grad():
                t_final, t_layers = decoder_states(self.teacher_model, ids, attn, with_layers, pos)
            teacher = DenseTeacher(hidden=t_final[:, :-1][mask], head=output_head(self.teacher_model, self.vocab))
            if with_layers:
                hidden_sum = self.hidden_mse([h[:, :-1] for h in layers], [h[:, :-1] for h in t_layers], mask)
        elif obj.kd_weight > 0:
            teacher = _cached_teacher(cached, mask, obj.tail)
        loss_sum, kd_sum, ce_sum = kd_ce_sums(
            hidden,
            output_head(self.accelerator.unwrap_model(model), self.vocab),  # DDP hides get_output_embeddings
            labels[:, 1:][mask],
            teacher,
            obj.mix,
        )
        loss_sum = loss_sum + obj.hidden_weight * hidden_sum
        tokens = mask.sum()
        stats = torch.stack([kd_sum.detach(), ce_sum.detach(), hidden_sum.detach(), tokens.float()])
        stats = stats.double().cpu()
        self._window += stats
        self._tokens_seen += stats[3]
        if num_items_in_batch is None:
            loss = loss_sum / tokens.clamp(min=1)
        else:
            # num_items_in_batch counts the step's tokens on every process; DDP averages gradients
            # over processes, so scale back up by their number (as Trainer's own compute_loss does).
            loss = loss_sum / num_items_in_batch * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            window = self._window.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(window)  # every process logs at the same steps
            kd, ce, mse, n = window.tolist()
            self._window.zero_()
            if n > 0:
                logs = logs | {"ce": round(ce / n, 6)}
                if self.objective.kd_weight > 0:
                    logs["kd"] = round(kd / n, 6)
                if self.objective.hidden_weight > 0:
                    logs["hidden_mse"] = round(mse / n, 6)
        super().log(logs, *args, **kwargs)

    def completion_tokens(self) -> int:
        """Completion tokens the loss saw in this session (since a resume), summed over processes.

        Prompt and padding tokens are not counted: only the targets the KD and CE terms average over.
        """
        seen = self._tokens_seen.to(self.args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(seen)  # every process calls this once, after train()
        return int(seen.item())

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.hidden_mse is not None and self.hidden_mse.proj is not None:
            # The projection is trained with the student but is not part of it (never saved with it).
            optimizer.add_param_group({"params": list(self.hidden_mse.parameters()), "weight_decay": 0.0})
        return optimizer


def _cached_teacher(cached: dict[str, Any], mask: torch.Tensor, tail: str) -> Teacher:
    """The batch's cached teacher rows at the target positions: top-k, or sampled with their counts."""
    t_ids, t_lp = cached["teacher_ids"], cached["teacher_logprobs"]
    if t_ids is None or t_lp is None:
        raise ValueError("kd_weight > 0 needs the teacher's top-k in the batch or a teacher model")
    rows = (t_ids[:, 1:][mask], t_lp[:, 1:][mask])
    t_counts, t_prop = cached["teacher_counts"], cached["teacher_proposal"]
    if t_counts is not None:  # a sampled cache: the unbiased estimator
        prop = t_prop[:, 1:][mask] if t_prop is not None else None
        return SampledTeacher(rows[0], t_counts[:, 1:][mask], rows[1], prop)
    return TopKTeacher(*rows, tail)


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` summed over every process."""
    t = t.clone()
    dist.all_reduce(t)
    return t
