"""lm-eval on a checkpoint: the task world's held-out split, installed tasks and the user's task YAMLs.

The held-out split is written as JSON lines next to a task YAML (``dataset_path: json``) and scored
by exact match of greedy generations stopped at the newline. Other tasks come from lm-eval's own
index or ``evaluate.include_path``. Results keep lm-eval's task and metric names, with stderr.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from compress.config import TASKWORLD_TASK, EvaluateConfig
from compress.data.taskworld import END, write_jsonl
from evaluation.tasks import TASKWORLD_LM_EVAL

TASK_NAME = TASKWORLD_LM_EVAL
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


def evaluate_checkpoint(
    model_dir: Path,
    cfg: EvaluateConfig,
    taskworld_dir: Path | None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval's HF backend on ``model_dir`` over every task of ``cfg``.

    Returns ``{"scores": {task: {metric: {"value", "stderr"}}}, "n": {task: examples}, "seconds"}``,
    with lm-eval's own task and metric names (a metric's filter is kept when it is not ``none``,
    as in ``exact_match,strict-match``).
    """
    # Imported here: lm-eval pulls in datasets/evaluate and is only needed by this stage.
    import lm_eval

    from evaluation.tasks import lm_eval_names, task_manager

    t0 = time.time()
    model_args = f"pretrained={Path(model_dir).resolve()},device={device},dtype={dtype}"
    if trust_remote_code:
        model_args += ",trust_remote_code=True"
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=lm_eval_names(cfg),
        task_manager=task_manager(cfg, taskworld_dir),
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn and cfg.apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    return {
        "scores": parse_scores(results["results"]),
        "n": {t: v.get("effective") for t, v in (results.get("n-samples") or {}).items()},
        "seconds": round(time.time() - t0, 2),
    }


def parse_scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's ``results`` as ``{task: {metric: {"value", "stderr"}}}`` (numeric metrics only)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, res in results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name, filt = key.split(",", 1)
            stderr = res.get(f"{name}_stderr,{filt}")
            label = name if filt == "none" else f"{name},{filt}"
            metrics[label] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            }
        if metrics:
            out[TASKWORLD_TASK if task == TASK_NAME else task] = metrics
    return out


def headline(scores: dict[str, dict[str, dict[str, float | None]]], cfg: EvaluateConfig) -> tuple[str, str]:
    """(task, metric) of the headline score: ``evaluate.headline``, or the first task's first metric."""
    if cfg.headline:
        task, _, metric = cfg.headline.partition("/")
        if task not in scores or metric not in scores[task]:
            known = ", ".join(f"{t}/{m}" for t in scores for m in scores[t])
            raise ValueError(f"evaluate.headline: '{cfg.headline}' is not among the results ({known})")
        return task, metric
    first = cfg.tasks[0]
    task = first if first in scores else next(iter(scores))
    return task, next(iter(scores[task]))
