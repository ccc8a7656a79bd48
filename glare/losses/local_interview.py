"""L_loc2: each patch of X~ must agree with the teacher's token of X' at the same scene point."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from glare.losses.centered_ce import CenteredCrossEntropy

Head = Callable[[torch.Tensor], torch.Tensor]


class InterViewLocalLoss(CenteredCrossEntropy):
    """Inter-view local consistency on the patches whose centre lies inside the other view."""

    def forward(self, student_logits: torch.Tensor, teacher_map: torch.Tensor, coords: torch.Tensor,
                inside: torch.Tensor, teacher_head: Head, teacher_temp: float) -> torch.Tensor:
        """``student_logits`` (M, K): the student's local head on the M patches of X~ marked ``inside``
        (B, N), in row-major order; the teacher's token map (B, D, rows, cols) of X'.

        ``coords`` (B, N, 2) are the patch centres of X~ in X''s token grid, in
        ``grid_sample``'s [-1, 1] convention; ``inside`` marks the ones that land
        in X'. The teacher token is read bilinearly at that point.
        """
        with torch.no_grad():
            sampled = F.grid_sample(teacher_map, coords.unsqueeze(2).to(teacher_map.dtype), mode="bilinear",
                                    align_corners=False)  # (B, D, N, 1)
            t = teacher_head(sampled.squeeze(-1).transpose(1, 2)[inside])
        loss = self.cross_entropy(student_logits, t, teacher_temp)
        self.update_center(t)
        return loss
