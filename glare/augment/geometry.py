"""Mapping points and patches between the source image and its views.

Coordinates are continuous pixels ``(x, y)``: pixel ``i`` covers ``[i, i + 1)``, so a view of side ``S``
spans ``[0, S]`` and the centre of view pixel ``u`` is ``u + 0.5``. A view with crop box ``(x0, y0, x1, y1)``
shows source point ``x0 + x * (x1 - x0) / S`` at view point ``x`` before the flip; a horizontal flip maps
``x -> S - x``. This is the ``align_corners=False`` convention of :mod:`glare.augment.views`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_grid(view_size: int, patch: int) -> int:
    """Side of the token grid; ValueError when the view is not a whole number of patches."""
    if patch < 1 or view_size % patch:
        raise ValueError(f"view_size {view_size} must be a positive multiple of the patch size {patch}")
    return view_size // patch


def view_to_image(points: Tensor, box: Tensor, flip: Tensor, view_size: int) -> Tensor:
    """Map points (B, N, 2) in view pixels to source-image pixels, given each view's box (B, 4) and flip (B,)."""
    x, y = points.unbind(-1)
    x = torch.where(flip[:, None], view_size - x, x)
    sx = (box[:, 2] - box[:, 0])[:, None] / view_size
    sy = (box[:, 3] - box[:, 1])[:, None] / view_size
    return torch.stack([box[:, 0, None] + x * sx, box[:, 1, None] + y * sy], dim=-1)


def image_to_view(points: Tensor, box: Tensor, flip: Tensor, view_size: int) -> Tensor:
    """Map points (B, N, 2) in source-image pixels to view pixels; the inverse of :func:`view_to_image`."""
    x, y = points.unbind(-1)
    x = (x - box[:, 0, None]) * view_size / (box[:, 2] - box[:, 0])[:, None]
    y = (y - box[:, 1, None]) * view_size / (box[:, 3] - box[:, 1])[:, None]
    x = torch.where(flip[:, None], view_size - x, x)
    return torch.stack([x, y], dim=-1)


def patch_centres(grid: int, patch: int, device: torch.device | str | None = None) -> Tensor:
    """Centres (N, 2) as ``(x, y)`` view pixels of a ``grid x grid`` patch grid, row-major like ViT tokens."""
    c = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * patch
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def _src_centres_in_dst(box_src: Tensor, flip_src: Tensor, box_dst: Tensor, flip_dst: Tensor,
                        view_size: int, patch: int) -> Tensor:
    """Source-view patch centres (B, N, 2) expressed in destination-view pixels."""
    grid = _check_grid(view_size, patch)
    centres = patch_centres(grid, patch, box_src.device).to(box_src.dtype).expand(box_src.shape[0], -1, -1)
    return image_to_view(view_to_image(centres, box_src, flip_src, view_size), box_dst, flip_dst, view_size)


def _inside(points: Tensor, view_size: int) -> Tensor:
    """(B, N) True where a point lies in the view ``[0, S) x [0, S)``."""
    return ((points >= 0) & (points < view_size)).all(dim=-1)


def match_patches(box_src: Tensor, flip_src: Tensor, box_dst: Tensor, flip_dst: Tensor, view_size: int,
                  patch: int) -> tuple[Tensor, Tensor]:
    """Where every source-view patch centre lies in the destination view's token grid.

    Returns:
        coords: (B, N, 2) normalised ``(x, y)`` in [-1, 1] (outside for points out of view) for
            ``F.grid_sample(tokens (B, D, grid, grid), coords[:, :, None], align_corners=False)``.
        inside: (B, N) bool, True where the centre falls inside the destination view.
    """
    pts = _src_centres_in_dst(box_src, flip_src, box_dst, flip_dst, view_size, patch)
    return pts * (2.0 / view_size) - 1.0, _inside(pts, view_size)


def map_patch_mask(mask_src: Tensor, box_src: Tensor, flip_src: Tensor, box_dst: Tensor, flip_dst: Tensor,
                   view_size: int, patch: int) -> Tensor:
    """Map a set of source-view patches (B, N) bool onto the destination view's patches (B, N) bool.

    Nearest-patch resampling both ways, OR-ed: a destination patch is in the set when its centre falls in a
    selected source patch (no holes where the destination zooms in), or when a selected source patch's centre
    falls in it (no patch is lost where the destination zooms out). Parts outside the other view are dropped.
    """
    grid = _check_grid(view_size, patch)
    if mask_src.ndim != 2 or mask_src.shape[1] != grid * grid:
        raise ValueError(f"mask_src must be (B, {grid * grid}) for view_size {view_size} and patch {patch}, "
                         f"got {tuple(mask_src.shape)}")

    def nearest(pts: Tensor) -> tuple[Tensor, Tensor]:
        cell = (pts / patch).floor().long().clamp(0, grid - 1)
        return cell[..., 1] * grid + cell[..., 0], _inside(pts, view_size)

    # Push: selected source patches -> the destination patch under their centre.
    idx, ok = nearest(_src_centres_in_dst(box_src, flip_src, box_dst, flip_dst, view_size, patch))
    pushed = torch.zeros(mask_src.shape, device=mask_src.device).scatter_add_(1, idx, (mask_src & ok).float()) > 0
    # Pull: destination patches whose centre lands on a selected source patch.
    idx, ok = nearest(_src_centres_in_dst(box_dst, flip_dst, box_src, flip_src, view_size, patch))
    pulled = mask_src.gather(1, idx) & ok
    return pushed | pulled
