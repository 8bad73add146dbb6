"""The distill stage counts the tokens it trained on: completion tokens seen by the loss, over every
step and micro-batch, padded or packed (the report's "tokens trained")."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from compress.config import DistillConfig
from compress.distill.recipe import distill_student
from compress.distill.teacher_signal import load_cached_examples
from compress.models import load_model, load_tokenizer, save_checkpoint
from tests.distill_data import TEACHER, distill_job, make_distill_data

N = 8  # examples; with batch_size N every step sees each of them once


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_distill_data(tmp_path_factory.mktemp("tokens-data"), n=N, k=4)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    model, tok = load_model(TEACHER), load_tokenizer(TEACHER)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    out = tmp_path_factory.mktemp("tokens-student") / "s"
    save_checkpoint(model, tok, out)
    return out


class Setting(NamedTuple):
    """One way of training: KD from the cache or SFT, packed or padded, micro-batches, processes."""

    kd: bool
    pack: bool
    accumulate: int
    processes: int


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting",
    # The last under torchrun: the count is summed over ranks.
    [Setting(True, False, 1, 1), Setting(False, True, 2, 1), Setting(True, False, 1, 2)],
    ids=["kd-padded", "sft-packed-accumulated", "kd-two-processes"],
)
def test_train_tokens_are_the_completion_tokens_seen_by_the_loss(data, student, tmp_path, setting: Setting):
    examples = load_cached_examples(data / "data", data / "logits", load_tokenizer(student), with_teacher=False)
    assert len(examples) == N
    # The targets of one pass: completion labels, the first position of each example never one.
    per_pass = sum(sum(label != -100 for label in ex["labels"][1:]) for ex in examples)
    steps = 3
    accumulate, pack = setting.accumulate, setting.pack
    train = {"max_steps": steps, "batch_size": N, "gradient_accumulation_steps": accumulate, "pack": pack}
    cfg = DistillConfig(save_steps=0, num_processes=setting.processes, train=train)
    metrics = distill_student(distill_job(student, data, cfg, tmp_path / "out", kd=setting.kd))
    assert metrics["steps"] == steps and metrics["processes"] == setting.processes
    assert metrics["train_tokens"] == steps * per_pass > 0
