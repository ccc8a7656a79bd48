"""The fast linear-probe protocol as the config describes it: which data, which features, which head.

Shared by the trainer (mIoU before/after and at eval points, the tuning
objective), ``python -m glare.eval linear`` and the experiments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from glare.config import DataConfig, EvalConfig
from glare.eval.linear_probe import ProbeResult, linear_probe


@dataclass
class ProbeData:
    """A labelled set loaded for probing: uint8 images (N, 3, S, S), int64 labels (N, S, S)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    class_names: list[str]


def segmentation_root(data: DataConfig) -> Path:
    """Where the labelled set lives: the embedded mosaic (generated on first use) or ``data.seg_root``."""
    if data.seg_format == "mosaic":
        from glare.data.mosaic import ensure_mosaic

        return ensure_mosaic(data.mosaic)
    if not data.seg_root:
        raise ValueError(f"data.seg_format={data.seg_format!r} needs data.seg_root (the data set's folder)")
    return Path(data.seg_root)


def load_probe_data(data: DataConfig, ev: EvalConfig, limit: int | None = None) -> ProbeData:
    """Load the train and val splits of the configured labelled set at ``eval.img_size``."""
    from glare.data.segmentation import load_arrays, open_segmentation

    root = segmentation_root(data)
    num_classes = data.mosaic.num_classes if data.seg_format == "mosaic" else None
    splits = {}
    for split in ("train", "val"):
        ds = open_segmentation(data.seg_format, root, split, num_classes=num_classes)
        splits[split] = (ds, load_arrays(ds, ev.img_size, limit=limit))
    ds = splits["val"][0]
    return ProbeData(train=splits["train"][1], val=splits["val"][1], num_classes=len(ds.class_names),
                     class_names=list(ds.class_names))


def run_probe(feature_fn: Callable[[torch.Tensor], torch.Tensor], data: ProbeData, ev: EvalConfig,
              device: str | torch.device = "cpu") -> ProbeResult:
    """Train the BatchNorm + 1x1 conv head on frozen features and score val mIoU (deterministic)."""
    return linear_probe(feature_fn, data.train, data.val, data.num_classes, steps=ev.probe_steps, lr=ev.probe_lr,
                        batch_size=ev.probe_batch_size, seed=ev.seed, device=device, class_names=data.class_names)
