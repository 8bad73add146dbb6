"""The student's shape: explicit sizes, or the valid shape closest to a parameter budget.

Stock transformers and vLLM build every layer from one config, so width pruning is uniform across
layers (one hidden size, FFN size and head count). A shape is valid when ``head_dim`` is unchanged,
query heads divide evenly into the kept KV groups, and ``hidden_size`` is a multiple of
``num_attention_heads`` (transformers 5 configs check it even when head_dim is explicit). Where a
loader derives head_dim from the hidden size (``Family.head_dim_derived``: Phi-3 in transformers,
Qwen2 in vLLM), the hidden size is heads x head_dim, so the checkpoint means one thing everywhere.

Shapes are sized by a parameter counter (``compress.prune.params``: arithmetic checked against the
teacher's checkpoint, else the model class on the meta device); nothing here imports torch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

from compress.prune.families import Family

DEFAULT_RATIO = 0.5


@dataclass(frozen=True)
class Shape:
    """The sizes pruning changes."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def shape_of(config) -> Shape:
    return Shape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )


# Who reads a family's checkpoints with head_dim = hidden_size // num_attention_heads (for the error).
_DERIVED_BY = {"phi3": "transformers and vLLM", "qwen2": "vLLM"}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def config_for(config, shape: Shape, family: Family):
    """A copy of ``config`` with ``shape`` (head_dim written explicitly where the family has the field)."""
    head_dim = head_dim_of(config)
    new = copy.deepcopy(config)
    new.num_hidden_layers = shape.num_layers
    new.hidden_size = shape.hidden_size
    new.intermediate_size = shape.intermediate_size
    new.num_attention_heads = shape.num_attention_heads
    new.num_key_value_heads = shape.num_key_value_heads
    if not family.head_dim_derived:
        new.head_dim = head_dim
    if getattr(config, "layer_types", None) and len(config.layer_types) != shape.num_layers:
        new.layer_types = list(config.layer_types[: shape.num_layers])  # only for counting; pruning picks them
    return new


def check_shape(config, shape: Shape, family: Family) -> None:
    """Raise ``ValueError`` naming the ``prune.*`` field when ``shape`` cannot be built from ``config``."""
    t = shape_of(config)
    for field, new, old in (
        ("num_layers", shape.num_layers, t.num_layers),
        ("hidden_size", shape.hidden_size, t.hidden_size),
        ("intermediate_size", shape.intermediate_size, t.intermediate_size),
        ("num_attention_heads", shape.num_attention_heads, t.num_attention_heads),
        ("num_key_value_heads", shape.num_key_value_heads, t.num_key_value_heads),
    ):
        if not 1 <= new <= old:
            raise ValueError(f"prune.{field}={new} must be between 1 and the teacher's {old}")
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ValueError(
            f"prune.num_attention_heads={shape.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={shape.num_key_value_heads} (grouped-query attention)"
        )
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    if per_group > t.num_attention_heads // t.num_key_value_heads:
        raise ValueError(
            f"prune: {per_group} query heads per KV group is more than the teacher's "
            f"{t.num_attention_heads // t.num_key_value_heads}; lower num_attention_heads or keep more KV heads"
        )
    if shape.hidden_size % shape.num_attention_heads:
        raise ValueError(
            f"prune.hidden_size={shape.hidden_size} must be a multiple of num_attention_heads="
            f"{shape.num_attention_heads} (transformers checks it)"
        )
    if family.head_dim_derived and shape.hidden_size != shape.num_attention_heads * head_dim_of(config):
        raise ValueError(
            f"prune.hidden_size={shape.hidden_size}: {family.name} checkpoints are read with head_dim = hidden_size // "
            f"num_attention_heads (by {_DERIVED_BY.get(family.name, 'its loaders')}), so hidden_size must equal "
            f"num_attention_heads x head_dim = {shape.num_attention_heads * head_dim_of(config)}"
        )


def _multiple(size: int, width_multiple: int | None) -> int:
    """The rounding step of a width axis: ``prune.width_multiple``, else 64 for sizes >= 1024, else 8."""
    if width_multiple:
        return width_multiple
    return 64 if size >= 1024 else 8


def _round(x: float, step: int, upper: int) -> int:
    return max(step, min(upper, round(x / step) * step))


def _fit_ffn(count: Callable[[Shape], int], target: float, shape: Shape, step: int, upper: int) -> Shape:
    """``shape`` with the FFN size (a multiple of ``step``) that brings it closest to ``target`` parameters.

    Parameters are linear in the FFN size, so two counts give the answer.
    """
    a, b = (count(replace(shape, intermediate_size=i)) for i in (step, 2 * step))
    best = step + (target - a) / max(1, b - a) * step
    return replace(shape, intermediate_size=_round(best, step, upper))


def _width_candidates(
    config, base: Shape, fixed: dict, family: Family, width_multiple: int | None, fit: Callable[..., Shape]
) -> list[Shape]:
    """Width shapes: hidden and FFN scaled together (heads kept); on Phi-3, whole heads with the FFN fitted."""
    t = shape_of(config)
    step_i = _multiple(t.intermediate_size, width_multiple)
    if family.head_dim_derived and "hidden_size" not in fixed:
        # Phi-3, Qwen2: hidden = heads x head_dim moves in whole heads, too coarse alone: fit the FFN to the budget.
        hd, per_group = head_dim_of(config), t.num_attention_heads // t.num_key_value_heads
        out = []
        for kv in (
            [fixed["num_key_value_heads"]] if "num_key_value_heads" in fixed else range(1, t.num_key_value_heads + 1)
        ):
            for g in range(1, per_group + 1):
                heads = fixed.get("num_attention_heads", kv * g)
                shape = replace(base, hidden_size=heads * hd, num_attention_heads=heads, num_key_value_heads=kv)
                if "intermediate_size" not in fixed:
                    shape = fit(shape, step_i, t.intermediate_size)
                out.append(shape)
        return out
    if "hidden_size" in fixed:  # only the FFN is free
        return [fit(base, step_i, t.intermediate_size)]
    step_h = math.lcm(_multiple(t.hidden_size, width_multiple), base.num_attention_heads)
    out = []
    # The teacher's own hidden size first, then every multiple of the step below it (once each).
    for h in dict.fromkeys([t.hidden_size, *range(t.hidden_size - t.hidden_size % step_h, 0, -step_h)]):
        inter = fixed.get(
            "intermediate_size", _round(t.intermediate_size * h / t.hidden_size, step_i, t.intermediate_size)
        )
        out.append(replace(base, hidden_size=h, intermediate_size=inter))
    return out


def choose_shape(config, prune_cfg, family: Family, count: Callable[[Shape], int]) -> tuple[Shape, int, int]:
    """The student's shape for ``prune_cfg`` and (its parameters, the teacher's parameters), by ``count``.

    Explicit sizes are kept as given. With ``target_ratio`` (0.5 when nothing else is set), the free
    axes of ``method`` are sized so the parameter count is closest to ratio x teacher:
    ``depth`` picks the layer count; ``width`` scales hidden and FFN together (heads are kept, as
    Minitron's width-pruned models do); ``both`` keeps about sqrt(ratio) of the layers, then sizes width
    for the rest of the budget.
    """
    t = shape_of(config)
    teacher_params = count(t)
    fixed = prune_cfg.explicit_sizes()
    base = replace(t, **fixed)
    ratio = prune_cfg.effective_ratio()
    if ratio is None:
        check_shape(config, base, family)
        return base, count(base), teacher_params
    target = ratio * teacher_params
    depth_free = prune_cfg.method in ("depth", "both") and "num_layers" not in fixed
    width_free = prune_cfg.method in ("width", "both") and not {"hidden_size", "intermediate_size"} <= fixed.keys()
    if depth_free and width_free:
        base = replace(base, num_layers=max(1, round(t.num_layers * math.sqrt(ratio))))
    candidates = [base]
    if width_free:
        fit = partial(_fit_ffn, count, target)
        candidates = _width_candidates(config, base, fixed, family, prune_cfg.width_multiple, fit)
    elif depth_free:
        candidates = [replace(base, num_layers=n) for n in range(1, t.num_layers + 1)]
    valid = []
    for shape in candidates:
        try:
            check_shape(config, shape, family)
        except ValueError:
            continue
        valid.append(shape)
    if not valid:
        check_shape(config, candidates[0], family)  # raises the reason
    best = min(valid, key=lambda s: abs(count(s) - target))
    return best, count(best), teacher_params
