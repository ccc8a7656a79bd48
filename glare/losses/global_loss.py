"""L_glob: [CLS] (or UDI's image-level token) consistency across the two views."""

from __future__ import annotations

from collections.abc import Callable

import torch

from glare.losses.centered_ce import CenteredCrossEntropy

Head = Callable[[torch.Tensor], torch.Tensor]


class GlobalLoss(CenteredCrossEntropy):
    """The teacher on X' supervises the student on X~, and symmetrically."""

    def forward(self, student_cls: tuple[torch.Tensor, torch.Tensor], teacher_cls: tuple[torch.Tensor, torch.Tensor],
                student_head: Head, teacher_head: Head, teacher_temp: float) -> torch.Tensor:
        """Global tokens (B, D) of views 1 and 2, student (distorted) and teacher (clean)."""
        b = student_cls[0].shape[0]
        s = student_head(torch.cat(student_cls)).split(b)
        with torch.no_grad():
            t = teacher_head(torch.cat(teacher_cls))
        t1, t2 = t.split(b)
        loss = 0.5 * (self.cross_entropy(s[0], t2, teacher_temp) + self.cross_entropy(s[1], t1, teacher_temp))
        self.update_center(t)
        return loss
