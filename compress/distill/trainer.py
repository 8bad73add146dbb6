"""Supervised and white-box KD training on prompt/completion data with ``transformers.Trainer``.

One training function, ``train_causal_lm``, serves three jobs, chosen by the run's ``Objective``:
  * teacher bootstrap: CE on the reference answers (``kd_weight = 0``)
  * SFT baseline: CE on the teacher's completions (``kd_weight = 0``)
  * KD student: ``kd_weight * KD + (1 - kd_weight) * CE (+ hidden_weight * hidden-state MSE)`` on
    the same completions, KD being any divergence of ``compress.distill.losses``

Features, all from the library where the library has them, each in its own module:
  * examples and batches, padded or packed without padding (``compress.distill.batches``);
  * the loss chunked over tokens with the lm_head inside it (``compress.distill.chunked``,
    ``compress.distill.heads``): the full ``[tokens, vocab]`` logits of student and teacher never
    exist at once;
  * the teacher as the generate stage's cache in the batch, top-k (``teacher_ids``/
    ``teacher_logprobs``) or sampled ids with their counts (the unbiased estimator), or as a model
    in the same process (``TrainRun.teacher``, no gradients); vocabularies that differ only by
    padding rows are cut to the shared ids (``compress.distill.kd_trainer``);
  * an optional layerwise hidden-state MSE with a learned projection where the widths differ
    (``compress.distill.hidden_mse``);
  * normalisation by the global count of completion tokens of the optimizer step (Trainer's
    ``num_items_in_batch``), so gradient accumulation and several processes give the same loss;
  * checkpoints every ``save_steps`` and resume from the last one (Trainer's own
    ``resume_from_checkpoint``, with optimizer, scheduler, RNG and data position), guarded by a
    fingerprint of everything that decides the weights (``compress.distill.resume``);
  * LoRA through peft, merged into a plain checkpoint at the end (``compress.distill.lora``);
  * several processes under torchrun (Trainer's DDP; gloo on CPU);
  * the loss curve (loss, KD, CE, hidden MSE, learning rate, grad norm) as JSON lines while it runs
    (``compress.distill.callbacks``).

Only completion tokens carry loss (prompt labels are -100).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from compress.config import LoraConfig, TrainConfig
from compress.distill.batches import ListDataset, make_collator, pad_id
from compress.distill.callbacks import (
    PROJECTION_FILE,
    JsonlLogCallback,
    Progress,
    ProgressCallback,
    ProjectionCheckpoint,
)
from compress.distill.heads import check_head
from compress.distill.hidden_mse import HiddenMSE
from compress.distill.kd_trainer import KDTrainer, Objective
from compress.distill.lora import apply_lora, save_student
from compress.distill.resume import agreed_resume_point, fingerprint
from compress.jsonl import write_jsonl


@dataclass(frozen=True)
class TrainRun:
    """One training run apart from its data and output: what is trained, against what, and how.

    ``model`` and ``tokenizer``: the student as loaded on ``device``. ``objective``: plain CE by
    default. ``teacher``: an online teacher model in this process (None: the cache in the examples,
    or no teacher); ``top_k``: entries per token of the cached teacher rows. ``lora``: train
    adapters and merge them. ``save_steps`` > 0: checkpoints to resume from. ``num_processes``: the
    processes of a torchrun job (the global batch is split among them). ``log_path``: the loss
    curve as JSON lines. ``init_dir``: where the start weights came from (part of the fingerprint).
    """

    model: Any
    tokenizer: Any
    train: TrainConfig
    objective: Objective = field(default_factory=Objective)
    teacher: Any = None
    top_k: int | None = None
    lora: LoraConfig | None = None
    save_steps: int = 0
    num_processes: int = 1
    device: str = "cpu"
    log_path: Path | None = None
    init_dir: Path | None = None


def train_causal_lm(
    run: TrainRun, examples: Sequence[dict[str, Any]], out_dir: Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Train ``run.model`` on ``run.device`` on ``examples``; save it to ``out_dir``.

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
    # The order below is the order the seeded RNG is drawn in (projection, then LoRA): keep it.
    torch.manual_seed(run.train.seed)
    hidden_mse = _hidden_loss(run)
    stamp = fingerprint(run.init_dir, run.model, examples, _settings(run))
    model = apply_lora(run.model, run.lora) if run.lora is not None else run.model
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".trainer")
    args = _training_args(run, work)
    _ = args.device  # sets up the process group under torchrun (accelerate's PartialState)
    main = args.process_index == 0
    resume = agreed_resume_point(work, stamp, main)
    callbacks = _callbacks(run, progress, fresh_log=main and resume is None)
    if hidden_mse is not None:
        callbacks.append(ProjectionCheckpoint(hidden_mse))
        if resume and (Path(resume) / PROJECTION_FILE).is_file():
            hidden_mse.load_state_dict(
                torch.load(Path(resume) / PROJECTION_FILE, map_location=run.device, weights_only=True)
            )
    cached_k = run.top_k if run.objective.kd_weight > 0 and run.teacher is None else None
    collate = make_collator(pad_id(run.tokenizer), cached_k, pack=run.train.pack)
    _check_heads((model, run.teacher), run, examples)
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(examples),
        data_collator=collate,
        callbacks=callbacks,
        objective=run.objective,
        teacher_model=run.teacher,
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
        save_student(trainer.model, run.tokenizer, out_dir, run.lora is not None)
        if run.log_path is not None:
            write_jsonl(history, Path(run.log_path))
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def _hidden_loss(run: TrainRun) -> HiddenMSE | None:
    """The hidden-state loss (with its projection, freshly drawn) when the objective weighs it."""
    if run.objective.hidden_weight <= 0:
        return None
    if run.teacher is None:
        raise ValueError("hidden_weight > 0 needs an online teacher model")
    student, teacher = run.model.config, run.teacher.config
    return HiddenMSE(
        student.num_hidden_layers,
        teacher.num_hidden_layers,
        student.hidden_size,
        teacher.hidden_size,
        run.objective.hidden_layer_map,
    ).to(run.device)


def _settings(run: TrainRun) -> dict[str, Any]:
    """Every setting of the run that decides the weights, for its fingerprint."""
    return {
        "train": run.train.model_dump(),
        "objective": asdict(run.objective),
        "lora": run.lora and run.lora.model_dump(),
        "teacher": run.teacher is not None and run.teacher.name_or_path,
        "processes": run.num_processes,
    }


def _training_args(run: TrainRun, work: Path) -> TrainingArguments:
    """Trainer's arguments: the micro-batch of each process, cosine schedule, checkpoints in ``work``."""
    train, processes, device = run.train, run.num_processes, run.device
    # DistillConfig checks this at load; bootstrap and direct callers meet it here.
    if train.batch_size % (processes * train.gradient_accumulation_steps):
        raise ValueError(
            f"batch_size {train.batch_size} is not divisible by num_processes x gradient_accumulation_steps"
        )
    return TrainingArguments(
        output_dir=str(work),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size // (processes * train.gradient_accumulation_steps),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        warmup_steps=math.ceil(train.warmup_ratio * train.max_steps),
        weight_decay=train.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=max(1, train.max_steps // 20),
        save_strategy="steps" if run.save_steps > 0 else "no",
        save_steps=run.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and processes > 1 else None,
        ddp_find_unused_parameters=False,  # every trained weight takes part in each step's loss
        bf16=train.bf16 and device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        seed=train.seed,
        data_seed=train.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )


def _callbacks(run: TrainRun, progress: Progress | None, fresh_log: bool) -> list[TrainerCallback]:
    """Progress reports and the live loss log; ``fresh_log``: a new run, so an old log goes."""
    callbacks: list[TrainerCallback] = [ProgressCallback(progress)] if progress else []
    if run.log_path is not None:
        log_path = Path(run.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if fresh_log:
            log_path.unlink(missing_ok=True)
        callbacks.append(JsonlLogCallback(log_path))
    return callbacks


def _check_heads(models: Sequence[Any], run: TrainRun, examples: Sequence[dict[str, Any]]) -> None:
    """``check_head`` of each model (student, teacher) on the first two examples."""
    probe = make_collator(pad_id(run.tokenizer), None)(examples[: min(2, len(examples))])
    for m in models:
        if m is not None:
            check_head(m, probe["input_ids"].to(run.device), probe["attention_mask"].to(run.device))
