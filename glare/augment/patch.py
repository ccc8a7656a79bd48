"""Patch distortion ("patch blurring"): blur, and optionally noise or jitter, a random subset of ViT patches.

The blur is a separable Gaussian written for the whole batch at once: all chosen patches are gathered into one
(M, C, p, p) tensor, each gets its own 1-D kernel, and two grouped convolutions (along x, then y) blur them in a
single call each. Written by hand rather than with ``kornia.filters.gaussian_blur2d``: Kornia 0.9 does take one
sigma per patch and ran within ~30% of this on CPU (1-4k patches of 16 px), but it rejects sigma = 0, which must be
the identity here (a blur-strength range may start at 0), and this keeps the kernel radius tied to the patch side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from glare.augment.views import check_generator

# Below this sigma the Gaussian is a delta to float precision; clamping avoids 0/0 at sigma = 0.
_MIN_SIGMA = 1e-6


def blur_patches(patches: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Gaussian-blur each patch (M, C, p, p) with its own sigma (M,), kernel ``2 * radius + 1`` taps.

    Padding reflects inside the patch, so no pixel from a neighbouring patch leaks in; ``radius`` must be
    below the patch side (reflect padding's limit). Each kernel is renormalised after truncation.
    """
    m, c, p, _ = patches.shape
    if radius == 0 or m == 0:
        return patches
    if radius >= p:
        raise ValueError(f"blur radius {radius} must be smaller than the patch size {p}")
    d = torch.arange(-radius, radius + 1, device=patches.device, dtype=patches.dtype)
    kernel = torch.exp(-0.5 * (d / sigma.to(patches.dtype).clamp_min(_MIN_SIGMA)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M * C, K)
    taps = 2 * radius + 1
    y = patches.reshape(1, m * c, p, p)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(m * c, 1, 1, taps), groups=m * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(m * c, 1, taps, 1), groups=m * c)
    return y.view(m, c, p, p)


def _uniform(n: int, lo: float, hi: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=like.device, dtype=like.dtype, generator=generator)


def distort_patches(x: Tensor, patch: int, fraction: float, blur_sigma: tuple[float, float], noise_p: float = 0.0,
                    noise_std: float = 0.1, jitter_p: float = 0.0, jitter_strength: float = 0.4,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Distort ``round(fraction * N)`` random patches of each image in ``x`` (B, C, H, W), float in [0, 1].

    Every chosen patch is blurred with a sigma uniform in ``blur_sigma``; with probability ``noise_p`` it also
    gets Gaussian noise of std ``noise_std``, and with probability ``jitter_p`` a contrast and a brightness
    factor, each uniform in ``[1 - jitter_strength, 1 + jitter_strength]``. Distorted patches are clamped to
    [0, 1]; all other pixels are returned bit for bit.

    Returns:
        The distorted batch and the (B, N) bool mask of distorted patches, row-major like ViT tokens.
    """
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"distort_patches expects a float tensor (B, C, H, W), got {got}")
    b, c, h, w = x.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {patch}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    lo, hi = blur_sigma
    if not 0.0 <= lo <= hi:
        raise ValueError(f"blur_sigma must be (low, high) with 0 <= low <= high, got {tuple(blur_sigma)}")
    check_generator(generator, x.device)

    gh, gw = h // patch, w // patch
    n = gh * gw
    k = int(round(fraction * n))
    mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    if k == 0:
        return x.clone(), mask
    idx = torch.rand(b, n, device=x.device, generator=generator).argsort(dim=1)[:, :k]  # (B, k)
    mask.scatter_(1, idx, True)

    out = x.clone()
    grid = out.view(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p), a view of `out`
    where = (torch.arange(b, device=x.device)[:, None], idx // gw, idx % gw)
    sel = grid[where].reshape(b * k, c, patch, patch)
    m = b * k

    radius = min(math.ceil(3 * hi), patch - 1)
    sel = blur_patches(sel, _uniform(m, lo, hi, sel, generator), radius)
    if noise_p > 0:
        on = torch.rand(m, device=x.device, generator=generator) < noise_p
        noise = torch.randn(sel.shape, device=x.device, dtype=sel.dtype, generator=generator) * noise_std
        sel = torch.where(on[:, None, None, None], sel + noise, sel)
    if jitter_p > 0:
        on = torch.rand(m, device=x.device, generator=generator) < jitter_p
        con = _uniform(m, 1 - jitter_strength, 1 + jitter_strength, sel, generator)[:, None, None, None]
        bri = _uniform(m, 1 - jitter_strength, 1 + jitter_strength, sel, generator)[:, None, None, None]
        mean = sel.mean(dim=(1, 2, 3), keepdim=True)
        sel = torch.where(on[:, None, None, None], ((sel - mean) * con + mean) * bri, sel)
    grid[where] = sel.clamp(0, 1).view(b, k, c, patch, patch)  # writes into `out` through the view
    return out, mask
