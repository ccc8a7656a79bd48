"""L_glob: [CLS] (or UDI's image-level token) consistency across the two views."""

from __future__ import annotations

import torch

from glare.losses.centered_ce import CenteredCrossEntropy


class GlobalLoss(CenteredCrossEntropy):
    """The teacher on X' supervises the student on X~, and symmetrically."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Global-head logits (2B, K) of views 1 then 2: student (distorted) and teacher (clean).

        Each view's student rows are matched with the OTHER view's teacher rows; the centre is
        updated with all 2B teacher rows.
        """
        s1, s2 = student.chunk(2)
        t1, t2 = teacher.chunk(2)
        loss = 0.5 * (self.cross_entropy(s1, t2, teacher_temp) + self.cross_entropy(s2, t1, teacher_temp))
        self.update_center(teacher)
        return loss
