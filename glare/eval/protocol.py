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
from glare.data.segmentation import DataError, SegmentationSet, load_arrays, open_segmentation
from glare.data.sources import MOSAIC, embedded_root
from glare.eval.linear_probe import ProbeResult, linear_probe


@dataclass
class ProbeData:
    """A labelled set loaded for probing: uint8 images (N, 3, H, W), int64 labels (N, H, W)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    class_names: list[str]


def segmentation_root(data: DataConfig) -> Path:
    """Where the labelled set lives: the embedded mosaic (generated on first use) or ``data.seg_root``."""
    if data.seg_format == MOSAIC:
        return embedded_root(data.mosaic)
    if not data.seg_root:
        raise DataError(f"data.seg_format={data.seg_format!r} needs data.seg_root (the data set's folder)")
    return Path(data.seg_root)


def open_probe_sets(data: DataConfig, check_labels: bool = False) -> tuple[SegmentationSet, SegmentationSet]:
    """Open the probe's train and eval splits (``data.seg_train_split``, ``data.seg_eval_split``).

    Args:
        check_labels: also read every mask of a ``generic`` set and check its values, so a bad mask
            fails here, on the driver, with one line naming the file and the keys.

    Raises:
        DataError: one line naming the file or folder and the config key to fix.
    """
    root = segmentation_root(data)
    generic = dict(class_names=list(data.seg_class_names), ignore_index=data.seg_ignore_index,
                   zero_is_void=data.seg_zero_is_void) if data.seg_format == "generic" else {}
    num_classes = {MOSAIC: data.mosaic.num_classes, "generic": data.seg_num_classes}.get(data.seg_format)
    sets = []
    for key in ("seg_train_split", "seg_eval_split"):
        split = getattr(data, key)
        ds = open_segmentation(data.seg_format, root, split, num_classes=num_classes, split_key=f"data.{key}",
                               **generic)
        if check_labels and data.seg_format == "generic":
            ds.check_labels()
        sets.append(ds)
    return sets[0], sets[1]


def probe_size(ds: SegmentationSet, ev: EvalConfig, multiple: int = 1) -> int | tuple[int, int]:
    """What :func:`load_arrays` resizes to: ``eval.img_size`` squares with ``eval.square_crop``, else the whole
    frame at short side ``eval.img_size`` and the set's aspect ratio (long side a multiple of ``multiple``)."""
    return ev.img_size if ev.square_crop else ds.frame_shape(ev.img_size, multiple)


def load_probe_data(data: DataConfig, ev: EvalConfig, limit: int | None = None, multiple: int = 1) -> ProbeData:
    """Load the configured labelled set's train and eval splits at ``eval.img_size`` (see :func:`probe_size`).

    ``multiple``: round the long side of non-square frames to it (pass the backbone's patch size).
    """
    train_set, eval_set = open_probe_sets(data)
    size = probe_size(train_set, ev, multiple)
    return ProbeData(train=load_arrays(train_set, size, limit=limit), val=load_arrays(eval_set, size, limit=limit),
                     num_classes=eval_set.num_classes, class_names=list(eval_set.class_names))


def run_probe(feature_fn: Callable[[torch.Tensor], torch.Tensor], data: ProbeData, ev: EvalConfig,
              device: str | torch.device = "cpu") -> ProbeResult:
    """Train the BatchNorm + 1x1 conv head on frozen features and score val mIoU (deterministic)."""
    return linear_probe(feature_fn, data.train, data.val, data.num_classes, steps=ev.probe_steps, lr=ev.probe_lr,
                        batch_size=ev.probe_batch_size, seed=ev.seed, device=device, class_names=data.class_names)
