"""L_loc1: distorted patches of X~ must agree with the same clean patches of X."""

from __future__ import annotations

from collections.abc import Callable

import torch

from glare.losses.centered_ce import CenteredCrossEntropy

Head = Callable[[torch.Tensor], torch.Tensor]


class PatchConsistencyLoss(CenteredCrossEntropy):
    """Patch-augmentation consistency, on the distorted patches only."""

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, distorted: torch.Tensor,
                student_head: Head, teacher_head: Head, teacher_temp: float) -> torch.Tensor:
        """Tokens (B, N, D) of X~ (student) and of the clean X (teacher); ``distorted`` (B, N) bool.

        The heads run on the selected patches alone, which keeps their cost to
        the distorted fraction of the grid.
        """
        s = student_head(student_tokens[distorted])
        with torch.no_grad():
            t = teacher_head(teacher_tokens[distorted])
        loss = self.cross_entropy(s, t, teacher_temp)
        self.update_center(t)
        return loss
