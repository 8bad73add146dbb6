"""Trainer callbacks of a training run: progress, the live loss log, the projection's checkpoint.

Features:
  * ``ProgressCallback``: each logged step to a ``Progress`` callable (fraction done, a line of text);
  * ``JsonlLogCallback``: every log line (loss, KD, CE, hidden MSE, learning rate, grad norm)
    appended to a JSONL file as it happens, so that a live run can be followed;
  * ``ProjectionCheckpoint``: the hidden-state projection saved into each Trainer checkpoint
    (``PROJECTION_FILE``), since Trainer saves only the model.

Only process 0 reports and writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

Progress = Callable[[float, str], None]
PROJECTION_FILE = "kd_hidden_projection.pt"


class ProgressCallback(TrainerCallback):
    """Report each logged step to ``progress`` as (fraction of the steps done, a line of text)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            frac = state.global_step / max(1, state.max_steps)
            self.progress(frac, f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")


class JsonlLogCallback(TrainerCallback):
    """Append every training log line to a JSONL file as it happens (the live loss curve)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class ProjectionCheckpoint(TrainerCallback):
    """Save the hidden-state projection with each checkpoint (Trainer saves only the model)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROJECTION_FILE
            torch.save(self.module.state_dict(), path)
