"""The full downstream protocol through mmsegmentation: importing this package registers GLARE's pieces.

Registered in mmseg's registries (so an mmseg config can use them with
``custom_imports=dict(imports=['glare.eval.mmseg'], allow_failed_imports=False)``):

- ``GlareViT`` (MODELS): the adapted ViT as a multi-level backbone (``backbone.py``);
- ``GlareLayerDecayOptimizerConstructor`` (OPTIM_WRAPPER_CONSTRUCTORS): layer-wise lr decay
  over its blocks and adapters;
- ``GlareMosaicDataset`` (DATASETS): the embedded mosaic set of :mod:`glare.data.mosaic`;
- ``GlareIoUMetric`` (METRICS): mmseg's IoUMetric that also reports unrounded per-class values.

Configs live in ``configs/`` and ``runner.py`` runs them (``python -m glare.eval.mmseg.runner``).
The mmcv-lite ops shim is installed first, because mmseg's model modules import compiled mmcv ops.
"""

from __future__ import annotations

import math

import numpy as np

from glare.eval.mmseg_shim import install_mmcv_ops_shim

install_mmcv_ops_shim()  # before anything imports mmseg.models

import mmseg.models  # noqa: E402, F401  (registers mmseg's own modules: the configs build UPerHead etc.)
from mmseg.datasets import BaseSegDataset  # noqa: E402
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.registry import DATASETS, METRICS  # noqa: E402

from glare.data.mosaic import class_names  # noqa: E402
from glare.eval.mmseg.backbone import GlareLayerDecayOptimizerConstructor, GlareViT  # noqa: E402

__all__ = ["GlareIoUMetric", "GlareLayerDecayOptimizerConstructor", "GlareMosaicDataset", "GlareViT"]


@DATASETS.register_module()
class GlareMosaicDataset(BaseSegDataset):
    """The mosaic tree of :func:`glare.data.mosaic.ensure_mosaic`: PNG images and PNG masks with values
    ``0..K-1`` (no reduce_zero_label; 255 ignored). Classes default to the 10-class set; pass
    ``metainfo=dict(classes=...)`` for another ``num_classes``."""

    METAINFO = dict(classes=tuple(class_names(10)))

    def __init__(self, img_suffix: str = ".png", seg_map_suffix: str = ".png", **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, **kwargs)


def _fraction(value: float) -> float | None:
    """A metric as a JSON-safe float (None for NaN: a class absent from both prediction and labels)."""
    value = float(value)
    return None if math.isnan(value) else value


@METRICS.register_module()
class GlareIoUMetric(IoUMetric):
    """mmseg's IoUMetric that also keeps its last evaluation as unrounded fractions in [0, 1].

    mmseg returns only the summary, in percent rounded to two decimals, and prints the per-class
    table; the runner needs the per-class values too, so after each evaluation ``fractions`` holds
    aAcc / mIoU / mAcc and per-class IoU and accuracy, recomputed from the same accumulated areas.
    They stay off the returned metrics so the log lines keep mmseg's format.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fractions: dict | None = None

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        if not results:  # format_only: nothing was accumulated
            return metrics
        intersect, union, _, label = (sum(r[i] for r in results).double() for i in range(4))
        iou = (intersect / union).numpy()  # 0 / 0 = NaN: class absent from labels and predictions
        acc = (intersect / label).numpy()
        classes = list(self.dataset_meta["classes"])
        self.fractions = {
            "aAcc": _fraction(intersect.sum() / label.sum()),
            "mIoU": None if np.isnan(iou).all() else _fraction(np.nanmean(iou)),
            "mAcc": None if np.isnan(acc).all() else _fraction(np.nanmean(acc)),
            "IoU": {name: _fraction(v) for name, v in zip(classes, iou)},
            "Acc": {name: _fraction(v) for name, v in zip(classes, acc)},
        }
        return metrics
