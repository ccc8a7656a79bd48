"""The frozen timm ViT backbone and its adapted forward pass.

One function, :func:`encode`, runs a timm ``VisionTransformer`` with a given
adapter set; the GLARE model calls it with the student's or the teacher's
adapters over one shared backbone, and :class:`AdaptedViT` (what exports load
into) calls it with its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from glare.config import AdapterConfig, ModelConfig
from glare.models.adapter import adapted_block, build_adapters

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Features:
    """What one pass of the (adapted) ViT gives back.

    Attributes:
        prefix: class token(s) and register tokens after the final norm, (B, P, D).
        patches: patch tokens after the final norm, (B, N, D), row-major grid.
        grid: (rows, cols) of the patch grid.
        cls_attn: last block's attention from the global token to every patch,
            per head, (B, H, N); only when asked for.
        hidden: final-normed patch tokens of the requested blocks, each (B, N, D).
    """

    prefix: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]
    cls_attn: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None

    def patch_map(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens as a (B, D, rows, cols) map."""
        t = self.patches if tokens is None else tokens
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)

    def dense(self) -> torch.Tensor:
        """The requested blocks' patch maps concatenated along channels: (B, sum D, rows, cols)."""
        if not self.hidden:
            raise ValueError("no block outputs were requested (pass blocks=...)")
        return torch.cat([self.patch_map(h) for h in self.hidden], dim=1)


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm ViT (no classifier, any input size) with every parameter frozen."""
    try:
        vit = timm.create_model(
            cfg.arch, pretrained=False, num_classes=0, img_size=cfg.img_size, dynamic_img_size=True,
            **cfg.timm_kwargs,
        )
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"cannot build model.arch={cfg.arch!r} with model.timm_kwargs={cfg.timm_kwargs}: {err}") \
            from None
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise ValueError(f"model.arch={cfg.arch!r} is not a timm VisionTransformer")
    vit.requires_grad_(False)
    return vit


def _normalise(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), device=images.device, dtype=images.dtype)
    std = torch.tensor(cfg.get("std", IMAGENET_STD), device=images.device, dtype=images.dtype)
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def global_token_attention(block: nn.Module, x: torch.Tensor, token: int, num_prefix: int) -> torch.Tensor:
    """Softmax attention of prefix token ``token`` over the patch tokens, per head: (B, H, N).

    Recomputed from the block's q/k projections (one extra linear on the last
    block) so the block itself keeps timm's fused attention kernel.
    """
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, token : token + 1] * attn.scale) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:]


def encode(
    vit: nn.Module,
    adapters: Mapping[str, nn.Module] | None,
    images: torch.Tensor,
    *,
    attention: bool = False,
    global_token: int = 0,
    blocks: Sequence[int] = (),
) -> Features:
    """Run the ViT on images in [0, 1] with ``adapters`` (block index -> adapter; None: the plain backbone).

    With a frozen backbone, autograd records nothing below the first adapter (no input there needs a
    gradient), which is what makes a later ``model.adapter.first_block`` cheaper to train.

    Args:
        attention: also return the last block's global-token attention maps.
        global_token: which prefix token the attention maps start from.
        blocks: indices of blocks whose (final-normed) patch tokens to return.
    """
    x = vit.patch_embed(_normalise(vit, images))
    grid = (x.shape[1], x.shape[2]) if x.ndim == 4 else vit.patch_embed.grid_size
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    p = vit.num_prefix_tokens
    depth = len(vit.blocks)
    wanted = {b % depth for b in blocks}
    hidden: list[torch.Tensor] = []
    cls_attn = None
    adapters = adapters if adapters is not None else {}
    for i, block in enumerate(vit.blocks):
        if attention and i == depth - 1:
            cls_attn = global_token_attention(block, x, global_token, p)
        x = adapted_block(block, adapters[str(i)] if str(i) in adapters else None, x)
        if i in wanted:
            hidden.append(vit.norm(x)[:, p:])
    x = vit.norm(x)
    return Features(prefix=x[:, :p], patches=x[:, p:], grid=tuple(grid), cls_attn=cls_attn,
                    hidden=hidden if blocks else None)


def dense_of_last_blocks(features: Callable[..., Features], depth: int, last_blocks: int) -> torch.Tensor:
    """Patch features of the last ``last_blocks`` of ``depth`` blocks, concatenated, as (B, C, rows, cols).

    ``features`` takes ``blocks=`` (an :func:`encode` bound to a model and its images).
    """
    return features(blocks=tuple(range(depth - last_blocks, depth))).dense()


def block_indices(out_indices: Sequence[int], depth: int) -> tuple[int, ...]:
    """``out_indices`` as increasing non-negative block indices (encode returns blocks in network order)."""
    blocks = tuple(i + depth if i < 0 else i for i in out_indices)
    if not blocks or any(not 0 <= b < depth for b in blocks) or list(blocks) != sorted(set(blocks)):
        raise ValueError(f"out_indices={tuple(out_indices)} must be increasing block indices of a "
                         f"{depth}-block ViT (e.g. {tuple(range(depth))[-4:]})")
    return blocks


def multi_level_maps(vit: nn.Module, adapters: Mapping[str, nn.Module] | None, images: torch.Tensor,
                     blocks: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """(B, D, rows, cols) maps of ``blocks`` for RGB images in [0, 1] of any size (a dense head's input).

    Sides that are not a multiple of the patch size are resized to the nearest multiple (not
    cropped), so the patch grid covers the whole image, the extent a head upsamples logits back to.
    """
    p = patch_size(vit)
    h, w = images.shape[-2:]
    if h % p or w % p:
        size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    feats = encode(vit, adapters, images, blocks=blocks)
    return tuple(feats.patch_map(t) for t in feats.hidden)


def patch_size(vit: nn.Module) -> int:
    """The side of a timm ViT's square patches."""
    ps = vit.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


class AdaptedViT(nn.Module):
    """A timm ViT with a UniAdapter per block (from ``first_block``): what GLARE exports and evaluates.

    ``forward_features`` matches timm's (B, P + N, D) output, so downstream code
    written for timm ViTs works unchanged.
    """

    def __init__(self, vit: nn.Module, adapters: nn.ModuleDict | None = None,
                 adapter_cfg: AdapterConfig | None = None) -> None:
        super().__init__()
        self.vit = vit
        if adapters is None:
            adapters = build_adapters(vit.embed_dim, len(vit.blocks), adapter_cfg or AdapterConfig())
        self.adapters = adapters

    @property
    def patch_size(self) -> int:
        return patch_size(self.vit)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.vit.blocks[-1].attn.num_heads)

    def features(self, images: torch.Tensor, *, attention: bool = False, global_token: int = 0,
                 blocks: Sequence[int] = ()) -> Features:
        """See :func:`encode`; images are float in [0, 1]."""
        return encode(self.vit, self.adapters, images, attention=attention, global_token=global_token, blocks=blocks)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm-style tokens (B, P + N, D) for images in [0, 1]."""
        f = self.features(images)
        return torch.cat([f.prefix, f.patches], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    def dense_features(self, images: torch.Tensor, last_blocks: int = 1) -> torch.Tensor:
        """Patch features of the last ``last_blocks`` blocks, concatenated, as (B, C, rows, cols)."""
        return dense_of_last_blocks(functools.partial(self.features, images), len(self.vit.blocks), last_blocks)

