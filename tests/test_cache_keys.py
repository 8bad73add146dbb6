"""Every config field either moves its stage's cache key or is marked out of it on purpose.

The stages' own declarations (``stages/<name>.py``) are built for a config and for the same config
with one field changed; the owning stage's key must change exactly when the field is not marked
``OutOfKey`` and, for a ``KeyWhen`` field, when the job raises its flag. Run for two configs, so that
both sides of each ``KeyWhen`` (SFT and KD students, completions and self-distillation, top-k and
sampled logits) are seen.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from compress.cachekey import key_marks
from compress.config import DataConfig, PipelineConfig, validate
from compress.jobs import Checkpoint
from stages.pipeline import Context, run_pipeline
from stages.runner import Done
from tests.conftest import ROOT

TEACHER = ROOT / "assets" / "teacher-tiny"
# config section -> (the stage run that owns it, the job field that holds it)
OWNERS = {
    "data": [("prepare", "data")],
    "taskworld": [("prepare", "taskworld")],
    "prune": [("prune", "prune")],
    "generate": [("generate", "generate")],
    "distill": [("distill_student", "distill"), ("distill_sft", "distill")],
    "evaluate": [("evaluate_student", "evaluate")],
}
BASES = {
    "defaults": {"data": DataConfig().model_dump()},
    "other side": {
        "data": DataConfig().model_dump(),
        "generate": {"mode": "self_distill", "logits": "sampled"},
        "distill": {"teacher_source": "online", "hidden_weight": 0.5},
        "prune": {"method": "both"},
    },
}


def declared(cfg: PipelineConfig, run_dir: Path = Path("/run")) -> dict[str, Any]:
    """Every stage run the pipeline declares for ``cfg``, by name (upstream results faked, hashes fixed)."""
    teacher = Checkpoint(path=TEACHER, identity="teacher-sha")
    ctx = Context(run_dir, teacher, "eval-sha", run_dir / "eval" / "tasks", "cpu")
    stages = {}

    def capture(stage):
        stages[stage.name] = stage
        return Done({"kept_layers": [0, 1]}, {name: f"sha-{name}" for name in stage.outputs}, False, 0.0, stage.outputs)

    run_pipeline(cfg, ctx, capture)
    return stages


def candidates(model: BaseModel, name: str) -> list[Any]:
    """Other values of field ``name`` of ``model``, of its type's kind, for the config to accept one."""
    value = getattr(model, name)
    ann = type(model).model_fields[name].annotation
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    choices = [a for a in typing.get_args(ann) if a is not type(None)] if union else [ann]
    literal = [c for a in choices if typing.get_origin(a) is typing.Literal for c in typing.get_args(a)]
    if literal and [c for c in literal if c != value]:
        return [c for c in literal if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float):
        return [value + 1, value / 2, value + 0.1, -1]
    if isinstance(value, str):
        return [value + "x"]
    if isinstance(value, Path):
        return [Path(str(value) + "x")]
    if isinstance(value, BaseModel):
        first = next(iter(type(value).model_fields))
        return [value.model_copy(update={first: c}) for c in candidates(value, first)]
    if isinstance(value, list | tuple):
        return [[*value, value[0]]] if value else [["x"], ["student >= 0"]]
    if isinstance(value, dict):
        key_type, value_type = typing.get_args(ann) or (str, int)
        key = typing.get_args(key_type)[0] if typing.get_origin(key_type) is typing.Literal else "x"
        return [{**value, key: (1, 2) if typing.get_origin(value_type) is tuple else 2}]
    models = [c for c in choices if isinstance(c, type) and issubclass(c, BaseModel)]
    if value is None and models:
        return [{}, {"url": "http://gpu:8000", "model": "teacher"}]
    if value is None and int in choices:
        return [4096, 7]
    if value is None and float in choices:
        return [0.5]
    if value is None and str in choices:
        return ["taskworld/acc"]
    # Optional flags, sources, directories.
    return [True, {"type": "taskworld"}, ROOT / "evaluation" / "local_tasks"]


def accepted(model: BaseModel, name: str) -> BaseModel | None:
    """``model`` with field ``name`` changed to the first other value the config accepts, or None."""
    for value in candidates(model, name):
        if value == getattr(model, name):
            continue
        try:
            return type(model).model_validate({**model.model_dump(), name: value})
        except ValidationError:
            continue
    return None


def test_every_field_is_in_its_stages_key_or_marked_out():
    wrong, checked, fields = [], set(), set()
    for base in BASES.values():
        cfg = validate(PipelineConfig, {"teacher": {"path": str(TEACHER)}, **base}, "cfg")
        before = declared(cfg)
        for section, owners in OWNERS.items():
            model = getattr(cfg, section)
            for name in type(model).model_fields:
                fields.add(f"{section}.{name}")
                other = accepted(model, name)
                if other is None:
                    continue
                checked.add(f"{section}.{name}")
                after = declared(cfg.model_copy(update={section: other}))
                out, when = key_marks(type(model), name)
                for stage in (s for s, _ in owners if s in after):  # distill.sft_baseline drops distill_sft
                    job = before[stage].job
                    expected = out is None and (when is None or when.flag in job.flags)
                    moved = after[stage].job.key() != job.key()
                    if moved != expected:
                        wrong.append(f"{section}.{name} in {stage}: key {'moved' if moved else 'kept'}")
    assert not wrong, wrong
    assert fields - checked == set(), "no valid other value tried for these fields"


def test_both_sides_of_each_flag_are_seen():
    """The two configs raise every flag the marks name, and leave each unraised somewhere."""
    raised: dict[str, set[bool]] = {}
    for base in BASES.values():
        cfg = validate(PipelineConfig, {"teacher": {"path": str(TEACHER)}, **base}, "cfg")
        stages = declared(cfg)
        for section, owners in OWNERS.items():
            model = type(getattr(cfg, section))
            for name in model.model_fields:
                _, when = key_marks(model, name)
                if when is not None:
                    for stage, _ in owners:
                        raised.setdefault(when.flag, set()).add(when.flag in stages[stage].job.flags)
    assert raised and all(seen == {True, False} for seen in raised.values()), raised


def test_paths_and_runtime_settings_stay_out_of_every_key():
    """A run directory that moves, or a server that is paced differently, keeps every key."""
    cfg = validate(PipelineConfig, {"teacher": {"path": str(TEACHER)}}, "cfg")
    keys = {name: s.job.key() for name, s in declared(cfg).items()}
    assert {name: s.job.key() for name, s in declared(cfg, Path("/elsewhere/run")).items()} == keys
    paced = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"concurrency": 99})})
    assert {name: s.job.key() for name, s in declared(paced).items()} == keys
    reported = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"gates": ["student >= 0"]})})
    assert {name: s.job.key() for name, s in declared(reported).items()} == keys
