"""Two DINO-style global views of each image, with the crop geometry kept.

Box convention (shared with :mod:`glare.augment.geometry`): a box ``(x0, y0, x1, y1)`` is in continuous
source-pixel coordinates, where pixel ``i`` covers ``[i, i + 1)`` and the image spans ``[0, W] x [0, H]``.
View pixel ``u`` (covering ``[u, u + 1)`` of the ``S x S`` view) shows the source point
``x0 + (u + 0.5) * (x1 - x0) / S`` (``align_corners=False`` resampling), mirrored when the view is flipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import kornia.augmentation as K
import torch
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from glare.augment.geometry import map_patch_mask, match_patches
from glare.config import AugmentConfig

# Aspect-ratio range of the random resized crop (torchvision's / DINO's default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Candidate boxes drawn per sample for the second view before falling back to nudging.
OVERLAP_TRIES = 16
# Interpolation steps t of the fallback ``box2 <- (1 - t) box2 + t box1``; t = 1 always succeeds.
NUDGE_STEPS = 8


@dataclass
class Views:
    """Two augmented views of a batch and where they came from.

    Attributes:
        x1, x2: float views (B, 3, S, S) in [0, 1].
        box1, box2: crop boxes (B, 4) as ``(x0, y0, x1, y1)`` in source-image pixel coordinates.
        flip1, flip2: (B,) bool, True where the view was mirrored horizontally after cropping.
    """

    x1: Tensor
    x2: Tensor
    box1: Tensor
    box2: Tensor
    flip1: Tensor
    flip2: Tensor

    def pair(self, patch: int) -> ViewPair:
        """The crop geometry from view 1 to view 2 on a token grid of ``patch``-pixel patches."""
        return ViewPair(self.box1, self.flip1, self.box2, self.flip2, self.x1.shape[-1], patch)


@dataclass(frozen=True, eq=False)  # tensors have no truth value: compare fields, not pairs
class ViewPair:
    """How the patches of a source view ``a`` land in a destination view ``b`` of the same images.

    Attributes:
        box_a, box_b: crop boxes (B, 4) of the two views, in source-image pixels.
        flip_a, flip_b: (B,) bool horizontal flips of the two views.
        view_size: side S of both (square) views in pixels.
        patch: side of a ViT patch in pixels (the token grid is ``S / patch`` square).
    """

    box_a: Tensor
    flip_a: Tensor
    box_b: Tensor
    flip_b: Tensor
    view_size: int
    patch: int

    def reverse(self) -> ViewPair:
        """The same pair seen the other way: from view ``b`` to view ``a``."""
        return replace(self, box_a=self.box_b, flip_a=self.flip_b, box_b=self.box_a, flip_b=self.flip_a)

    def match_patches(self) -> tuple[Tensor, Tensor]:
        """Where each patch centre of view ``a`` lies in view ``b`` (see :func:`~glare.augment.match_patches`)."""
        return match_patches(self.box_a, self.flip_a, self.box_b, self.flip_b, self.view_size, self.patch)

    def map_regions(self, masks: Tensor) -> Tensor:
        """Map region masks (B, R, N) of view ``a`` onto view ``b``'s patches (nearest patch, region by region)."""
        b, r, n = masks.shape
        per_region = (t.repeat_interleave(r, dim=0) for t in (self.box_a, self.flip_a, self.box_b, self.flip_b))
        return map_patch_mask(masks.reshape(b * r, n), *per_region, self.view_size, self.patch).reshape(b, r, n)


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Raise ValueError when ``generator`` cannot draw numbers on ``device`` (torch needs the same device type)."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device.type!r} but the tensors are on {device.type!r}; "
                         "pass a torch.Generator(device=...) of the tensors' device")


def box_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Intersection area of boxes ``a`` and ``b`` (..., 4) divided by the smaller box's area."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return iw * ih / torch.minimum(area_a, area_b)


def sample_boxes(n: int, height: int, width: int, scale: tuple[float, float], device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """Random resized crop boxes (n, 4): area fraction uniform in ``scale``, log-uniform aspect ratio.

    Boxes too wide or tall for the image are clipped to its side (instead of torchvision's retry loop), so
    every box lies inside ``[0, W] x [0, H]``; coordinates are continuous, not rounded to pixels.
    """
    u = torch.rand(n, 4, device=device, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * (height * width)
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = (area * ratio).sqrt().clamp(max=width)
    h = (area / ratio).sqrt().clamp(max=height)
    x0 = u[:, 2] * (width - w)
    y0 = u[:, 3] * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def sample_overlapping_box(box1: Tensor, height: int, width: int, scale: tuple[float, float], min_overlap: float,
                           generator: torch.Generator | None = None) -> Tensor:
    """A second crop box per row of ``box1`` (B, 4) with ``box_overlap(box1, box2) >= min_overlap``.

    Rule: draw ``OVERLAP_TRIES`` candidates per sample at once and keep the first that meets the constraint.
    Where none does, take the candidate with the largest overlap and move it corner-wise toward ``box1``,
    ``(1 - t) * box2 + t * box1``, with the smallest ``t`` in ``{1/8, 2/8, ..., 1}`` that meets the constraint
    (``t = 1`` is ``box1`` itself, overlap 1 > ``min_overlap``). The nudged box stays inside the image and its
    aspect ratio stays in range; its area lies between the two boxes' areas or slightly above.
    """
    b = box1.shape[0]
    cand = sample_boxes(b * OVERLAP_TRIES, height, width, scale, box1.device, generator).view(b, OVERLAP_TRIES, 4)
    ov = box_overlap(box1[:, None], cand)
    ok = ov >= min_overlap
    found = ok.any(dim=1)
    pick = torch.where(found, ok.int().argmax(dim=1), ov.argmax(dim=1))
    box2 = cand[torch.arange(b, device=box1.device), pick]

    t = torch.arange(1, NUDGE_STEPS + 1, device=box1.device, dtype=box1.dtype)[None, :, None] / NUDGE_STEPS
    steps = box2[:, None] * (1 - t) + box1[:, None] * t  # (B, NUDGE_STEPS, 4); the last row equals box1
    first = (box_overlap(box1[:, None], steps) >= min_overlap).int().argmax(dim=1)
    nudged = steps[torch.arange(b, device=box1.device), first]
    return torch.where(found[:, None], box2, nudged)


def kornia_corners(box: Tensor, size: int) -> Tensor:
    """Turn boxes (B, 4) into the (B, 4, 2) corner points ``crop_and_resize`` expects.

    Kornia maps the given corners onto the centres of the output's corner pixels (align_corners=True),
    so the corners are the source positions (in pixel-index units, centre of pixel i at i) of the
    first and last view pixel centres under this module's convention.
    """
    x0, y0, x1, y1 = box.unbind(-1)
    hx = (x1 - x0) / (2 * size)
    hy = (y1 - y0) / (2 * size)
    left, right = x0 + hx - 0.5, x1 - hx - 0.5
    top, bottom = y0 + hy - 0.5, y1 - hy - 0.5
    return torch.stack([torch.stack([left, top], -1), torch.stack([right, top], -1),
                        torch.stack([right, bottom], -1), torch.stack([left, bottom], -1)], dim=1)


@lru_cache(maxsize=8)
def _photometric(brightness: float, contrast: float, saturation: float, hue: float, jitter_p: float,
                 grayscale_p: float, blur_p: float, solarize_p: float) -> nn.Module:
    """DINO's colour pipeline for one view (built once per setting and reused)."""
    return K.ImageSequential(
        K.ColorJitter(brightness, contrast, saturation, hue, p=jitter_p),
        K.RandomGrayscale(p=grayscale_p),
        # Kernel 13 covers +-3 sigma at the largest sigma (2.0).
        K.RandomGaussianBlur(13, (0.1, 2.0), p=blur_p),
        # Scalar 0.0 ranges mean a fixed threshold of 0.5 and no addition (DINO's solarize at 128).
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p),
    )


@contextmanager
def _kornia_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Seed torch's global CPU RNG from ``generator`` for the duration (Kornia takes no generator and draws
    its parameters on the CPU); the global state is restored afterwards. No-op without a generator."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def make_views(images: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> Views:
    """Two augmented global views of a uint8 batch (B, 3, H, W), on the batch's device.

    Crops: random resized crops (scale ``cfg.crop_scale``) of side ``cfg.view_size``, the second constrained
    to overlap the first (see :func:`sample_overlapping_box`). Then per view: horizontal flip (``cfg.flip_p``),
    colour jitter, grayscale, Gaussian blur (``cfg.blur_p[i]``) and solarisation (``cfg.solarize_p[i]``).
    ``generator`` (on the batch's device) makes the result reproducible.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"make_views expects a uint8 tensor (B, 3, H, W), got {got}")
    check_generator(generator, images.device)
    b, _, h, w = images.shape
    size = cfg.view_size
    scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))

    box1 = sample_boxes(b, h, w, scale, images.device, generator)
    box2 = sample_overlapping_box(box1, h, w, scale, cfg.min_overlap, generator)
    flips = torch.rand(2, b, device=images.device, generator=generator) < cfg.flip_p

    src = images.float().div_(255).repeat(2, 1, 1, 1)  # both views in one warp
    corners = kornia_corners(torch.cat([box1, box2]), size)
    crops = crop_and_resize(src, corners, (size, size), mode="bilinear", padding_mode="border", align_corners=True)
    flip = flips.reshape(-1)
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)

    out = []
    with _kornia_rng(generator):
        for i, crop in enumerate(crops.chunk(2)):
            aug = _photometric(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p,
                               cfg.grayscale_p, cfg.blur_p[i], cfg.solarize_p[i])
            out.append(aug(crop).clamp_(0, 1))
    return Views(out[0], out[1], box1, box2, flips[0], flips[1])
