"""Everything a run checks before its first stage, the stages' cache keys, and ``distillflow plan``.

``preflight`` resolves the teacher (local directory, hub id: cache first, then the hub, or a GGUF
file: converted once, then cached), reads its ``config.json``, reads and checks every data source
and every evaluation task, and raises a one-line ``ConfigError`` naming the field, file or task at
the first fault. No weights are loaded (but for a GGUF teacher's first conversion, about 30 s for
135M parameters) and Prefect is not imported, so the CLI can run it in seconds before it starts the flow; the flow
runs it again for callers that come through Python or a deployment.

``cache_status`` hands the flow's own stage declarations (``stages.pipeline``) to a runner that
runs nothing and compares each stage's key and outputs with the run directory's manifest, so
``plan`` can say which stages of an earlier run in the same directory would be cache hits.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.config import (
    ConfigError,
    DatasetSource,
    EvaluateConfig,
    PipelineConfig,
    SelfInstructSource,
    TaskWorldConfig,
    first_line,
)
from compress.hub import ResolvedModel, checkpoint_layout, read_model_config, resolve_model, text_config
from compress.lineage import hash_cache_file, sha256_path, sha256_path_cached, source_hash
from evaluation.tasks import SHIPPED_TASKS, evaluated_names

HEAD_ROWS = 5


@dataclass
class Preflight:
    """What the checks found: the teacher on disk, its shape, the data and the evaluation tasks."""

    teacher: ResolvedModel
    model_config: dict[str, Any]
    layout: dict[str, Any]
    student: dict[str, Any]
    data: list[str] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    student_model: ResolvedModel | None = None  # student.path resolved, when the user gives the student


def preflight(cfg: PipelineConfig, full: bool = True) -> Preflight:
    """Check the whole config against the world; ``full`` reads every data record (run), else the first rows (plan).

    ``full`` also downloads a hub teacher's weights (when the hub is reachable), so that no stage
    starts on a teacher that is not there.
    """
    from compress.hub import go_offline_if_unreachable
    from evaluation.tasks import check_tasks

    warnings = []
    if cfg.teacher.trust_remote_code:
        warnings.append("teacher.trust_remote_code is on: the checkpoint's own Python code will run")
    if not cfg.teacher.is_local or _needs_hub_datasets(cfg):
        go_offline_if_unreachable()
    # config.json and the tokenizer first: every check runs before a hub teacher's weights download.
    teacher = resolve_model(cfg.teacher, download=False)
    model_config = read_model_config(teacher.path)
    tc = text_config(model_config)
    if "num_hidden_layers" not in tc:
        raise ConfigError(f"teacher.path: '{cfg.teacher.path}' config.json has no num_hidden_layers (not a decoder)")
    student_model = None
    if cfg.student is None:
        student = check_prune(cfg, teacher)
    else:
        student_model, student = check_student(cfg, teacher, full)
    check_generate(cfg)
    needs_template = cfg.evaluate.apply_chat_template or any(
        getattr(s, "messages_field", None) or isinstance(s, SelfInstructSource)
        for s in [*cfg.effective_data().sources, cfg.prune.calibration_source]
    )
    if full or needs_template:
        tokenizer = _tokenizer(cfg, teacher)
        if cfg.evaluate.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("evaluate.apply_chat_template: the teacher's tokenizer has no chat template")
    else:
        tokenizer = None
    data = check_data(cfg, tokenizer, full, model_config)
    tasks = check_tasks(cfg.evaluate, list(cfg.taskworld.tasks)) + check_fidelity(cfg)
    _check_headline(cfg, tasks)
    check_evaluation(cfg.evaluate, pipeline_models(cfg), tasks)
    if full and teacher.hub_id:
        teacher = resolve_model(cfg.teacher, download=True)
    layout = checkpoint_layout(teacher.path, model_config)
    if cfg.student is not None:
        student["params_before"] = layout["params"]
        student["ratio"] = student["params_after"] / layout["params"]
    return Preflight(teacher, model_config, layout, student, data, tasks, warnings, student_model)


def check_fidelity(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The fidelity measurement's description, or []; it needs a source that holds prompts out."""
    fid = cfg.evaluate.fidelity
    if fid is None:
        return []
    held = sum(getattr(s, "heldout", 0) or 0 for s in cfg.effective_data().sources)
    if not held:
        raise ConfigError(
            "evaluate.fidelity: no data source holds prompts out (give a self_instruct source a 'heldout' count)"
        )
    data = f"{min(fid.prompts, held)} held-out prompts, the teacher's greedy answers of {fid.max_new_tokens} tokens"
    return [{"task": "fidelity", "lm_eval": "fidelity", "data": data}]


def check_student(cfg: PipelineConfig, teacher: ResolvedModel, full: bool) -> tuple[ResolvedModel, dict[str, Any]]:
    """A student of the user's own: found, a decoder, and sharing the teacher's vocabulary and chat template."""
    from compress.models import load_tokenizer
    from compress.student import StudentMismatch, check_compatible

    assert cfg.student is not None
    resolved = resolve_model(cfg.student, download=full)
    config = read_model_config(resolved.path)
    tc = text_config(config)
    if "num_hidden_layers" not in tc:
        raise ConfigError(f"student.path: '{cfg.student.path}' config.json has no num_hidden_layers (not a decoder)")
    try:
        teacher_tok = load_tokenizer(teacher.path, cfg.teacher.trust_remote_code)
        student_tok = load_tokenizer(resolved.path, cfg.student.trust_remote_code)
    except Exception as e:
        raise ConfigError(f"student.path: cannot load the tokenizers to compare: {first_line(e)}") from None
    try:
        check_compatible(teacher_tok, student_tok)
    except StudentMismatch as e:
        raise ConfigError(str(e)) from None
    from transformers import AutoConfig

    from compress.prune.shape import shape_of

    layout = checkpoint_layout(resolved.path, config)
    # The prune stage's shape record (as adopt_student writes it), from the student's own config.
    shape = shape_of(AutoConfig.from_pretrained(str(resolved.path), trust_remote_code=cfg.student.trust_remote_code))
    return resolved, {"student": shape.as_dict(), "params_after": layout["params"], "given": str(resolved.path)}


def check_generate(cfg: PipelineConfig) -> None:
    """The generate stage's outside needs: the endpoint's key variable, or the vLLM virtualenv."""
    from compress.generate.generate import endpoint_key

    gen = cfg.generate
    try:
        endpoint_key(gen)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if gen.backend == "vllm" and gen.endpoint is None and not Path(gen.vllm_python).is_file():
        raise ConfigError(
            f"generate.vllm_python: '{gen.vllm_python}' not found (create the vLLM venv with `make .venv-vllm`, "
            "or set generate.backend: hf)"
        )


def check_prune(cfg: PipelineConfig, teacher: ResolvedModel) -> dict[str, Any]:
    """The student's shape and parameter count from the teacher's config.json (one-line error when invalid)."""
    from compress.prune.families import UnsupportedArchitecture
    from compress.prune.prune import plan_shape

    try:
        return plan_shape(teacher.path, cfg.prune, cfg.teacher.trust_remote_code)
    except UnsupportedArchitecture as e:
        raise ConfigError(f"teacher.path: {e}") from None
    except ValueError as e:
        msg = first_line(e)
        raise ConfigError(msg if msg.startswith("prune") else f"prune: {msg}") from None


def _tokenizer(cfg: PipelineConfig, teacher: ResolvedModel):
    """The teacher's tokenizer (a one-line ConfigError when it cannot be loaded)."""
    from compress.models import load_tokenizer

    try:
        return load_tokenizer(teacher.path, cfg.teacher.trust_remote_code)
    except Exception as e:
        raise ConfigError(f"teacher.path: cannot load the tokenizer from '{teacher.path}': {first_line(e)}") from None


def _check_headline(cfg: PipelineConfig, tasks: list[dict[str, Any]]) -> None:
    """``evaluate.headline`` must name an evaluated task (its metric is checked once results exist)."""
    if not cfg.evaluate.headline:
        return
    task, sep, metric = cfg.evaluate.headline.partition("/")
    names = evaluated_names(tasks)
    if not sep or not metric:
        raise ConfigError(f"evaluate.headline: '{cfg.evaluate.headline}' must be 'task/metric'")
    if task not in names:
        raise ConfigError(f"evaluate.headline: task '{task}' is not in evaluate.tasks")


def pipeline_models(cfg: PipelineConfig) -> list[str]:
    """The names of the models a pipeline run evaluates (what gates may name)."""
    return ["teacher", "pruned", "student", *(["sft"] if cfg.distill.sft_baseline else [])]


def check_evaluation(evaluate: EvaluateConfig, models: list[str], tasks: list[dict[str, Any]]) -> None:
    """Gates name evaluated models and tasks; the vLLM venv is there when evaluation serves models."""
    from compress.gates import GateError, check_gate_models, parse_gate

    try:
        check_gate_models(evaluate.gates, models)
    except GateError as e:
        raise ConfigError(str(e)) from None
    names = evaluated_names(tasks)
    for i, text in enumerate(evaluate.gates):
        for ref in parse_gate(text).refs():
            if ref.task is not None and ref.task not in names:
                raise ConfigError(f"evaluate.gates[{i}]: '{text}' names task '{ref.task}', not in evaluate.tasks")
            if ref.metric == "throughput" and ref.task is None and not evaluate.measures_throughput:
                raise ConfigError(
                    f"evaluate.gates[{i}]: '{text}' needs throughput: set evaluate.throughput or backend vllm"
                )
    if evaluate.uses_vllm and not Path(evaluate.vllm.vllm_python).is_file():
        why = "backend vllm" if evaluate.backend == "vllm" else "throughput"
        raise ConfigError(
            f"evaluate.vllm.vllm_python: '{evaluate.vllm.vllm_python}' not found ({why} serves each model with vLLM; "
            "create the venv with `make .venv-vllm`)"
        )


def _dataset_sources(cfg: PipelineConfig) -> list[tuple[str, Any]]:
    sources = [(f"data.sources[{i}]", s) for i, s in enumerate(cfg.effective_data().sources)]
    if cfg.prune.calibration_source is not None:
        sources.append(("prune.calibration_source", cfg.prune.calibration_source))
    return sources


def _needs_hub_datasets(cfg: PipelineConfig) -> bool:
    from compress.data.prepare import is_local

    hub = [s for _, s in _dataset_sources(cfg) if isinstance(s, DatasetSource) and not is_local(s)]
    return bool(hub) or any(t != "taskworld" for t in cfg.evaluate.tasks)


def check_data(cfg: PipelineConfig, tokenizer, full: bool, model_config: dict[str, Any] | None = None) -> list[str]:
    """Read and check every dataset source; one line each.

    ``full`` reads every record of a local source (a bad line anywhere is caught before any stage)
    and the first rows of a hub dataset (the prepare stage reads the rest); otherwise the first rows.
    A self-instruct source needs the tokenizer's chat template, and room for its messages in the
    context the teacher is served with (sized from ``model_config``, the teacher's config.json).
    """
    from compress.data.prepare import check_chat_template, check_records, is_local, read_source
    from compress.data.self_instruct import check_source, describe_source

    lines = []
    for where, src in _dataset_sources(cfg):
        if isinstance(src, SelfInstructSource):
            if where == "prune.calibration_source":
                raise ConfigError(
                    "prune.calibration_source: a self_instruct source is for data.sources (unset, the calibration "
                    "texts are the first training rows, self-instruct ones included)"
                )
            check_source(src, tokenizer, cfg.generate.context_length(model_config or {}), where)
            lines.append(describe_source(src, where))
            continue
        if not isinstance(src, DatasetSource):
            w = cfg.taskworld
            lines.append(f"{where}: task world ({', '.join(w.tasks)}), {w.n_train} training prompts, seed {w.seed}")
            continue
        whole = full and is_local(src)
        records = read_source(src, head=None if whole else HEAD_ROWS, where=where)
        check_records(src, records, where)
        if src.messages_field:
            check_chat_template(tokenizer, where)
        field_desc = f"messages '{src.messages_field}'" if src.messages_field else f"prompt '{src.prompt_field}'"
        if src.answer_field:
            field_desc += f", answer '{src.answer_field}'"
        count = f"{len(records)} records" if whole else f"first {len(records)} records"
        lines.append(f"{where}: {src.label} [{src.split}], {field_desc}: {count} ok")
    return lines


def teacher_identity(cfg: PipelineConfig, teacher: ResolvedModel) -> str:
    """The teacher's content identity: hub id @ commit, ``gguf:<sha256>`` of a GGUF file (its converted
    directory is not hashed), or the sha256 of a local directory."""
    return teacher.identity or sha256_path_cached(teacher.path, hash_cache_file(cfg.runs_dir))


def write_eval_tasks(world: TaskWorldConfig, evaluate: EvaluateConfig, tasks_dir: Path) -> str:
    """Write the task world's held-out task (when evaluated) into ``tasks_dir``; return the eval sets' identity."""
    from compress.config import TASKWORLD_TASK
    from compress.data.language import language_of
    from compress.data.taskworld import world_splits
    from evaluation.harness import write_task
    from evaluation.tasks import lm_eval_names

    h = hashlib.sha256("\0".join(lm_eval_names(evaluate)).encode())
    if TASKWORLD_TASK in evaluate.tasks:
        _, heldout = world_splits(world)
        out = write_task(heldout, tasks_dir, evaluate.max_gen_toks, language_of(world))
        h.update(sha256_path(out / "heldout.jsonl").encode())
        if (out / "language.jsonl").is_file():
            h.update(sha256_path(out / "language.jsonl").encode())
    if evaluate.include_path is not None:
        h.update(sha256_path(evaluate.include_path).encode())
    if any(t in SHIPPED_TASKS for t in evaluate.tasks):
        from evaluation.realtext import identity

        h.update(identity().encode())  # the shipped tasks' documents (a Python release may change them)
    return h.hexdigest()


def cache_status(cfg: PipelineConfig, pf: Preflight) -> list[tuple[str, str]]:
    """(stage, "cache hit" | "will run") per stage, predicted from the run directory.

    The same stage declarations as the flow's (``stages.pipeline``), handed to a runner that only
    compares keys and output hashes with ``manifest.json``.
    """
    from stages.pipeline import Context, run_pipeline
    from stages.runner import PlanRunner

    with tempfile.TemporaryDirectory() as tmp:
        eval_id = write_eval_tasks(cfg.taskworld, cfg.evaluate, Path(tmp))
    run_dir = cfg.run_dir.resolve()
    device = planned_device(cfg)
    ctx = Context(
        run_dir,
        pf.teacher.path,
        teacher_identity(cfg, pf.teacher),
        eval_id,
        run_dir / "eval" / "tasks",
        device,
        pf.model_config,
        *student_context(cfg, pf),
    )
    runner = PlanRunner(run_dir, source_hash(), device, cfg.force)
    run_pipeline(cfg, ctx, runner)
    return runner.status


def generate_line(cfg: PipelineConfig, model_config: dict[str, Any]) -> str:
    """How the teacher answers: where, how long, where it stops, and which prompts are dropped as too long."""
    gen = cfg.generate
    ctx = gen.context_length(model_config)
    sized = "" if gen.max_model_len is not None else " (sized from the teacher)"
    stop = f"stop {gen.stop}" if gen.stop else "stops at the teacher's EOS / end of turn"
    where = "endpoint " + gen.endpoint.url if gen.endpoint else gen.backend
    return (
        f"generate  {where}, context {ctx} tokens{sized}, answers up to {gen.max_tokens} tokens, {stop}; "
        f"prompts over {gen.max_prompt_tokens(model_config)} tokens are dropped (counted in the run's data report)"
    )


def student_context(cfg: PipelineConfig, pf: Preflight) -> tuple[Path | None, str | None]:
    """(directory, identity) of a student of the user's own, or (None, None) when the student is pruned."""
    if pf.student_model is None:
        return None, None
    return pf.student_model.path, teacher_identity(cfg, pf.student_model)


def planned_device(cfg: PipelineConfig) -> str:
    """The device a run would use, without importing torch (``nvidia-smi`` on the PATH stands for CUDA)."""
    if cfg.device != "auto":
        return cfg.device
    import shutil

    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def describe(cfg: PipelineConfig, source: str, pf: Preflight) -> str:
    """The plan as text: config, teacher, data, evaluation, student size, device and stages."""
    tc = text_config(pf.model_config)
    arch = ",".join(pf.model_config.get("architectures") or [tc.get("model_type", "?")])
    where = f"hub {pf.teacher.hub_id}@{pf.teacher.commit[:12]}" if pf.teacher.hub_id else "local"
    if pf.teacher.gguf_file is not None:
        where = f"gguf {pf.teacher.gguf_file.name}, sha256 {pf.teacher.gguf_sha256[:12]}... -> {pf.teacher.path}"
    exact = "" if pf.layout["exact"] else " (estimated from config.json)"
    st, shape = pf.student, pf.student["student"]
    how = (
        f"given checkpoint {cfg.student.path} (no pruning)"
        if cfg.student is not None
        else f"{cfg.prune.method} pruning ({cfg.prune.selection}) to"
    )
    lines = [
        f"config    {source}: valid",
        f"teacher   {cfg.teacher.path} ({where}): {arch}, {tc['num_hidden_layers']} layers, "
        f"hidden {tc['hidden_size']}, {pf.layout['params']:,} params{exact}",
        f"student   {how} {shape['num_layers']} layers, hidden "
        f"{shape['hidden_size']}, FFN {shape['intermediate_size']}, heads {shape['num_attention_heads']}/"
        f"{shape['num_key_value_heads']} KV: {st['params_after']:,} params ({st['ratio']:.1%} of the teacher)",
        f"device    {cfg.device} ({planned_device(cfg)})",
        generate_line(cfg, pf.model_config),
        "data",
        *(f"  {line}" for line in pf.data),
        f"evaluate  backend {cfg.evaluate.backend}"
        + (", vLLM serving throughput" if cfg.evaluate.measures_throughput else "")
        + f"; models {', '.join(pipeline_models(cfg))}",
        *(
            f"  {t['task']}" + (f" -> {t['lm_eval']}" if t["lm_eval"] != t["task"] else "") + f": {t['data']}"
            for t in pf.tasks
        ),
        *(f"  gate: {g}" for g in cfg.evaluate.gates),
        f"stages    (run directory {cfg.run_dir})",
        *(f"  {stage:<20}{status}" for stage, status in cache_status(cfg, pf)),
    ]
    lines += [f"warning   {w}" for w in pf.warnings]
    return "\n".join(lines)
