"""L_reg: consistency between a region of one view and its counterpart in the other."""

from __future__ import annotations

from collections.abc import Callable

import torch

from glare.losses.centered_ce import CenteredCrossEntropy

Head = Callable[[torch.Tensor], torch.Tensor]


class RegionalLoss(CenteredCrossEntropy):
    """Cross-entropy between student and teacher region representations.

    The representations come from the region correspondence (cross-attention
    or geometric) computed by the model; regions without a counterpart
    (``valid`` False) are left out.
    """

    def forward(self, student_regions: torch.Tensor, teacher_regions: torch.Tensor, valid: torch.Tensor,
                student_head: Head, teacher_head: Head, teacher_temp: float) -> torch.Tensor:
        """Region representations (B, R, D) of student and teacher; ``valid`` (B, R) bool."""
        s = student_head(student_regions[valid])
        with torch.no_grad():
            t = teacher_head(teacher_regions[valid])
        loss = self.cross_entropy(s, t, teacher_temp)
        self.update_center(t)
        return loss
