"""DINO projection head (training only; never part of an export)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glare.config import HeadConfig


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> K prototypes of unit norm.

    The unit-norm prototypes are DINO's weight-normalised last layer with the
    gain frozen at 1, written as a normalised matrix so no parametrisation (and
    no parameter without a gradient) is needed.
    """

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(cfg.out_dim, cfg.bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the K prototypes for embeddings ``x`` (..., D)."""
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))

    def load_dino_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a DINO/UDI head (``mlp.*``, ``last_layer.weight_v``/``weight``), keys relative to the head."""
        mine: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith("mlp."):
                mine[key] = value
            elif key in ("last_layer.weight_v", "last_layer.weight",
                         "last_layer.parametrizations.weight.original1"):
                mine["prototypes"] = value
        missing, unexpected = self.load_state_dict(mine, strict=False)
        if missing or unexpected:
            raise ValueError(f"DINO head does not match the configured head: missing {missing}, "
                             f"unexpected {unexpected}; set model.head.* to the checkpoint's sizes")
