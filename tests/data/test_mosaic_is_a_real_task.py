"""The embedded mosaic is a real segmentation task: pretrained features beat raw pixels clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glare.config import ModelConfig, MosaicConfig
from glare.eval.linear_probe import linear_probe


@pytest.mark.slow
def test_pixels_probe_clearly_below_pretrained_vit(tmp_path):
    pytest.importorskip("onnx")
    from glare.data.mosaic import ensure_mosaic
    from glare.data.segmentation import load_arrays, open_segmentation
    from glare.models.pretrained import load_encoder

    root = ensure_mosaic(MosaicConfig(image_size=112, train=40, val=20, unlabelled=1, cache_dir=str(tmp_path)))
    train = load_arrays(open_segmentation("mosaic", root, "train", num_classes=10), 112)
    val = load_arrays(open_segmentation("mosaic", root, "val", num_classes=10), 112)
    vit = load_encoder("imgfocus", ModelConfig(img_size=112))

    def pixels(x: torch.Tensor) -> torch.Tensor:  # each 14x14 patch's raw RGB values, flattened
        return F.unfold(x, kernel_size=14, stride=14).reshape(x.shape[0], -1, 8, 8)

    kwargs = dict(num_classes=10, steps=300, batch_size=16, seed=0)
    raw = linear_probe(pixels, train, val, **kwargs).miou
    dino = linear_probe(lambda x: vit.dense_features(x), train, val, **kwargs).miou
    print(f"\nmosaic probe mIoU: raw pixels {100 * raw:.1f}, DINOv2-S/14 {100 * dino:.1f}")
    assert dino > raw + 0.10
