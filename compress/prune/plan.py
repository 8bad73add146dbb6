"""The student's shape and size from the teacher's ``config.json`` and checkpoint headers, without torch.

``plan_shape`` is what ``distillflow plan`` prints and what the prune stage builds: the same
function on the same files, so the two cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config import PruneConfig
from compress.hub import checkpoint_layout, read_model_config
from compress.prune.families import family_of
from compress.prune.params import ConfigView, counter_for
from compress.prune.shape import choose_shape, shape_of


def plan_shape(teacher_dir: Path, prune: PruneConfig, trust_remote_code: bool = False) -> dict[str, Any]:
    """The student's shape and parameter counts, from the teacher's config.json and safetensors headers.

    Raises ``UnsupportedArchitecture`` for a model type the pruner has no adapter for and
    ``ValueError`` (naming the ``prune.*`` field) for sizes that cannot be built.
    """
    raw = read_model_config(teacher_dir)
    config = ConfigView(raw)
    family = family_of(config)
    layout = checkpoint_layout(Path(teacher_dir), raw)
    on_disk = layout["params"] if layout["exact"] else None  # the safetensors headers' sum
    count = counter_for(config, family, on_disk, Path(teacher_dir), trust_remote_code)
    shape, params, teacher_params = choose_shape(config, prune, family, count)
    return {
        "family": family.name,
        "teacher": shape_of(config).as_dict(),
        "student": shape.as_dict(),
        "params_before": teacher_params,
        "params_after": params,
        "ratio": params / teacher_params,
    }
