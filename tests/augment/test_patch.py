import pytest
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from glare.augment.patch import blur_patches, distort_patches

P = 16


def noise(b: int = 2, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def pixel_mask(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Patch mask (B, N) -> pixel mask (B, 1, side, side)."""
    g = side // P
    return mask.view(-1, 1, g, g).repeat_interleave(P, 2).repeat_interleave(P, 3)


def mean_abs_laplacian(x: torch.Tensor) -> torch.Tensor:
    """Mean |Laplacian| per patch (B, N), on each patch's interior only (no cross-patch stencil)."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    b, c, s, _ = x.shape
    patches = x.view(b, c, s // P, P, s // P, P).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, P, P)
    return F.conv2d(patches, lap, groups=3).abs().mean(dim=(1, 2, 3)).view(b, -1)


def test_only_masked_patches_change_and_count_is_right():
    x = noise()
    out, mask = distort_patches(x, P, 0.3, (1.0, 3.0), generator=torch.Generator().manual_seed(1))
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [5, 5]  # round(0.3 * 16)
    keep = ~pixel_mask(mask, 64).expand_as(x)
    assert torch.equal(out[keep], x[keep])  # bit for bit outside the chosen patches
    changed = (out != x).view(2, 3, 4, P, 4, P).any(dim=(1, 3, 5)).view(2, 16)
    assert torch.equal(changed, mask)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.3, 0.51, 1.0])
def test_count_equals_rounded_fraction(fraction):
    _, mask = distort_patches(noise(3, 128), P, fraction, (1.0, 2.0))
    assert mask.sum(dim=1).tolist() == [round(fraction * 64)] * 3


@pytest.mark.parametrize("sigma", [(0.0, 0.0), (1e-4, 1e-4)])
def test_tiny_sigma_is_identity(sigma):
    x = noise()
    out, mask = distort_patches(x, P, 0.5, sigma)
    assert mask.sum() == 16
    assert torch.equal(out, x)


def test_blur_lowers_high_frequency_energy():
    x = noise(4)
    out, mask = distort_patches(x, P, 0.5, (1.5, 3.0), generator=torch.Generator().manual_seed(2))
    before, after = mean_abs_laplacian(x)[mask], mean_abs_laplacian(out)[mask]
    assert (after < 0.25 * before).all()
    assert torch.allclose(mean_abs_laplacian(out)[~mask], mean_abs_laplacian(x)[~mask])


def test_blur_matches_kornia_per_patch_sigma():
    g = torch.Generator().manual_seed(3)
    patches, sigma = torch.rand(10, 3, P, P, generator=g), 0.5 + 2.5 * torch.rand(10, generator=g)
    ours = blur_patches(patches, sigma, 7)
    ref = gaussian_blur2d(patches, (15, 15), sigma[:, None].repeat(1, 2), border_type="reflect")
    assert (ours - ref).abs().max() < 1e-5


def test_blur_keeps_constant_patch_constant():
    x = torch.full((1, 3, 32, 32), 0.3)
    out, _ = distort_patches(x, P, 1.0, (2.0, 3.0))
    assert (out - 0.3).abs().max() < 1e-6


def test_noise_is_clamped_and_jitter_scales_patches():
    x = noise()
    out, mask = distort_patches(x, P, 0.5, (0.0, 0.0), noise_p=1.0, noise_std=1.0)
    sel = out[pixel_mask(mask, 64).expand_as(x)]
    assert sel.min() == 0 and sel.max() == 1  # strong noise hits both clamps
    assert (sel != x[pixel_mask(mask, 64).expand_as(x)]).float().mean() > 0.9

    flat = torch.full((1, 3, 64, 64), 0.5)
    out, mask = distort_patches(flat, P, 1.0, (0.0, 0.0), jitter_p=1.0, jitter_strength=0.4)
    patches = out.view(3, 4, P, 4, P).permute(1, 3, 0, 2, 4).reshape(16, -1)
    assert torch.allclose(patches, patches[:, :1].expand_as(patches))  # constant patch stays constant
    level = patches[:, 0]
    assert (level >= 0.3 - 1e-6).all() and (level <= 0.7 + 1e-6).all() and level.std() > 0.01  # 0.5 * U(0.6, 1.4)


def test_generator_reproducible():
    x = noise()
    a = distort_patches(x, P, 0.3, (1.0, 3.0), noise_p=0.5, generator=torch.Generator().manual_seed(4))
    b = distort_patches(x, P, 0.3, (1.0, 3.0), noise_p=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        distort_patches(torch.rand(1, 3, 40, 40), P, 0.3, (1.0, 2.0))
    with pytest.raises(ValueError, match="float tensor"):
        distort_patches(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), P, 0.3, (1.0, 2.0))
    with pytest.raises(ValueError, match="blur_sigma"):
        distort_patches(torch.rand(1, 3, 32, 32), P, 0.3, (2.0, 1.0))
    with pytest.raises(ValueError, match="fraction"):
        distort_patches(torch.rand(1, 3, 32, 32), P, 1.5, (1.0, 2.0))
