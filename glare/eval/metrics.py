"""Semantic-segmentation metrics: confusion matrix, mIoU, aAcc, mAcc (mmseg conventions).

The confusion-matrix path is the default: it streams (accumulate one matrix over batches), counts in
int64, and needs nothing beyond torch. ``intersect_and_union`` goes through mmseg's ``IoUMetric`` when
mmseg is installed, so numbers can be checked against the reference implementation.

Conventions (as in mmseg's ``IoUMetric``): pixels whose target equals ``ignore_index`` are skipped;
a class absent from both prediction and target has IoU NaN and is left out of the mean; a class
predicted but absent from the target has IoU 0 and counts. Scores are fractions in [0, 1].
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "mmseg", "torch"]


@dataclass
class SegMetrics:
    """Scores of one evaluation; per-class lists hold NaN for classes with no pixels to score."""

    miou: float
    aacc: float
    macc: float
    per_class_iou: list[float]
    per_class_acc: list[float]


def _check_labels(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise a readable error for the mistakes that would otherwise give a wrong matrix silently."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= num_classes))
    if bad_target.any():
        raise ValueError(
            f"target holds labels outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
            f"{sorted(target[bad_target].unique().tolist())[:10]}"
        )
    bad_pred = valid & ((pred < 0) | (pred >= num_classes))
    if bad_pred.any():
        raise ValueError(
            f"pred holds classes outside [0, {num_classes}): {sorted(pred[bad_pred].unique().tolist())[:10]}"
        )


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Count (target, prediction) pairs: ``cm[t, p]`` pixels of class t predicted as p.

    Args:
        pred: integer predictions, any shape (e.g. (N, H, W)).
        target: integer labels of the same shape; ``ignore_index`` pixels are skipped.
        num_classes: number of classes C.
        ignore_index: label value that is not scored.

    Returns:
        int64 tensor (C, C) on the CPU; rows are targets, columns predictions.
    """
    _check_labels(pred, target, num_classes, ignore_index)
    keep = target != ignore_index
    flat = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def _nanmean(values: Tensor) -> float:
    """Mean over the non-NaN entries; NaN when there are none (nothing to score)."""
    finite = values[~values.isnan()]
    return finite.mean().item() if finite.numel() else math.nan


def _metrics_from_areas(intersect: Tensor, union: Tensor, area_label: Tensor) -> SegMetrics:
    """mmseg's formulas: IoU = I/U, Acc = I/label area, aAcc = sum I / sum label area; 0/0 -> NaN."""
    intersect, union, area_label = (t.double() for t in (intersect, union, area_label))
    iou = intersect / union
    acc = intersect / area_label
    total = area_label.sum()
    return SegMetrics(
        miou=_nanmean(iou),
        aacc=(intersect.sum() / total).item() if total > 0 else math.nan,
        macc=_nanmean(acc),
        per_class_iou=iou.tolist(),
        per_class_acc=acc.tolist(),
    )


def metrics_from_confusion(cm: Tensor) -> SegMetrics:
    """mIoU, aAcc, mAcc and per-class IoU/accuracy from a (C, C) confusion matrix (rows = targets)."""
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {tuple(cm.shape)}")
    intersect = cm.diagonal()
    area_pred, area_label = cm.sum(0), cm.sum(1)
    return _metrics_from_areas(intersect, area_pred + area_label - intersect, area_label)


@functools.cache
def mmseg_available() -> bool:
    """Whether mmseg's IoUMetric can be imported (mmseg + mmengine + mmcv-lite installed)."""
    try:
        _mmseg_iou_metric()
    except (ImportError, AssertionError):  # mmseg asserts on an mmcv version it does not support
        return False
    return True


def _mmseg_iou_metric():
    """Import mmseg's IoUMetric lazily: mmseg is an optional extra and costs about a second to import."""
    from glare.eval.mmseg_shim import install_mmcv_ops_shim

    install_mmcv_ops_shim()
    from mmseg.evaluation.metrics.iou_metric import IoUMetric

    return IoUMetric


def _mmseg_metrics(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> SegMetrics:
    """Score with mmseg's own functions, per image then summed, exactly as ``IoUMetric`` does."""
    iou_metric = _mmseg_iou_metric()
    pred, target = pred.reshape(-1, *pred.shape[-2:]), target.reshape(-1, *target.shape[-2:])
    areas = [iou_metric.intersect_and_union(p, t, num_classes, ignore_index) for p, t in zip(pred, target, strict=True)]
    intersect, union, area_pred, area_label = (torch.stack(a).sum(0) for a in zip(*areas, strict=True))
    scores = iou_metric.total_area_to_metrics(intersect, union, area_pred, area_label, metrics=["mIoU"])
    per_class_iou, per_class_acc = torch.from_numpy(scores["IoU"]), torch.from_numpy(scores["Acc"])
    return SegMetrics(
        miou=_nanmean(per_class_iou.double()),
        aacc=float(scores["aAcc"]),
        macc=_nanmean(per_class_acc.double()),
        per_class_iou=per_class_iou.double().tolist(),
        per_class_acc=per_class_acc.double().tolist(),
    )


def intersect_and_union(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255, backend: Backend = "auto"
) -> SegMetrics:
    """Score predictions against targets, through mmseg's ``IoUMetric`` when it is installed.

    Args:
        pred: integer predictions (H, W) or (N, H, W).
        target: integer labels of the same shape.
        num_classes: number of classes C.
        ignore_index: label value that is not scored.
        backend: "mmseg" (``IoUMetric.intersect_and_union`` + ``total_area_to_metrics``), "torch"
            (the confusion matrix here), or "auto" (mmseg if importable, else torch).

    Returns:
        The scores; both backends give the same numbers (mmseg counts in float32, so to ~1e-7).
    """
    _check_labels(pred, target, num_classes, ignore_index)
    if backend not in ("auto", "mmseg", "torch"):
        raise ValueError(f"backend must be 'auto', 'mmseg' or 'torch', got {backend!r}")
    if pred.ndim < 2:
        raise ValueError(f"pred must be (H, W) or (N, H, W), got shape {tuple(pred.shape)}")
    if backend == "mmseg" or (backend == "auto" and mmseg_available()):
        return _mmseg_metrics(pred, target, num_classes, ignore_index)
    return metrics_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def batched_miou(cms: Tensor) -> Tensor:
    """mIoU of each confusion matrix in a batch (..., C, C), with :func:`metrics_from_confusion`'s conventions."""
    cms = cms.double()
    intersect = cms.diagonal(dim1=-2, dim2=-1)
    iou = intersect / (cms.sum(-2) + cms.sum(-1) - intersect)  # 0/0 -> NaN: a class with nothing to score
    return iou.nanmean(-1)


def paired_miou_difference(cms_a: Tensor, cms_b: Tensor, resamples: int = 2000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float, float]:
    """mIoU(a) - mIoU(b) on the same images, with a bootstrap confidence interval over those images.

    Args:
        cms_a: per-image confusion matrices (S, N, C, C) of model a for S probe heads (e.g. probe seeds)
            on N images; the score is the mIoU of the summed matrix, averaged over the S heads.
        cms_b: the same for model b, on the same images in the same order, with heads of the same seeds.
        resamples: bootstrap draws of N images with replacement (the same draw for a and b: paired).
        seed: the draws' seed.
        level: the interval's coverage.

    Returns:
        (difference, low, high): the difference on all N images and the percentile interval.
    """
    if cms_a.shape != cms_b.shape or cms_a.ndim != 4:
        raise ValueError(f"need two (S, N, C, C) stacks of one shape, got {tuple(cms_a.shape)}, {tuple(cms_b.shape)}")
    n = cms_a.shape[1]
    diff = lambda idx: batched_miou(cms_a[:, idx].sum(1)).mean(0) - batched_miou(cms_b[:, idx].sum(1)).mean(0)  # noqa: E731
    point = float(diff(torch.arange(n)))
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    # (S, R, N, C, C) summed over N per draw, a chunk of draws at a time to bound memory.
    stats = torch.cat([
        batched_miou(torch.stack([cms_a[:, d].sum(1) for d in chunk], 1)).mean(0)
        - batched_miou(torch.stack([cms_b[:, d].sum(1) for d in chunk], 1)).mean(0)
        for chunk in draws.split(256)
    ])
    tail = (1 - level) / 2
    low, high = torch.quantile(stats, torch.tensor([tail, 1 - tail], dtype=stats.dtype)).tolist()
    return point, low, high
