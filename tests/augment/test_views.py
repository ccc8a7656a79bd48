import pytest
import torch
import torch.nn.functional as F

from glare.augment.views import Views, make_views, sample_overlapping_box
from glare.config import AugmentConfig

H, W, S = 48, 64, 32


def images(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, H, W), dtype=torch.uint8, generator=g)


def overlap64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over the smaller area, written out independently in float64."""
    a, b = a.double(), b.double()
    iw = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])).clamp(min=0)
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    return iw * ih / torch.min(area(a), area(b))


def manual_crop(img: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop+resize by grid_sample: view pixel u shows source point x0 + (u + 0.5) * (x1 - x0) / size."""
    u = torch.arange(size, dtype=torch.float64) + 0.5
    box = box.double()
    gx = box[:, 0, None] + u * (box[:, 2] - box[:, 0])[:, None] / size
    gy = box[:, 1, None] + u * (box[:, 3] - box[:, 1])[:, None] / size
    nx, ny = 2 * gx / img.shape[-1] - 1, 2 * gy / img.shape[-2] - 1
    grid = torch.stack([nx[:, None, :].expand(-1, size, -1), ny[:, :, None].expand(-1, -1, size)], dim=-1)
    out = F.grid_sample(img.double() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(flip[:, None, None, None], out.flip(-1), out).float()


def no_photometric(**kw) -> AugmentConfig:
    return AugmentConfig(view_size=S, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0), **kw)


def test_shapes_range_and_boxes():
    cfg = AugmentConfig(view_size=S)
    v = make_views(images(8), cfg, generator=torch.Generator().manual_seed(1))
    assert isinstance(v, Views)
    for x in (v.x1, v.x2):
        assert x.shape == (8, 3, S, S) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    for box in (v.box1, v.box2):
        assert box.shape == (8, 4)
        assert (box[:, :2] >= 0).all() and (box[:, 2] <= W).all() and (box[:, 3] <= H).all()
        assert (box[:, 2:] > box[:, :2]).all()
    area = (v.box1[:, 2] - v.box1[:, 0]) * (v.box1[:, 3] - v.box1[:, 1]) / (H * W)
    assert (area >= cfg.crop_scale[0] - 1e-5).all() and (area <= cfg.crop_scale[1] + 1e-5).all()
    assert v.flip1.shape == (8,) and v.flip1.dtype == torch.bool


def test_overlap_constraint_holds_over_many_views():
    cfg = AugmentConfig(view_size=8, min_overlap=0.5, crop_scale=(0.1, 0.6))
    v = make_views(images(256), cfg, generator=torch.Generator().manual_seed(2))
    assert (overlap64(v.box1, v.box2) >= 0.5 - 1e-5).all()


def test_overlap_fallback_when_rejection_fails():
    # Tiny crops that must nearly coincide: rejection sampling almost always fails, the nudge must fix it.
    g = torch.Generator().manual_seed(3)
    box1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(4000, 1) + torch.rand(4000, 1, generator=g) * 80
    box2 = sample_overlapping_box(box1, 100, 100, (0.005, 0.01), 0.9, g)
    ov = overlap64(box1, box2)
    assert (ov >= 0.9 - 1e-5).all()
    assert (box2 >= 0).all() and (box2 <= 100).all()
    assert (ov < 1 - 1e-6).any()  # not every fallback collapsed onto box1


def test_views_are_crops_of_the_returned_boxes_and_flips():
    img = images(8)
    v = make_views(img, no_photometric(), generator=torch.Generator().manual_seed(4))
    assert v.flip1.any() and (~v.flip1).any()  # both cases are exercised
    assert (v.x1 - manual_crop(img, v.box1, v.flip1, S)).abs().max() < 1e-4
    assert (v.x2 - manual_crop(img, v.box2, v.flip2, S)).abs().max() < 1e-4


def test_upsampling_crops_match_too():
    img = images(4)
    v = make_views(img, no_photometric(crop_scale=(0.05, 0.1)), generator=torch.Generator().manual_seed(5))
    assert (v.x1 - manual_crop(img, v.box1, v.flip1, S)).abs().max() < 1e-4


def test_flip_probability_is_respected():
    img = images(6)
    v = make_views(img, no_photometric(flip_p=1.0))
    assert v.flip1.all() and v.flip2.all()
    assert (v.x2 - manual_crop(img, v.box2, v.flip2, S)).abs().max() < 1e-4
    assert not make_views(img, no_photometric(flip_p=0.0)).flip1.any()


def test_photometric_ops_change_pixels():
    img = images(6)
    cfg = AugmentConfig(view_size=S, jitter_p=1.0, blur_p=(1.0, 1.0))
    v = make_views(img, cfg, generator=torch.Generator().manual_seed(6))
    assert (v.x1 - manual_crop(img, v.box1, v.flip1, S)).abs().mean() > 0.01


def test_generator_makes_views_reproducible_and_leaves_global_rng_alone():
    img, cfg = images(4), AugmentConfig(view_size=S, solarize_p=(0.5, 0.5))
    state = torch.get_rng_state()
    a = make_views(img, cfg, generator=torch.Generator().manual_seed(7))
    b = make_views(img, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.x1, b.x1) and torch.equal(a.x2, b.x2) and torch.equal(a.box2, b.box2)
    c = make_views(img, cfg, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.x1, c.x1)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="uint8"):
        make_views(torch.rand(2, 3, H, W), AugmentConfig(view_size=S))
    with pytest.raises(ValueError, match="uint8"):
        make_views(torch.zeros(2, 1, H, W, dtype=torch.uint8), AugmentConfig(view_size=S))
