"""UniAdapter, visual branch only, placed parallel to each ViT block's MLP.

``a(x) = s * W_up(ReLU(W_down(LN(x))))`` with ``W_up`` zero-initialised, so an
adapted network equals the pre-trained one until the first optimiser step.
"""

from __future__ import annotations

import torch
from torch import nn

from glare.config import AdapterConfig, ConfigError


class UniAdapter(nn.Module):
    """Bottleneck adapter: LayerNorm -> down -> ReLU -> up (zero init) -> scale."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, learnable_scale: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's residual contribution for tokens ``x`` (B, N, D)."""
        return self.scale * self.up(torch.relu(self.down(self.norm(x))))


def build_adapters(dim: int, depth: int, cfg: AdapterConfig) -> nn.ModuleDict:
    """One :class:`UniAdapter` per adapted block, keyed by the block's index (``"0"`` .. ``"depth-1"``).

    Keyed by block rather than listed, so that ``cfg.first_block > 0`` leaves the early blocks
    without an adapter while every state key (``"{block}.down.weight"``) still names its block.
    """
    if not 0 <= cfg.first_block < depth:
        raise ConfigError(f"config key 'model.adapter.first_block': {cfg.first_block} must lie in "
                          f"[0, {depth - 1}] for a ViT of {depth} blocks")
    return nn.ModuleDict({
        str(i): UniAdapter(dim, cfg.bottleneck, cfg.scale, cfg.learnable_scale) for i in range(cfg.first_block, depth)
    })


def adapted_block(block: nn.Module, adapter: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT ``Block`` forward with the adapter parallel to its MLP.

    ``x = x + attn(norm1(x)); x = x + ls2(mlp(norm2(x))) + a(x)`` -- written out
    here (not a timm hook) because the adapter reads the post-attention residual,
    which timm's block never exposes.
    """
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    out = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return out if adapter is None else out + adapter(x)
