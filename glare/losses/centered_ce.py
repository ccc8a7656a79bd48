"""DINO's cross-entropy between a centred, sharpened teacher and the student."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CenteredCrossEntropy(nn.Module):
    """``-sum softmax((t - c) / tau_t) * log_softmax(s / tau_s)``, averaged over rows.

    Each loss term owns its centre ``c`` (an EMA of the teacher's mean logits,
    all-reduced across workers so every replica centres identically), which is
    what keeps the teacher from collapsing onto one prototype.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # For logging: entropy of the last batch's mean teacher distribution (~0: collapse onto one
        # prototype) and mean per-row entropy (~ln K: collapse to uniform).
        self.last_entropy = float("nan")
        self.last_sample_entropy = float("nan")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The loss of student and teacher logits (M, K) on matching rows; then the centre's EMA step."""
        loss = self.cross_entropy(student, teacher, teacher_temp)
        self.update_center(teacher)
        return loss

    def cross_entropy(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Mean cross-entropy over matching rows of (M, K) student and teacher logits."""
        if student.shape[0] == 0:
            return student.sum() * 0.0  # keeps the graph (and DDP) intact on an empty selection
        targets = F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)
        with torch.no_grad():
            self.last_entropy = float(_entropy(targets.mean(dim=0)))
            self.last_sample_entropy = float(_entropy(targets).mean())
        log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
        return -(targets * log_probs).sum(dim=-1).mean()

    def entropy_metrics(self, name: str) -> dict[str, float]:
        """The last batch's teacher entropies as fractions of ln K, keyed by the term's ``name``.

        ``teacher_entropy_<name>`` near 1 means near-uniform targets (nothing to learn from);
        ``batch_entropy_<name>`` near 0 means every row picks the same prototype (collapse).
        """
        ln_k = math.log(self.center.shape[-1])
        return {f"teacher_entropy_{name}": self.last_sample_entropy / ln_k,
                f"batch_entropy_{name}": self.last_entropy / ln_k}

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """EMA of the teacher's mean logits over every row on every worker."""
        total = torch.cat([teacher.float().sum(dim=0), teacher.new_tensor([teacher.shape[0]], dtype=torch.float)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        count = total[-1]
        if count > 0 and torch.isfinite(total).all():  # a NaN batch must not poison the centre
            mean = (total[:-1] / count).unsqueeze(0)
            self.center.mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)



def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of probability vectors along the last dimension."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
