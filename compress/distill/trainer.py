"""Supervised and white-box KD training on prompt/completion data with ``transformers.Trainer``.

One training function serves three jobs, chosen by the ``Objective``:
  * teacher bootstrap: CE on the reference answers (``kd_weight = 0``)
  * SFT baseline: CE on the teacher's completions (``kd_weight = 0``)
  * KD student: ``kd_weight * KD + (1 - kd_weight) * CE (+ hidden_weight * hidden-state MSE)`` on
    the same completions, KD being any divergence of ``compress.distill.losses``

Features, all from the library where the library has them:
  * the loss is chunked over tokens with the lm_head inside it (``compress.distill.chunked``): the
    full ``[tokens, vocab]`` logits of student and teacher never exist at once;
  * the teacher is the generate stage's cache in the batch, top-k (``teacher_ids``/
    ``teacher_logprobs``) or sampled ids with their counts (the unbiased estimator), or a model
    in the same process (``teacher_model``, no gradients); vocabularies that differ only by
    padding rows are cut to the shared ids;
  * an optional layerwise hidden-state MSE with a learned projection where the widths differ;
  * normalisation by the global count of completion tokens of the optimizer step (Trainer's
    ``num_items_in_batch``), so gradient accumulation and several processes give the same loss;
  * checkpoints every ``save_steps`` and resume from the last one (Trainer's own
    ``resume_from_checkpoint``, with optimizer, scheduler, RNG and data position), guarded by a
    fingerprint of everything that decides the weights;
  * LoRA through peft, merged into a plain checkpoint at the end;
  * several processes under torchrun (Trainer's DDP; gloo on CPU);
  * the loss curve (loss, KD, CE, hidden MSE, learning rate, grad norm) as JSON lines while it runs.

Only completion tokens carry loss (prompt labels are -100).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from compress.config import LoraConfig, TrainConfig
from compress.distill.chunked import DenseTeacher, Head, SampledTeacher, TopKTeacher, kd_ce_sums
from compress.distill.losses import LossSpec
from compress.jsonl import write_jsonl
from compress.models import load_model, load_tokenizer, save_checkpoint
from compress.student import first_vocab_difference

Progress = Callable[[float, str], None]
PROJECTION_FILE = "kd_hidden_projection.pt"


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


def encode_example(
    tokenizer, prompt: str, completion_ids: Sequence[int], prompt_ids: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """``input_ids`` = prompt ids + completion ids; ``labels`` mask the prompt with -100.

    ``prompt_ids`` are used as given when the data stage tokenized the prompt already.
    """
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": list(prompt_ids) + list(completion_ids),
        "labels": [-100] * len(prompt_ids) + list(completion_ids),
    }


class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts as a torch Dataset."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# Cache fields laid out per token by the collator, with the value that pads them (a padded row has
# log-prob -inf and count 0, so it weighs nothing).
TEACHER_FIELDS = {"teacher_ids": (torch.long, 0), "teacher_logprobs": (torch.float32, float("-inf")),
                  "teacher_counts": (torch.float32, 0.0), "teacher_proposal": (torch.float32, 0.0)}  # fmt: skip


def make_collator(pad_id: int, top_k: int | None, pack: bool = False):
    """Right-pad a batch; lay the teacher's cached rows out as ``[B, T, k]`` aligned with ``labels``.

    ``top_k`` set: the examples carry ``teacher_ids``/``teacher_logprobs`` (and, from a sampled cache,
    ``teacher_counts``/``teacher_proposal``) with one row per completion token.

    ``pack``: padding-free batches. The examples are packed first-fit into rows no longer than the
    longest of them, each with its own ``position_ids`` from 0 and no ``attention_mask``, so that
    transformers masks attention to a block per example (``find_packed_sequence_indices``). The loss
    is the same as padded (the first token of each example is never a target, as in a padded row).
    """

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(ex["input_ids"]) for ex in batch]
        width = max(lengths)
        rows = _first_fit(lengths, width) if pack else [[i] for i in range(len(batch))]
        n = len(rows)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        out = {"input_ids": input_ids, "labels": labels}
        fields = [f for f in TEACHER_FIELDS if top_k and f in batch[0]]
        for f in fields:
            dtype, fill = TEACHER_FIELDS[f]
            out[f] = torch.full((n, width, np.asarray(batch[0][f]).shape[-1]), fill, dtype=dtype)
        positions = torch.zeros((n, width), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                ex, end = batch[i], at + lengths[i]
                input_ids[r, at:end] = torch.tensor(ex["input_ids"])
                labels[r, at:end] = torch.tensor(ex["labels"])
                labels[r, at] = -100  # nothing of its own predicts an example's first token
                positions[r, at:end] = torch.arange(lengths[i])
                for f in fields:
                    rows_f = torch.as_tensor(np.asarray(ex[f]))
                    out[f][r, end - len(rows_f) : end] = rows_f.to(out[f].dtype)  # the completion: its end
                at = end
            # The padding tail counts from 0 too: a block of its own, outside every example's attention.
            positions[r, at:] = torch.arange(width - at)
        if pack:
            out["position_ids"] = positions
        else:
            out["attention_mask"] = _real_tokens(lengths, width)
        return out

    return collate


def _real_tokens(lengths: list[int], width: int) -> torch.Tensor:
    """``[B, width]`` 1 where a right-padded row has a token, 0 on its padding."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the examples per packed row, longest first into the first row with room
    (first-fit decreasing: within 22% of the fewest rows). Written here as it is ten lines."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def _pad_id(tokenizer) -> int:
    """The pad id, or EOS for tokenizers that have none (padding is masked out of the loss)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return pad


def output_head(model, vocab: int | None = None) -> Head:
    """The model's lm_head as a ``Head`` (Gemma-2's soft-capping included), cut to ``vocab`` rows."""
    out = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None) or getattr(
        getattr(model.config, "text_config", None), "final_logit_softcapping", None
    )
    weight, bias = out.weight, out.bias
    if vocab is not None and vocab < weight.shape[0]:
        weight, bias = weight[:vocab], (bias[:vocab] if bias is not None else None)
    return Head(weight, bias, cap)


def decoder_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    all_layers: bool = False,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """``[B, T, H]`` states after the final norm (the lm_head's input), and each layer's output if asked.

    The model's own forward (so that DDP and peft wrappers see it) with ``logits_to_keep=1``: the
    lm_head runs on one position only, so no ``[B, T, V]`` logits are made. transformers returns the
    final norm's output as the last hidden state; ``check_head`` verifies that for each model.
    A packed batch (``make_collator(pack=True)``) gives ``position_ids`` and no attention mask.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    states = out.hidden_states
    return states[-1], (tuple(states[1:]) if all_layers else None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` hidden states after the final norm (the lm_head's input); works through peft."""
    return decoder_states(model, input_ids, attention_mask)[0]


def check_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """The chunked loss recomputes logits as ``Head(hidden)``: refuse a model whose forward does more."""
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        got = output_head(model).logits(final_hidden(model, input_ids, attention_mask))
    err = (want - got).abs().max().item()
    if err > 1e-3 * max(1.0, want.abs().max().item()):
        raise ValueError(
            f"{type(model).__name__}: its logits are not lm_head(final hidden) (max difference {err:.3g}); "
            "the chunked KD loss does not support this architecture"
        )


def shared_vocab(student, teacher, student_tok=None, teacher_tok=None) -> int:
    """Logit rows both models share: the smaller vocabulary, when the rest is padding.

    Checkpoints often pad the embedding matrix past the tokenizer (to a multiple of 64 or 128); two
    models whose tokenizers agree differ only in those rows. Different tokenizers cannot be
    distilled token by token: that is a one-line error naming the first id that differs.
    """
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if student_tok is not None and teacher_tok is not None:
        a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
        diff = first_vocab_difference(a, b)
        if diff is not None:
            tok, i = diff
            raise ValueError(
                f"the teacher's and the student's tokenizers differ ({len(a)} vs {len(b)} tokens; first: "
                f"id {i} {tok!r}): token-level KD needs one tokenizer"
            )
        if min(v_s, v_t) < len(student_tok):
            raise ValueError(f"a model has fewer logit rows ({min(v_s, v_t)}) than its tokenizer ({len(student_tok)})")
    return min(v_s, v_t)


class HiddenMSE(torch.nn.Module):
    """Layerwise hidden-state distillation (Minitron): MSE between student and teacher layer outputs.

    Student layer ``j`` is matched to the teacher layer it came from when ``layer_map`` is given (the
    pruned student's kept layers, 0-based), else (1-based, of ``L_s``) to teacher layer
    ``round(j * L_t / L_s)``, so the last layers meet; one learned linear projection (student width
    to teacher width) is shared by every layer where the widths differ. The value per token is the
    mean over matched layers and channels of the squared difference.
    """

    def __init__(
        self,
        student_layers: int,
        teacher_layers: int,
        student_width: int,
        teacher_width: int,
        layer_map: Sequence[int] | None = None,
    ):
        super().__init__()
        if layer_map is None:
            self.pairs = [(j, max(1, round(j * teacher_layers / student_layers))) for j in range(1, student_layers + 1)]
        elif len(layer_map) != student_layers or not all(0 <= i < teacher_layers for i in layer_map):
            raise ValueError(
                f"hidden-state layer map {list(layer_map)} does not fit a {student_layers}-layer student of a "
                f"{teacher_layers}-layer teacher"
            )
        else:
            self.pairs = [(j + 1, i + 1) for j, i in enumerate(layer_map)]
        self.proj = (
            torch.nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width else None
        )

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor):
        """Sum over the masked positions of the per-token value (``mask`` ``[B, T]`` bool)."""
        total = torch.zeros((), device=mask.device)
        for j, i in self.pairs:
            s = student[j - 1][mask].float()
            if self.proj is not None:
                s = self.proj(s)
            total = total + (s - teacher[i - 1][mask].float()).pow(2).mean(-1).sum()
        return total / len(self.pairs)


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
        t_ids = inputs.pop("teacher_ids", None)
        t_lp = inputs.pop("teacher_logprobs", None)
        t_counts = inputs.pop("teacher_counts", None)
        t_prop = inputs.pop("teacher_proposal", None)
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
            if t_ids is None or t_lp is None:
                raise ValueError("kd_weight > 0 needs the teacher's top-k in the batch or a teacher model")
            rows = (t_ids[:, 1:][mask], t_lp[:, 1:][mask])
            if t_counts is not None:  # a sampled cache: the unbiased estimator
                prop = t_prop[:, 1:][mask] if t_prop is not None else None
                teacher = SampledTeacher(rows[0], t_counts[:, 1:][mask], rows[1], prop)
            else:
                teacher = TopKTeacher(*rows, obj.tail)
        loss_sum, kd_sum, ce_sum = kd_ce_sums(
            hidden,
            output_head(self.accelerator.unwrap_model(model), self.vocab),  # DDP hides get_output_embeddings
            labels[:, 1:][mask],
            teacher,
            obj.spec,
            obj.kd_weight,
            obj.chunk_size,
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


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


class _ProgressCallback(TrainerCallback):
    def __init__(self, progress: Progress):
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            frac = state.global_step / max(1, state.max_steps)
            self.progress(frac, f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")


class _JsonlLogCallback(TrainerCallback):
    """Append every training log line to a JSONL file as it happens (the live loss curve)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class _ProjectionCheckpoint(TrainerCallback):
    """Save the hidden-state projection with each checkpoint (Trainer saves only the model)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROJECTION_FILE
            torch.save(self.module.state_dict(), path)


def _fingerprint(init_dir: Path | None, model, examples: list[dict[str, Any]], parts: dict[str, Any]) -> str:
    """What decides the trained weights: the start weights, the data and every setting."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(str(init_dir).encode() if init_dir else b"")
    for p in model.state_dict().values():
        # The first values of each tensor: telling, and cheap even for a model on a GPU.
        h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    for ex in examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        for f in TEACHER_FIELDS:
            if f in ex:
                h.update(np.asarray(ex[f]).tobytes())
    return h.hexdigest()


def _resume_point(work: Path, fingerprint: str) -> str | None:
    """The last checkpoint in ``work`` when it was made by this same job; otherwise start afresh."""
    stamp = work / "fingerprint.txt"
    if work.is_dir() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return get_last_checkpoint(str(work))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return None


def _apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules if lora.target_modules == "all-linear" else lora.target_modules.split(",")
    cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def train_causal_lm(
    init_dir: Path | None,
    examples: list[dict[str, Any]],
    out_dir: Path,
    train: TrainConfig,
    objective: Objective | None = None,
    top_k: int | None = None,
    progress: Progress | None = None,
    model=None,
    tokenizer=None,
    device: str = "cpu",
    log_path: Path | None = None,
    teacher_model=None,
    lora: LoraConfig | None = None,
    save_steps: int = 0,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Train the checkpoint at ``init_dir`` (or the given ``model``) on ``device``; save it to ``out_dir``.

    Weights stay float32; with ``train.bf16`` on a GPU that supports it the forward runs in bf16
    autocast (Trainer's ``bf16``), the usual mixed-precision recipe. ``train.batch_size`` is the
    global batch: each of ``num_processes`` processes takes ``batch_size / (num_processes *
    gradient_accumulation_steps)`` sequences per micro-batch.

    ``examples`` are dicts from ``encode_example`` plus, for cached KD, ``teacher_ids`` /
    ``teacher_logprobs`` (``[n_completion_tokens, k]``). With ``save_steps`` > 0 a checkpoint is
    written every that many steps to ``<out_dir>.trainer/`` and a re-run of the same job resumes from
    the last one; the directory goes once the student is saved. With ``lora`` the adapters are
    trained and merged; the adapter itself is kept in ``out_dir/lora/``. Returns the training
    metrics (final loss, steps, seconds). ``log_path``: the log history (step, loss, KD, CE, learning
    rate, grad norm) as JSON lines, appended while training and rewritten whole at the end.
    """
    objective = objective or Objective()
    torch.manual_seed(train.seed)
    model = model if model is not None else load_model(init_dir, device=device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(init_dir)
    hidden_mse = None
    if objective.hidden_weight > 0:
        if teacher_model is None:
            raise ValueError("hidden_weight > 0 needs an online teacher model")
        hidden_mse = HiddenMSE(
            model.config.num_hidden_layers,
            teacher_model.config.num_hidden_layers,
            model.config.hidden_size,
            teacher_model.config.hidden_size,
            objective.hidden_layer_map,
        ).to(device)
    fingerprint = _fingerprint(
        init_dir,
        model,
        examples,
        {"train": train.model_dump(), "objective": asdict(objective), "lora": lora and lora.model_dump(),
         "teacher": teacher_model is not None and teacher_model.name_or_path, "processes": num_processes},
    )  # fmt: skip
    if lora is not None:
        model = _apply_lora(model, lora)
    work = Path(out_dir).with_name(Path(out_dir).name + ".trainer")
    log_every = max(1, train.max_steps // 20)
    # DistillConfig checks this at load; bootstrap and direct callers meet it here.
    if train.batch_size % (num_processes * train.gradient_accumulation_steps):
        raise ValueError(
            f"batch_size {train.batch_size} is not divisible by num_processes x gradient_accumulation_steps"
        )
    micro = train.batch_size // (num_processes * train.gradient_accumulation_steps)
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=train.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        warmup_steps=math.ceil(train.warmup_ratio * train.max_steps),
        weight_decay=train.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=log_every,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps or 500,
        save_total_limit=2,
        report_to=[],
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and num_processes > 1 else None,
        ddp_find_unused_parameters=False,  # every trained weight takes part in each step's loss
        bf16=train.bf16 and device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        seed=train.seed,
        data_seed=train.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    _ = args.device  # sets up the process group under torchrun (accelerate's PartialState)
    main = args.process_index == 0
    resume = _resume_point(work, fingerprint) if main else None
    if dist.is_available() and dist.is_initialized():
        # Every process resumes from the checkpoint the main one chose (it may have wiped a stale dir).
        box = [resume]
        dist.broadcast_object_list(box, src=0)
        resume = box[0]
    callbacks: list[TrainerCallback] = [_ProgressCallback(progress)] if progress else []
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        if main and resume is None:
            Path(log_path).unlink(missing_ok=True)
        callbacks.append(_JsonlLogCallback(Path(log_path)))
    if hidden_mse is not None:
        callbacks.append(_ProjectionCheckpoint(hidden_mse))
        if resume and (Path(resume) / PROJECTION_FILE).is_file():
            hidden_mse.load_state_dict(torch.load(Path(resume) / PROJECTION_FILE, map_location=device))
    cached_k = top_k if objective.kd_weight > 0 and teacher_model is None else None
    collate = make_collator(_pad_id(tokenizer), cached_k, pack=train.pack)
    probe = make_collator(_pad_id(tokenizer), None)(examples[: min(2, len(examples))])
    for m in (model, teacher_model):
        if m is not None:
            check_head(m, probe["input_ids"].to(device), probe["attention_mask"].to(device))
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(examples),
        data_collator=collate,
        callbacks=callbacks,
        objective=objective,
        teacher_model=teacher_model,
        hidden_mse=hidden_mse,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "steps": result.global_step,
        "train_loss": float(result.training_loss),
        "final_loss": float(history[-1]["loss"]) if history else None,
        "seconds": float(result.metrics.get("train_runtime", 0.0)),
        "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
        # Completion tokens seen by the loss (all processes; from resumed_from_step on).
        "train_tokens": trainer.completion_tokens(),
    }
    if hidden_mse is not None:  # for the record: the teacher layer (0-based) each student layer matched
        metrics["hidden_layers"] = [i - 1 for _, i in hidden_mse.pairs]
    if main:
        _save_student(trainer.model, tokenizer, Path(out_dir), lora is not None)
        if log_path is not None:
            write_jsonl(history, Path(log_path))
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def _save_student(model, tokenizer, out_dir: Path, is_lora: bool) -> None:
    """Save a plain checkpoint; LoRA adapters are merged into it (and kept beside, in ``lora/``)."""
    if not is_lora:
        save_checkpoint(model, tokenizer, out_dir)
        return
    adapter = out_dir.with_name(out_dir.name + ".lora")
    model.save_pretrained(str(adapter))
    merged = model.merge_and_unload()
    save_checkpoint(merged, tokenizer, out_dir)
    shutil.move(str(adapter), str(out_dir / "lora"))
