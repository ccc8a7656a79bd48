"""Cross-attention that finds a region query's counterpart among a view's tokens."""

from __future__ import annotations

import math

import torch
from torch import nn


class RegionCrossAttention(nn.Module):
    """``CA(z, Z) = softmax((z Wq)(Z Wk)^T / sqrt(d)) (Z Wv)`` (single head, training only)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Queries (B, R, D) attend over tokens (B, N, D); returns (B, R, D)."""
        attn = torch.softmax(self.q(queries) @ self.k(tokens).transpose(1, 2) * self.scale, dim=-1)
        return attn @ self.v(tokens)
