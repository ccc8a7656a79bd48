"""Downstream evaluation, independent of the model: it only sees a feature function.

- ``metrics``: confusion-matrix mIoU / aAcc / mAcc with mmseg conventions, and mmseg's IoUMetric when installed.
- ``linear_probe``: the fast linear segmentation probe on frozen features (the tuning objective).
- ``knn``: k-NN and linear classification transfer on global ([CLS]-type) features.
- ``mmseg_shim``: lets mmsegmentation import on top of mmcv-lite.

Submodules are imported on demand so that ``import glare.eval`` stays cheap.
"""
