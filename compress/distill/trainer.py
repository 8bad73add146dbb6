"""Supervised and white-box KD training on prompt/completion data with ``transformers.Trainer``.

One training function serves three jobs, chosen by the loss weights:
  * teacher bootstrap: CE on the reference answers (``kd_weight = 0``)
  * SFT baseline: CE on the teacher's completions (``kd_weight = 0``)
  * KD student: ``alpha * KL(teacher top-k || student) + (1 - alpha) * CE`` on the same completions

Only completion tokens carry loss (prompt labels are -100). Each example may carry the teacher's
top-k ids and log-probs for every completion token; the collator lays them out as ``[B, T, k]``
aligned with ``labels``. The loss is averaged over the valid tokens of the batch (no gradient
accumulation is used, so the per-batch count is the global count).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from compress.config import TrainConfig
from compress.data.taskworld import write_jsonl
from compress.distill.losses import kd_ce_loss
from compress.models import load_model, load_tokenizer, save_checkpoint

Progress = Callable[[float, str], None]


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


def make_collator(pad_id: int, top_k: int | None):
    """Right-pad a batch; lay teacher top-k out as ``[B, T, k]`` (log-prob -inf where absent)."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        n = len(batch)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attn}
        if top_k:
            t_ids = torch.zeros((n, width, top_k), dtype=torch.long)
            t_lp = torch.full((n, width, top_k), float("-inf"), dtype=torch.float32)
            out |= {"teacher_ids": t_ids, "teacher_logprobs": t_lp}
        for i, ex in enumerate(batch):
            L = len(ex["input_ids"])
            input_ids[i, :L] = torch.tensor(ex["input_ids"])
            labels[i, :L] = torch.tensor(ex["labels"])
            attn[i, :L] = 1
            if top_k and "teacher_ids" in ex:
                m = len(ex["teacher_ids"])  # one row per completion token, at the end of the sequence
                t_ids[i, L - m : L] = torch.as_tensor(np.asarray(ex["teacher_ids"]))
                t_lp[i, L - m : L] = torch.as_tensor(np.asarray(ex["teacher_logprobs"], dtype=np.float32))
        return out

    return collate


def _pad_id(tokenizer) -> int:
    """The pad id, or EOS for tokenizers that have none (padding is masked out of the loss)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return pad


class KDTrainer(Trainer):
    """``Trainer`` whose loss is ``kd_weight * top-k forward KL + (1 - kd_weight) * CE``."""

    def __init__(self, *args, kd_weight: float = 0.0, temperature: float = 1.0, tail: str = "renormalize", **kw):
        super().__init__(*args, **kw)
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.tail = tail

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        t_ids = inputs.pop("teacher_ids", None)
        t_lp = inputs.pop("teacher_logprobs", None)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # Shift: position t predicts token t+1; the teacher rows are stored at the target position.
        logits = outputs.logits[:, :-1]

        def shift(x):
            return x[:, 1:] if x is not None else None

        loss, _ = kd_ce_loss(
            logits, labels[:, 1:], shift(t_ids), shift(t_lp), self.kd_weight, self.temperature, self.tail
        )
        return (loss, outputs) if return_outputs else loss


class _ProgressCallback(TrainerCallback):
    def __init__(self, progress: Progress, every: int):
        self.progress, self.every = progress, max(1, every)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            frac = state.global_step / max(1, state.max_steps)
            self.progress(frac, f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")


def train_causal_lm(
    init_dir: Path,
    examples: list[dict[str, Any]],
    out_dir: Path,
    train: TrainConfig,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    tail: str = "renormalize",
    top_k: int | None = None,
    progress: Progress | None = None,
    model=None,
    tokenizer=None,
    device: str = "cpu",
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Train the checkpoint at ``init_dir`` (or the given ``model``) on ``device``; save it to ``out_dir``.

    Weights stay float32; with ``train.bf16`` on a GPU that supports it the forward runs in bf16
    autocast (Trainer's ``bf16``), the usual mixed-precision recipe.

    ``examples`` are dicts from ``encode_example`` plus, for KD, ``teacher_ids``/``teacher_logprobs``
    (``[n_completion_tokens, k]``). Returns the training metrics (final loss, steps, seconds).
    ``log_path``: Trainer's log history (step, loss, learning rate, grad norm) as JSON lines, for
    the loss-curve plot.
    """
    torch.manual_seed(train.seed)
    model = model if model is not None else load_model(init_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(init_dir)
    work = Path(out_dir).with_name(Path(out_dir).name + ".trainer")
    log_every = max(1, train.max_steps // 20)
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        warmup_steps=math.ceil(train.warmup_ratio * train.max_steps),
        weight_decay=train.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=log_every,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        bf16=train.bf16 and device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        seed=train.seed,
        data_seed=train.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(examples),
        data_collator=make_collator(_pad_id(tokenizer), top_k if kd_weight > 0 else None),
        callbacks=[_ProgressCallback(progress, log_every)] if progress else None,
        kd_weight=kd_weight,
        temperature=temperature,
        tail=tail,
    )
    result = trainer.train()
    save_checkpoint(trainer.model, tokenizer, Path(out_dir))
    shutil.rmtree(work, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if log_path is not None:
        write_jsonl([h for h in trainer.state.log_history if "loss" in h], Path(log_path))
    return {
        "steps": result.global_step,
        "train_loss": float(result.training_loss),
        "final_loss": float(losses[-1]) if losses else None,
        "seconds": float(result.metrics.get("train_runtime", 0.0)),
    }
