"""Which units to keep: importance against the baselines, at the same parameter budget.

The easy world's teacher (``assets/teacher-tiny``, 1.59M parameters) is pruned to half its
parameters (``prune.method: both``, ``target_ratio`` 0.5) five times: by importance, by
``last_layers`` and by ``random`` with seeds 0, 1 and 2, all on the same 128 task-world calibration
texts; the figure is each student's calibration loss on the answers, untrained. Writes
``bench/results/prune_selection.json``. ``tests/test_prune.py`` checks the ordering on every run.

    .venv/bin/python bench/prune_selection.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import ROOT, write_result

from compress.config import PruneConfig, TaskWorldConfig
from compress.data.taskworld import make_splits
from compress.prune.prune import prune_model, standalone_job

ARMS = [("importance", 0), ("last_layers", 0), ("random", 0), ("random", 1), ("random", 2)]


def main() -> None:
    teacher = ROOT / "assets" / "teacher-tiny"
    world = TaskWorldConfig()
    train, _ = make_splits(world.tasks, 128, world.n_heldout, world.seed)
    texts = [r["prompt"] + r["answer"] + "\n" for r in train]
    starts = [len(r["prompt"]) for r in train]
    losses, rec = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for how, seed in ARMS:
            cfg = PruneConfig(method="both", target_ratio=0.5, selection=how, seed=seed)
            rec = prune_model(standalone_job(teacher, texts, cfg, Path(tmp) / f"{how}{seed}" / "pruned", starts))
            losses[f"{how}_{seed}"] = round(rec["calibration_loss_after"], 4)
            print(f"{how} (seed {seed}): calibration loss {losses[f'{how}_{seed}']}")
    result = {
        "teacher": "assets/teacher-tiny",
        "calibration_texts": len(texts),
        "calibration_loss_teacher": round(rec["calibration_loss_before"], 4),
        "params_after": rec["params_after"],
        "student_shape": rec["student_shape"],
        "calibration_loss": losses,
    }
    print(write_result("prune_selection", result))


if __name__ == "__main__":
    main()
