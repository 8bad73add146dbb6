"""lm-eval on the held-out task world through a local task YAML (no dataset hub needed).

The held-out split is written as JSON lines next to a task YAML (``dataset_path: json``); lm-eval
loads it with ``TaskManager(include_path=..., include_defaults=False)`` and scores greedy
generations (stopped at the newline) by exact match against the reference answer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from compress.config import EvaluateConfig
from compress.data.taskworld import END, write_jsonl

TASK_NAME = "distillflow_taskworld"
METRIC = "exact_match"


def write_task(rows: list[dict], tasks_dir: Path, max_gen_toks: int) -> Path:
    """Write ``heldout.jsonl`` and the lm-eval task YAML into ``tasks_dir``; return the YAML path."""
    tasks_dir = Path(tasks_dir).resolve()
    data = write_jsonl(rows, tasks_dir / "heldout.jsonl")
    spec = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": [END], "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    path = tasks_dir / f"{TASK_NAME}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def evaluate_checkpoint(model_dir: Path, tasks_dir: Path, cfg: EvaluateConfig, seed: int = 0) -> dict[str, Any]:
    """Run lm-eval's HF backend on ``model_dir`` over the task in ``tasks_dir``.

    Returns ``{"score", "stderr", "n", "seconds"}`` where score is exact match on the held-out split.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported here: lm-eval pulls in datasets/evaluate and is only needed by this stage.
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.time()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={Path(model_dir).resolve()},device=cpu,dtype=float32",
        tasks=[TASK_NAME],
        task_manager=TaskManager(include_path=str(Path(tasks_dir).resolve()), include_defaults=False),
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    res = results["results"][TASK_NAME]
    key = next(k for k in res if k.startswith(f"{METRIC},"))
    stderr = res.get(key.replace(METRIC, f"{METRIC}_stderr", 1))
    n = results.get("n-samples", {}).get(TASK_NAME, {}).get("effective")
    return {
        "score": float(res[key]),
        "stderr": float(stderr) if isinstance(stderr, int | float) else None,
        "n": n,
        "seconds": round(time.time() - t0, 2),
    }
