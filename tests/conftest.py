"""Shared fixtures: a tiny config and a quiet, offline environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(*overrides)``: the tiny preset (random-init 2-block ViT, 32 px) with dot-overrides."""
    from glare.config import load_config

    def make(*overrides: str):
        return load_config("tiny", overrides)

    return make


NATURAL_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "stereo_motorcycle")


@pytest.fixture(scope="session")
def natural_images():
    """``natural_images(size)``: 8 distinct bundled CC0 photos (scikit-image) as uint8 (8, 3, size, size)."""
    import skimage.data
    import torch
    import torch.nn.functional as F

    def make(size: int):
        out = []
        for name in NATURAL_IMAGES:
            a = getattr(skimage.data, name)()
            a = a[0] if isinstance(a, tuple) else a
            t = torch.from_numpy(a[..., :3]).permute(2, 0, 1)[None].float()
            out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[0])
        return torch.stack(out).round().clamp(0, 255).to(torch.uint8)

    return make
