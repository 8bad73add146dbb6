"""Layerwise hidden-state distillation (Minitron): the student's layer outputs against the teacher's.

Features:
  * each student layer matched to the teacher layer it came from (a pruned student's kept layers),
    or, without that map, to evenly spaced teacher layers so that the last layers meet;
  * one learned linear projection, student width to teacher width, shared by every layer where
    the widths differ (trained with the student, never saved with it);
  * the value per token: the mean over matched layers and channels of the squared difference,
    summed over the masked positions (the trainer divides by the step's token count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HiddenMSE(torch.nn.Module):
    """Layerwise hidden-state distillation (Minitron): MSE between student and teacher layer outputs.

    Student layer ``j`` is matched to the teacher layer it came from when ``layer_map`` is given (the
    pruned student's kept layers, 0-based), else (1-based, of ``L_s``) to teacher layer
    ``round(j * L_t / L_s)``, so the last layers meet; one learned linear projection (student width
    to teacher width) is shared by every layer where the widths differ. The value per token is the
    mean over matched layers and channels of the squared difference.
    """

    def __init__(
        self,
        student_layers: int,
        teacher_layers: int,
        student_width: int,
        teacher_width: int,
        layer_map: Sequence[int] | None = None,
    ):
        super().__init__()
        if layer_map is None:
            self.pairs = [(j, max(1, round(j * teacher_layers / student_layers))) for j in range(1, student_layers + 1)]
        elif len(layer_map) != student_layers or not all(0 <= i < teacher_layers for i in layer_map):
            raise ValueError(
                f"hidden-state layer map {list(layer_map)} does not fit a {student_layers}-layer student of a "
                f"{teacher_layers}-layer teacher"
            )
        else:
            self.pairs = [(j + 1, i + 1) for j, i in enumerate(layer_map)]
        self.proj = (
            torch.nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width else None
        )

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor):
        """Sum over the masked positions of the per-token value (``mask`` ``[B, T]`` bool)."""
        total = torch.zeros((), device=mask.device)
        for j, i in self.pairs:
            s = student[j - 1][mask].float()
            if self.proj is not None:
                s = self.proj(s)
            total = total + (s - teacher[i - 1][mask].float()).pow(2).mean(-1).sum()
        return total / len(self.pairs)
