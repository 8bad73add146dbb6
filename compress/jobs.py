"""One typed job per stage: everything a stage's library function needs, and nothing else.

A job is built once, by the stage's declaration (``stages/<stage>.py``), from the config and the
upstream stages' outputs. The same object is hashed for the stage's cache key (``compress.cachekey``:
every field, unless marked ``OutOfKey`` or ``KeyWhen``), handed whole to the Prefect task and from
there to the library function, and written to the run's manifest. A value keeps its name on the way:
the config section ``prune`` is ``PruneJob.prune`` and ``prune_model(job)`` reads ``job.prune``.

Paths are out of every key (a run directory may move); what they hold is keyed by the content hash
beside them (``Checkpoint.identity``, ``*_sha``). A hash that is None is not known yet: ``plan``
reads it as "the upstream stage will run".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from compress.cachekey import KeyWhen, OutOfKey, key_hash
from compress.config import (
    DataConfig,
    DatasetSource,
    DistillConfig,
    EvaluateConfig,
    GenerateConfig,
    PruneConfig,
    TaskWorldConfig,
    TaskWorldSource,
)

WHERE = OutOfKey("where it is written or read; what it holds is keyed apart")
RUNTIME = OutOfKey("how the work is run, not what it produces")


class Job(BaseModel):
    """Base of every stage's job: frozen, no unknown fields, hashable for the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @property
    def flags(self) -> frozenset[str]:
        """Which ``KeyWhen`` fields of this job (and of the configs in it) enter the key."""
        return frozenset()

    def key(self) -> str:
        """sha256 of everything in this job that can change the stage's outputs."""
        return key_hash(self, self.flags)


class Checkpoint(BaseModel):
    """A model on disk and its content identity (hub id @ commit, ``gguf:<sha256>`` or a sha256)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[Path, WHERE]
    identity: str | None
    trust_remote_code: Annotated[bool, OutOfKey("lets its code run; the identity decides the weights")] = False


class PrepareJob(Job):
    """Training prompts and calibration texts (``compress.data.prepare.prepare_data``)."""

    data: DataConfig
    taskworld: Annotated[TaskWorldConfig, KeyWhen("taskworld")]
    uses_taskworld: bool = Field(description="the task world feeds training or evaluation")
    calibration_source: TaskWorldSource | DatasetSource | None = None
    calibration_samples: int
    source_content: list[str] = Field(description="content fingerprints of the dataset sources")
    max_prompt_tokens: int | None = Field(description="longer prompts are dropped")
    teacher: Checkpoint = Field(description="its tokenizer and chat template; the self-instruct teacher")
    eval_id: str = Field(description="identity of the evaluation sets (decontamination)")
    evaluate: Annotated[EvaluateConfig, OutOfKey("its evaluation sets are keyed by eval_id")]
    tasks_dir: Annotated[Path, WHERE]
    serving: Annotated[GenerateConfig, OutOfKey("self_instruct_teacher keys what decides the drawn prompts")]
    self_instruct_teacher: str | None = Field(
        description="how a self-instruct source's teacher runs (backend/dtype/device), None without one"
    )
    device: Annotated[str, RUNTIME]
    out_dir: Annotated[Path, WHERE]

    @property
    def flags(self) -> frozenset[str]:
        return frozenset({"taskworld"} if self.uses_taskworld else ())


class PruneJob(Job):
    """Prune the teacher by importance on the calibration texts (``compress.prune.prune.prune_model``)."""

    teacher: Checkpoint
    calibration: Annotated[Path, WHERE]
    calibration_sha: str | None
    prune: PruneConfig
    dtype: str
    device: str
    out_dir: Annotated[Path, WHERE]


class AdoptJob(Job):
    """A student of the user's own in place of pruning (``compress.student.adopt_student``)."""

    student: Checkpoint
    teacher: Checkpoint
    out_dir: Annotated[Path, WHERE]


class GenerateJob(Job):
    """Every training prompt through the teacher (``compress.generate.generate.generate_data``)."""

    teacher: Checkpoint
    prompts: Annotated[Path, WHERE]
    prompts_sha: str | None
    generate: GenerateConfig
    need_logits: bool = Field(description="the KD student reads the teacher's cached log-probs")
    device: Annotated[str, OutOfKey("the transformers backend's device; sampling is seeded per row")]
    run_dir: Annotated[Path, WHERE]

    @property
    def flags(self) -> frozenset[str]:
        return frozenset({f"mode={self.generate.mode}", f"logits={self.generate.logits}"})


class DistillJob(Job):
    """Train the student by KD or by SFT only (``compress.distill.recipe.distill_student``).

    Also the JSON each torchrun process reads (``compress.distill.worker``).
    """

    student: Checkpoint = Field(description="the pruned (or given) student it starts from")
    data_dir: Annotated[Path, WHERE]
    logits_dir: Annotated[Path | None, WHERE]
    data_sha: str | None = Field(description="the generated data and the teacher's cached log-probs")
    distill: DistillConfig
    kd: bool = Field(description="KD against the teacher; False trains the SFT baseline (CE only)")
    teacher: Annotated[Checkpoint | None, KeyWhen("online")] = Field(
        default=None, description="the online teacher (distill.teacher_source: online)"
    )
    teacher_layers: Annotated[list[int] | None, OutOfKey("the pruned checkpoint's hash decides them")] = Field(
        default=None, description="the teacher layer each student layer came from (the hidden-state loss)"
    )
    device: str
    out_dir: Annotated[Path, WHERE]
    log_path: Annotated[Path | None, WHERE] = None

    @property
    def flags(self) -> frozenset[str]:
        online = self.kd and self.distill.teacher_source == "online"
        return frozenset({"kd"} if self.kd else ()) | frozenset({"online"} if online else ())


class FidelityJob(BaseModel):
    """The teacher's greedy answers to held-out prompts, and where they are cached."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    teacher: Checkpoint
    prompts: Annotated[Path, WHERE]
    prompts_sha: str | None
    cache_dir: Annotated[Path, WHERE]


class EvaluateJob(Job):
    """lm-eval of one checkpoint, and its fidelity to the teacher (``evaluation.harness.evaluate_checkpoint``)."""

    label: Annotated[str, OutOfKey("the stage's name carries it")]
    model: Checkpoint
    evaluate: EvaluateConfig
    tasks_dir: Annotated[Path | None, WHERE]
    eval_id: str
    dtype: str
    device: str
    log_dir: Annotated[Path, WHERE]
    fidelity: FidelityJob | None = None
