"""Attention-guided region sampling and region queries (method.md §3.2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from glare.augment.views import check_generator


def sample_regions(cls_attn: Tensor, num_regions: int, top_q: float,
                   generator: torch.Generator | None = None) -> Tensor:
    """Regions (B, R, N) bool from the [CLS] attention of the teacher's last block, ``cls_attn`` (B, H, N).

    Per image, ``num_regions`` distinct heads are drawn at random; region k holds the ``ceil(top_q * N)``
    patches (at least one) with the highest attention in head k. The head's top patch (an arg-max) is always
    the first one taken, so every region contains its seed.
    """
    if cls_attn.ndim != 3:
        raise ValueError(f"cls_attn must be (B, heads, N), got shape {tuple(cls_attn.shape)}")
    b, heads, n = cls_attn.shape
    if not 1 <= num_regions <= heads:
        raise ValueError(f"num_regions ({num_regions}) must be between 1 and the number of heads ({heads})")
    if not 0.0 < top_q <= 1.0:
        raise ValueError(f"top_q must be in (0, 1], got {top_q}")
    check_generator(generator, cls_attn.device)

    chosen = torch.rand(b, heads, device=cls_attn.device, generator=generator).argsort(dim=1)[:, :num_regions]
    attn = cls_attn.gather(1, chosen[:, :, None].expand(-1, -1, n))  # (B, R, N)
    k = min(max(math.ceil(top_q * n), 1), n)
    top = attn.topk(k, dim=-1).indices
    return torch.zeros_like(attn, dtype=torch.bool).scatter_(-1, top, True)


def region_queries(tokens: Tensor, masks: Tensor) -> Tensor:
    """Mean token (B, R, D) of each region: ``tokens`` (B, N, D) averaged over ``masks`` (B, R, N).

    An empty region gives a zero vector.
    """
    if tokens.ndim != 3 or masks.ndim != 3 or masks.shape[0] != tokens.shape[0] or masks.shape[2] != tokens.shape[1]:
        raise ValueError(f"need tokens (B, N, D) and masks (B, R, N) with matching B and N, got "
                         f"{tuple(tokens.shape)} and {tuple(masks.shape)}")
    w = masks.to(tokens.dtype)
    return (w @ tokens) / w.sum(dim=-1, keepdim=True).clamp_min(1)
