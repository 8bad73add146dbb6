"""Everything a run checks before its first stage, and the run's context.

``preflight`` resolves the teacher (local directory, hub id: cache first, then the hub, or a GGUF
file: converted once, then cached) and reads its ``config.json``; then each stage checks its own
part of the config, in pipeline order (``StageSpec.check`` in ``stages/<name>.py``). The first fault
raises a one-line ``ConfigError`` naming the field, file or task. No weights are loaded (but for a
GGUF teacher's first conversion, about 30 s for 135M parameters) and Prefect is not imported, so
the CLI runs it in seconds before it starts the flow; the flow runs it again for callers that come
through Python or a deployment.

``context`` turns a checked config into what the stages are declared against (``Context``): the
teacher and its identity, the evaluation sets' identity, the device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.config import ConfigError, DatasetSource, EvaluateConfig, PipelineConfig, TaskWorldConfig, first_line
from compress.hub import (
    ResolvedModel,
    chat_template_of,
    check_safetensors_only,
    check_tokenizer_files,
    checkpoint_layout,
    read_model_config,
    resolve_model,
    text_config,
)
from compress.jobs import Checkpoint
from compress.lineage import hash_cache_file, sha256_path, sha256_path_cached
from stages.pipeline import Context, stage_specs


@dataclass
class Preflight:
    """What the checks found: the teacher on disk, its shape, the student, the data and the evaluation tasks.

    The stages' checks fill ``student``, ``data`` and ``tasks`` in as they run.
    """

    cfg: PipelineConfig
    full: bool  # a run's check (every record read, a hub teacher downloaded), not a plan's
    teacher: ResolvedModel
    model_config: dict[str, Any]
    layout: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    student_model: ResolvedModel | None = None  # student.path resolved, when the user gives the student
    _tokenizer: Any = None

    def chat_template(self) -> str | None:
        """The teacher's chat template, from its tokenizer files (no tokenizer is loaded)."""
        return chat_template_of(self.teacher.path)

    def tokenizer(self):
        """The teacher's tokenizer, loaded on first use (a one-line ConfigError when it cannot be)."""
        if self._tokenizer is None:
            from compress.models import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.teacher.path, self.cfg.teacher.trust_remote_code)
            except Exception as e:
                raise ConfigError(
                    f"teacher.path: cannot load the tokenizer from '{self.teacher.path}': {first_line(e)}"
                ) from None
        return self._tokenizer


def preflight(cfg: PipelineConfig, full: bool = True) -> Preflight:
    """Check the whole config against the world; ``full`` reads every data record (run), else the first rows (plan).

    ``full`` also downloads a hub teacher's weights (when the hub is reachable), so that no stage
    starts on a teacher that is not there.
    """
    from compress.hub import go_offline_if_unreachable

    if not cfg.teacher.is_local or _needs_hub(cfg):
        go_offline_if_unreachable()
    # config.json first: every check runs before a hub teacher's weights download.
    teacher = resolve_model(cfg.teacher, download=False)
    model_config = read_model_config(teacher.path)
    check_safetensors_only(teacher.path, "teacher.path")
    if "num_hidden_layers" not in text_config(model_config):
        raise ConfigError(f"teacher.path: '{cfg.teacher.path}' config.json has no num_hidden_layers (not a decoder)")
    if cfg.generate.backend == "vllm" and cfg.generate.endpoint is None:
        from compress.serving.quantization import check_servable_quantization

        check_servable_quantization(model_config, "teacher.path")
    pf = Preflight(cfg, full, teacher, model_config)
    check_run_dir(cfg.runs_dir, cfg.run_dir, pf)
    if cfg.teacher.trust_remote_code:
        pf.warnings.append("teacher.trust_remote_code is on: the checkpoint's own Python code will run")
    if full:  # a run checks that it loads, whether a stage needs it or not
        check_tokenizer_files(teacher.path, "teacher.path")
    for spec in stage_specs():
        if spec.check is not None:
            spec.check(cfg, pf)
    if full and teacher.hub_id:
        pf.teacher = resolve_model(cfg.teacher, download=True)
    pf.layout = checkpoint_layout(pf.teacher.path, model_config)
    if cfg.student is not None:
        pf.student["params_before"] = pf.layout["params"]
        pf.student["ratio"] = pf.student["params_after"] / pf.layout["params"]
    return pf


# The disk a run needs, as a multiple of the teacher's checkpoint (weights and tokenizer): the pruned
# student, the KD student and the SFT baseline (each at most the teacher's size) plus a trainer
# checkpoint of each with its optimizer state (weights x 3); generated data and logit caches are small
# beside that. An estimate: only a run that cannot hold even one student is refused.
DISK_FACTOR = 9


def check_run_dir(runs_dir: Path, run_dir: Path, pf: Preflight) -> None:
    """The run directory lies inside ``runs_dir``, can be written (its nearest existing parent takes a
    file), and the disk holds the run.

    A ConfigError naming ``name`` when the run directory resolves outside ``runs_dir`` (a symlink),
    or ``runs_dir`` when nothing can be written there or the free space cannot hold one student
    checkpoint; a warning when it is less than the run's estimate (``DISK_FACTOR``).
    """
    import shutil
    import tempfile

    given, run_dir = run_dir, run_dir.resolve()
    if run_dir.parent != runs_dir.resolve():
        raise ConfigError(f"name: the run directory {given} resolves to {run_dir}, outside runs_dir")
    parent = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"runs_dir: '{parent}' is a file, not a directory (run directory {run_dir})")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".distillflow-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"runs_dir: cannot write under '{parent}' (run directory {run_dir}): {e.strerror}") from None
    free = shutil.disk_usage(parent).free
    teacher = sum(f.stat().st_size for f in Path(pf.teacher.path).iterdir() if f.is_file())
    gib = 2**30
    if free < teacher:
        raise ConfigError(
            f"runs_dir: {free / gib:.2f} GiB free under '{parent}', less than one checkpoint of the teacher's size "
            f"({teacher / gib:.2f} GiB); a run needs about {DISK_FACTOR * teacher / gib:.1f} GiB"
        )
    if free < DISK_FACTOR * teacher:
        pf.warnings.append(
            f"runs_dir: {free / gib:.1f} GiB free under '{parent}'; a run may need about "
            f"{DISK_FACTOR * teacher / gib:.1f} GiB ({DISK_FACTOR} x the teacher's checkpoint)"
        )


def _needs_hub(cfg: PipelineConfig) -> bool:
    """True when a data source or an evaluation task may come from the hub."""
    from compress.data.prepare import is_local

    sources = [*cfg.effective_data().sources, cfg.prune.calibration_source]
    hub = [s for s in sources if isinstance(s, DatasetSource) and not is_local(s)]
    return bool(hub) or any(t != "taskworld" for t in cfg.evaluate.tasks)


def context(cfg: PipelineConfig, pf: Preflight, tasks_dir: Path, device: str) -> Context:
    """The run's context: the teacher (and a given student) with their identities, and the evaluation
    sets written into ``tasks_dir`` with theirs."""
    remote = cfg.teacher.trust_remote_code
    student = None
    if pf.student_model is not None:
        assert cfg.student is not None
        identity = model_identity(cfg, pf.student_model)
        student = Checkpoint(
            path=pf.student_model.path, identity=identity, trust_remote_code=cfg.student.trust_remote_code
        )
    return Context(
        run_dir=cfg.run_dir.resolve(),
        teacher=Checkpoint(path=pf.teacher.path, identity=model_identity(cfg, pf.teacher), trust_remote_code=remote),
        eval_id=write_eval_tasks(cfg.taskworld, cfg.evaluate, tasks_dir),
        tasks_dir=tasks_dir,
        device=device,
        model_config=pf.model_config,
        student=student,
    )


def model_identity(cfg: PipelineConfig, model: ResolvedModel) -> str:
    """A model's content identity: hub id @ commit, ``gguf:<sha256>`` of a GGUF file (its converted
    directory is not hashed), or the sha256 of a local directory."""
    return model.identity or sha256_path_cached(model.path, hash_cache_file(cfg.runs_dir))


def write_eval_tasks(world: TaskWorldConfig, evaluate: EvaluateConfig, tasks_dir: Path) -> str:
    """Write the task world's held-out task (when evaluated) into ``tasks_dir``; return the eval sets' identity."""
    from compress.config import TASKWORLD_TASK
    from compress.data.language import language_of
    from compress.data.taskworld import world_splits
    from evaluation.harness import write_task
    from evaluation.tasks import SHIPPED_TASKS, lm_eval_names

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


def planned_device(cfg: PipelineConfig) -> str:
    """The device a run would use, without importing torch (``nvidia-smi`` on the PATH stands for CUDA)."""
    if cfg.device != "auto":
        return cfg.device
    import shutil

    return "cuda" if shutil.which("nvidia-smi") else "cpu"
