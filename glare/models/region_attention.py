"""Cross-attention that finds a region query's counterpart among a view's tokens."""

from __future__ import annotations

import math

import torch
from torch import nn


class RegionCrossAttention(nn.Module):
    """``CA(z, Z) = softmax((z Wq)(Z Wk)^T / sqrt(d)) (Z Wv)`` (single head, training only).

    The projections start as the identity: a region query first attends to the tokens most like it
    and returns their plain mean, so region representations lie in token space (where the
    bootstrapped patch-level head can read them) from the first step. Random projections would hand
    the head a random rotation of the tokens instead, and the regional targets would start uniform.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        for layer in (self.q, self.k, self.v):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Queries (B, R, D) attend over tokens (B, N, D); returns (B, R, D)."""
        attn = torch.softmax(self.q(queries) @ self.k(tokens).transpose(1, 2) * self.scale, dim=-1)
        return attn @ self.v(tokens)
