"""L_loc1: distorted patches of X~ must agree with the same clean patches of X."""

from __future__ import annotations

from collections.abc import Callable

import torch

from glare.losses.centered_ce import CenteredCrossEntropy

Head = Callable[[torch.Tensor], torch.Tensor]


class PatchConsistencyLoss(CenteredCrossEntropy):
    """Patch-augmentation consistency, on the distorted patches only."""

    def forward(self, student_logits: torch.Tensor, teacher_tokens: torch.Tensor, distorted: torch.Tensor,
                teacher_head: Head, teacher_temp: float) -> torch.Tensor:
        """``student_logits`` (M, K): the student's local head on the M distorted patches of X~, in
        row-major (image, patch) order; ``teacher_tokens`` (B, N, D) of the clean X; ``distorted`` (B, N) bool.

        The student's head runs outside (the model makes one pass for both local terms); the teacher's
        runs here, on the selected patches alone.
        """
        with torch.no_grad():
            t = teacher_head(teacher_tokens[distorted])
        loss = self.cross_entropy(student_logits, t, teacher_temp)
        self.update_center(t)
        return loss
