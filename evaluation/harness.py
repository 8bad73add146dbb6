"""lm-eval on a checkpoint: the task world's held-out split, installed tasks and the user's task YAMLs.

The held-out split is written as JSON lines next to a task YAML (``dataset_path: json``) and scored
by exact match of greedy generations stopped at the newline. Other tasks come from lm-eval's own
index or ``evaluate.include_path``. Results keep lm-eval's task and metric names, with stderr.

Two backends run the same tasks: ``hf`` (lm-eval's in-process transformers model) and ``vllm``
(the checkpoint served by a vLLM server from its own venv, driven by lm-eval's
``local-completions`` model: generation and log-likelihood tasks alike). The vLLM server is the
generate stage's (``compress.serving``); it serves in the checkpoint's own dtype so that both
backends score the same model.

With the teacher's held-out answers in the job (``EvaluateJob.fidelity``), the checkpoint's fidelity
to the teacher (``evaluation.fidelity``) joins the scores as task ``fidelity``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from compress.config import TASKWORLD_TASK, EvaluateConfig
from compress.data.taskworld import END, LANG
from compress.jobs import Checkpoint, EvaluateJob
from compress.jsonl import write_jsonl
from compress.lineage import write_json
from compress.serving.vllm_server import ServerSpec, VLLMServer
from evaluation.tasks import (
    HUMANEVAL_PASS1,
    LANGUAGE_LM_EVAL,
    LANGUAGE_TASK,
    SHIPPED_TASKS,
    TASKWORLD_LM_EVAL,
    family_task,
    humaneval_max_gen_toks,
    lm_eval_names,
    ours_name,
)

if TYPE_CHECKING:
    from compress.data.language import Language

TASK_NAME = TASKWORLD_LM_EVAL
METRIC = "exact_match"
# lm-eval's rolling metric; on the language's one-byte characters it is bits per character.
LANGUAGE_METRIC = "bits_per_byte"
LANGUAGE_FLOOR = "language_floor.json"


def write_task(rows: list[dict], tasks_dir: Path, max_gen_toks: int, language: Language | None = None) -> Path:
    """Write the held-out split's lm-eval tasks into ``tasks_dir``; return the directory.

    Task rows go to ``heldout.jsonl`` and an exact-match generation task. ``lang`` rows (whole
    texts) go to ``language.jsonl`` and a ``loglikelihood_rolling`` task, each text scored from
    the BOS token with its end marker; with the ``language`` that drew them, its exact floor on
    those very texts is written to ``language_floor.json`` (``compress.data.language.floor``).
    """
    tasks_dir = Path(tasks_dir).resolve()
    tasks = [r for r in rows if r.get("task") != LANG]
    texts = [r["answer"] + END for r in rows if r.get("task") == LANG]
    for stale in (f"{TASK_NAME}.yaml", f"{LANGUAGE_LM_EVAL}.yaml", LANGUAGE_FLOOR):
        (tasks_dir / stale).unlink(missing_ok=True)
    data = write_jsonl(tasks, tasks_dir / "heldout.jsonl")
    if tasks:
        _write_local_task(
            TASK_NAME,
            data,
            output_type="generate_until",
            doc_to_target="{{answer}}",
            generation_kwargs={"until": [END], "do_sample": False, "max_gen_toks": max_gen_toks},
            metric_list=[{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
        )
    if texts:
        docs = write_jsonl([{"text": t} for t in texts], tasks_dir / "language.jsonl")
        _write_local_task(
            LANGUAGE_LM_EVAL,
            docs,
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="{{text}}",
            metric_list=[{"metric": LANGUAGE_METRIC, "aggregation": LANGUAGE_METRIC, "higher_is_better": False}],
        )
        if language is not None:
            from compress.data.language import floor

            write_json(tasks_dir / LANGUAGE_FLOOR, floor(language, texts))
    return tasks_dir


def _write_local_task(name: str, data: Path, **fields: Any) -> Path:
    """An lm-eval task YAML over a local JSON-lines file (``prompt`` is the text), beside the data."""
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "target_delimiter": "",
        **fields,
        "metadata": {"version": 1.0},
    }
    path = data.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_choice_task(rows: list[dict], tasks_dir: Path, name: str, n_choices: int = 3, seed: int = 0) -> Path:
    """The held-out rows as an ``n_choices``-way multiple-choice task (log-likelihood, ``acc``).

    Each row's choices are its answer and answers of other rows, in a seeded order. A
    log-likelihood view of the same split, for checks that need one (backends, benchmarks).
    """
    rng = random.Random(seed)
    answers = sorted({r["answer"] for r in rows})
    if len(answers) < n_choices:
        raise ValueError(f"{n_choices} choices need at least {n_choices} distinct answers, found {len(answers)}")
    out = []
    for r in rows:
        choices = [r["answer"], *rng.sample([a for a in answers if a != r["answer"]], n_choices - 1)]
        rng.shuffle(choices)
        out.append({"prompt": r["prompt"], "choices": choices, "label": choices.index(r["answer"])})
    tasks_dir = Path(tasks_dir).resolve()
    data = write_jsonl(out, tasks_dir / f"{name}.jsonl")
    return _write_local_task(
        name,
        data,
        output_type="multiple_choice",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    )


def standalone_job(model_dir: Path, evaluate: EvaluateConfig, tasks_dir: Path | None, **fields: Any) -> EvaluateJob:
    """An ``EvaluateJob`` for a checkpoint evaluated outside a run (bench scripts, tests).

    Unless ``fields`` say otherwise: labelled ``model``, in float32 on the CPU, logs in ``logs/``
    beside the checkpoint, no evaluation-set identity (nothing is cached) and no fidelity.
    """
    defaults: dict[str, Any] = {
        "model": Checkpoint(path=Path(model_dir), identity=None),
        "label": "model",
        "eval_id": "",
        "dtype": "float32",
        "device": "cpu",
        "log_dir": Path(model_dir).parent / "logs",
    }
    return EvaluateJob(evaluate=evaluate, tasks_dir=tasks_dir, **(defaults | fields))


def evaluate_checkpoint(job: EvaluateJob, seed: int = 0, log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval on ``job.model`` over every task of ``job.evaluate``, in process or served by vLLM,
    and measure its fidelity to the teacher when ``job.fidelity`` and ``evaluate.fidelity`` are set.

    Returns ``{"scores": {task: {metric: {"value", "stderr"}}}, "n": {task: examples}, "seconds",
    "backend", "throughput"}``, with lm-eval's own task and metric names (a metric's filter is kept
    when it is not ``none``, as in ``exact_match,strict-match``); the fidelity scores and prompt
    count join ``scores`` and ``n`` as task ``fidelity`` (``seconds`` is lm-eval's time alone).
    ``throughput`` is the vLLM serving measurement (``evaluation.throughput``) or None when it is
    not asked for. With ``log_samples``, ``samples`` holds each task's per-example outcome in
    document order: the generation (generation tasks) or the index of the most likely choice
    (log-likelihood tasks). The vLLM server logs to ``job.log_dir/vllm-eval-<label>.log``.
    """
    t0 = time.time()
    # The task world's per-example outcomes give its per-family scores.
    samples = log_samples or TASK_NAME in lm_eval_names(job.evaluate, job.tasks_dir)
    results, throughput = _run_backend(job, seed, samples)
    out = {"backend": job.evaluate.backend, "throughput": throughput}
    if log_samples:
        out["samples"] = {_ours(t): _outcomes(rows) for t, rows in (results.get("samples") or {}).items()}
    result = out | _scores_and_counts(results) | {"seconds": round(time.time() - t0, 2)}
    if job.fidelity is not None and job.evaluate.fidelity is not None:
        from evaluation.fidelity import evaluate_fidelity

        fid = evaluate_fidelity(job.fidelity, job.model.path, job.evaluate.fidelity, job.device)
        result["scores"] |= fid["scores"]
        result["n"] |= fid["n"]
    return result


def _run_backend(job: EvaluateJob, seed: int, log_samples: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """lm-eval's results on ``job.evaluate.backend``, and the vLLM serving throughput when asked for."""
    from evaluation.throughput import measure_throughput, throughput_prompts

    evaluate, model = job.evaluate, job.model
    throughput = None
    if evaluate.backend == "hf":
        results = _run_lm_eval("hf", _hf_args(job), job, seed, log_samples)
    # One server per model, started after an in-process evaluation has let its model go.
    if evaluate.uses_vllm:
        log = Path(job.log_dir) / f"vllm-eval-{job.label}.log"
        with serve_for_eval(model.path, evaluate, job.dtype, model.trust_remote_code, job.label, log) as server:
            if evaluate.backend == "vllm":
                # lm-eval's API models read the key from the environment only.
                with _env(OPENAI_API_KEY=server.api_key):
                    results = _run_lm_eval("local-completions", _completions_args(server, job), job, seed, log_samples)
            if evaluate.measures_throughput:
                prompts = throughput_prompts(job.tasks_dir, evaluate.vllm.throughput_prompts)
                throughput = measure_throughput(server, model.path, prompts, evaluate.vllm)
    return results, throughput


def _scores_and_counts(results: dict[str, Any]) -> dict[str, Any]:
    """``{"scores", "n"}`` of lm-eval's results, the task world's families after its own entry."""
    n = {_ours(t): v.get("effective") for t, v in (results.get("n-samples") or {}).items()}
    families = family_scores((results.get("samples") or {}).get(TASK_NAME) or [])
    scores = with_families(
        parse_scores(results["results"], results.get("higher_is_better")), {f: v for f, (v, _) in families.items()}
    )
    return {"scores": scores, "n": n | {f: count for f, (_, count) in families.items()}}


def family_scores(samples: list[dict[str, Any]]) -> dict[str, tuple[dict[str, dict[str, float | None]], int]]:
    """The task world's exact match per family, from lm-eval's per-example records (``log_samples``):
    ``{"taskworld_<family>": ({"exact_match": {"value", "stderr"}}, examples)}``.

    Each record carries its document (with the row's ``task``) and its metric; the stderr is
    lm-eval's own ``mean_stderr``, as for the whole task.
    Families come in the order of the held-out split; a second filter's record of a document is
    not counted again.
    """
    from lm_eval.api.metrics import mean_stderr

    by_family: dict[str, list[float]] = {}
    seen: set[int] = set()
    for row in sorted(samples, key=lambda r: r["doc_id"]):
        if row["doc_id"] in seen or METRIC not in row or "task" not in row["doc"]:
            continue
        seen.add(row["doc_id"])
        by_family.setdefault(row["doc"]["task"], []).append(float(row[METRIC]))
    out = {}
    for family, values in by_family.items():
        stderr = mean_stderr(values) if len(values) > 1 else None  # undefined for one example
        out[family_task(family)] = ({METRIC: {"value": sum(values) / len(values), "stderr": stderr}}, len(values))
    return out


def with_families(
    scores: dict[str, dict[str, dict[str, float | None]]], families: dict[str, dict[str, dict[str, float | None]]]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """``scores`` with the per-family entries right after the task world's own (the headline stays first)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, metrics in scores.items():
        out[task] = metrics
        if task == TASKWORLD_TASK:
            out |= families
    return out | families


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_args(job: EvaluateJob) -> str:
    """lm-eval's in-process ``hf`` model on the job's checkpoint, device and dtype."""
    args = f"pretrained={Path(job.model.path).resolve()},device={job.device},dtype={job.dtype}"
    return args + (",trust_remote_code=True" if job.model.trust_remote_code else "")


def _completions_args(server: VLLMServer, job: EvaluateJob) -> str:
    """lm-eval's ``local-completions`` against our server, with the checkpoint's own tokenizer."""
    # Token ids, not text: lm-eval tokenizes with the checkpoint's tokenizer and the server scores
    # exactly those ids (text would be re-tokenized server-side, where a BOS or a different split
    # would shift the log-likelihood slices). lm-eval's hf model keeps the tokenizer's own BOS
    # behaviour, its API models add none: ask for the BOS where the tokenizer adds one.
    model_dir, trust_remote_code = job.model.path, job.model.trust_remote_code
    bos = tokenizer_adds_bos(model_dir, trust_remote_code)
    args = (
        f"base_url={server.base_url}/v1/completions,model={server.served_name},"
        f"tokenizer={Path(model_dir).resolve()},tokenizer_backend=huggingface,tokenized_requests=True,"
        f"num_concurrent={job.evaluate.vllm.num_concurrent},max_retries=3,max_length={server.max_model_len},"
        f"timeout=600,add_bos_token={bos}"
    )
    return args + (",trust_remote_code=True" if trust_remote_code else "")


def tokenizer_adds_bos(model_dir: Path, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint's tokenizer puts a BOS token in front of plain text by default."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]


def _outcomes(rows: list[dict[str, Any]]) -> list[Any]:
    """Per document: the filtered generation, or the index of the highest log-likelihood choice."""
    out = []
    for row in sorted(rows, key=lambda r: r["doc_id"]):
        resps = row["filtered_resps"]
        if resps and isinstance(resps[0], list | tuple):  # [(loglik, is_greedy), ...] per choice
            out.append(max(range(len(resps)), key=lambda i: resps[i][0]))
        else:
            out.append(resps[0] if isinstance(resps, list) and len(resps) == 1 else resps)
    return out


def _run_lm_eval(model: str, model_args: str, job: EvaluateJob, seed: int, log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of ``model`` (``hf`` or ``local-completions``) on the job's tasks."""
    # Imported here: lm-eval pulls in datasets/evaluate and is only needed by this stage.
    import lm_eval

    from evaluation.tasks import task_manager

    evaluate = job.evaluate
    tm = task_manager(evaluate, job.tasks_dir)
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=_with_budgets(lm_eval_names(evaluate, job.tasks_dir), tm, evaluate),
        task_manager=tm,
        num_fewshot=evaluate.num_fewshot,
        batch_size=evaluate.batch_size,
        limit=evaluate.limit,
        apply_chat_template=evaluate.apply_chat_template,
        fewshot_as_multiturn=evaluate.fewshot_as_multiturn and evaluate.apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=log_samples,
    )


def _with_budgets(names: list[str], tm: Any, evaluate: EvaluateConfig) -> list[Any]:
    """``names``, with ``humaneval_pass1`` loaded as a task that has the configured generation budget
    (and, in process, all of HumanEval's stop sequences: a server takes only some of them)."""
    from evaluation.realtext import HUMANEVAL_SERVER_STOP, HUMANEVAL_STOP

    pass1 = SHIPPED_TASKS[HUMANEVAL_PASS1]
    if pass1 not in names:
        return names
    task = tm.load([pass1])["tasks"][pass1]
    stop = HUMANEVAL_STOP if evaluate.backend == "hf" else HUMANEVAL_SERVER_STOP
    task.set_config(
        key="generation_kwargs",
        value={"max_gen_toks": humaneval_max_gen_toks(evaluate), "until": list(stop)},
        update=True,
    )
    return [task if n == pass1 else n for n in names]


def serving_dtype(model_dir: Path, dtype: str) -> str:
    """The dtype to serve in: ``auto`` is the checkpoint's own (vLLM's ``auto`` would serve a
    float32 checkpoint in half precision, and the backends would no longer compare)."""
    if dtype != "auto":
        return dtype
    config = json.loads((Path(model_dir) / "config.json").read_text())
    found = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(found).removeprefix("torch.")


def served_length(model_dir: Path, wanted: int) -> int:
    """``wanted`` capped at the checkpoint's ``max_position_embeddings`` (vLLM refuses more)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return min(wanted, int(limit)) if limit else wanted


def serve_for_eval(
    model_dir: Path, cfg: EvaluateConfig, dtype: str, trust_remote_code: bool, label: str, log_path: Path
) -> VLLMServer:
    """A vLLM server for ``model_dir`` (the generate stage's lifecycle: own venv, loopback, group stop)."""
    spec = ServerSpec(
        model_dir=model_dir,
        python=cfg.vllm.vllm_python,
        served_name=label,
        dtype=serving_dtype(model_dir, dtype),
        max_model_len=served_length(model_dir, cfg.vllm.max_model_len),
        max_logprobs=20,
        kv_cache_gib=cfg.vllm.kv_cache_gib,
        startup_timeout_s=cfg.vllm.startup_timeout_s,
        trust_remote_code=trust_remote_code,
    )
    return VLLMServer(spec, log_path)


def parse_scores(
    results: dict[str, dict[str, Any]], higher_is_better: dict[str, dict[str, bool | None]] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """lm-eval's ``results`` as ``{task: {metric: {"value", "stderr"}}}`` (numeric metrics only).

    ``higher_is_better`` is the section of that name in what ``simple_evaluate`` returns (``{task:
    {metric: bool}}``, metrics without their filter); where it records a direction, the score keeps
    it as ``"higher_is_better"`` (``compress.metrics.lower_is_better`` prefers it to the name).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, res in results.items():
        directions = (higher_is_better or {}).get(task) or {}
        metrics: dict[str, dict[str, Any]] = {}
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
            if isinstance(directions.get(name), bool):
                metrics[label]["higher_is_better"] = directions[name]
        if metrics:
            out[_ours(task)] = metrics
    return out


def _ours(task: str) -> str:
    """lm-eval's task name as results show it: the task world's are ``taskworld`` and ``language``, the
    shipped tasks' their own (``pydoc_ppl``)."""
    return {TASK_NAME: TASKWORLD_TASK, LANGUAGE_LM_EVAL: LANGUAGE_TASK}.get(task, ours_name(task))


def language_nll(scores: dict[str, dict[str, dict[str, float | None]]]) -> float | None:
    """Per-character NLL (nats) on the task world's language, from lm-eval's bits per byte (its
    characters are one byte each), or None when the language was not evaluated."""
    value = (scores.get(LANGUAGE_TASK, {}).get(LANGUAGE_METRIC) or {}).get("value")
    return None if value is None else value * math.log(2)


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
