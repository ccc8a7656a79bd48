"""Segmentation metrics: exact numbers on hand-made masks, and agreement with mmseg's IoUMetric."""

import math

import pytest
import torch

from glare.eval.metrics import confusion_matrix, intersect_and_union, metrics_from_confusion

# 4 classes; the last target pixel is ignored (and predicted as class 3, which must not count).
TARGET = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3]])


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    cm = confusion_matrix(PRED, TARGET, num_classes=4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    assert cm.sum() == 7  # 8 pixels, 1 ignored


def test_metrics_on_hand_made_mask():
    m = metrics_from_confusion(confusion_matrix(PRED, TARGET, num_classes=4))
    # IoU: class 0 = 2/(3+3-2), class 1 = 2/(3+2-2), class 2 = 1/(1+2-1); class 3 absent from both -> NaN.
    assert m.per_class_iou[:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert math.isnan(m.per_class_iou[3])
    assert m.miou == pytest.approx(5 / 9)
    assert m.aacc == pytest.approx(5 / 7)
    assert m.per_class_acc[:3] == pytest.approx([2 / 3, 1.0, 0.5])
    assert m.macc == pytest.approx(13 / 18)


def test_class_predicted_but_absent_from_target_counts_as_zero():
    pred = PRED.clone()
    pred[1, 2] = 3  # a class-2 pixel predicted as 0 is now predicted as class 3, which has no target pixel
    m = metrics_from_confusion(confusion_matrix(pred, TARGET, num_classes=4))
    assert m.per_class_iou == pytest.approx([2 / 3, 2 / 3, 0.5, 0.0])  # class 3: I=0, U=1
    assert m.miou == pytest.approx(11 / 24)
    assert math.isnan(m.per_class_acc[3])  # no target pixel of class 3: accuracy undefined, left out of mAcc
    assert m.macc == pytest.approx(13 / 18)


def test_ignored_pixels_do_not_change_scores():
    target = torch.randint(0, 5, (3, 16, 16))
    target[:, :4] = 255
    pred = torch.randint(0, 5, (3, 16, 16))
    other = pred.clone()
    other[:, :4] = (pred[:, :4] + 1) % 5
    assert torch.equal(confusion_matrix(pred, target, 5), confusion_matrix(other, target, 5))
    assert confusion_matrix(pred, target, 5).sum() == 3 * 12 * 16


def test_custom_ignore_index_and_batch_shape():
    target = torch.tensor([[[0, 1], [-1, 1]], [[1, 1], [0, -1]]])
    pred = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [0, 0]]])
    m = metrics_from_confusion(confusion_matrix(pred, target, num_classes=2, ignore_index=-1))
    assert m.aacc == pytest.approx(5 / 6)
    assert m.per_class_iou == pytest.approx([2 / 3, 3 / 4])


def test_nothing_to_score_gives_nan():
    m = metrics_from_confusion(confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255), 3))
    assert math.isnan(m.miou) and math.isnan(m.aacc) and math.isnan(m.macc)


@pytest.mark.parametrize(
    ("pred", "target", "num_classes", "error", "match"),
    [
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2, ValueError, "shapes differ"),
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 2, TypeError, "integer"),
        (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), 2, ValueError, "target holds labels outside"),
        (torch.full((2, 2), 5), torch.zeros(2, 2, dtype=torch.long), 2, ValueError, "pred holds classes outside"),
        (torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 0, ValueError, "num_classes"),
    ],
)
def test_bad_input_is_named(pred, target, num_classes, error, match):
    with pytest.raises(error, match=match):
        confusion_matrix(pred, target, num_classes)


def test_non_square_confusion_is_rejected():
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(torch.zeros(3, 4, dtype=torch.long))


def test_torch_backend_needs_no_mmseg():
    m = intersect_and_union(PRED, TARGET, num_classes=4, backend="torch")
    assert m.miou == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="backend"):
        intersect_and_union(PRED, TARGET, num_classes=4, backend="sklearn")


def test_mmseg_backend_agrees_with_confusion_matrix():
    pytest.importorskip("mmseg")
    g = torch.Generator().manual_seed(0)
    num_classes = 7
    target = torch.randint(0, 5, (4, 40, 48), generator=g)  # classes 5 and 6 never in the target
    pred = torch.randint(0, 6, (4, 40, 48), generator=g)  # class 5 predicted only (IoU 0); class 6 nowhere (NaN)
    target[torch.rand(target.shape, generator=g) < 0.15] = 255
    ref = intersect_and_union(pred, target, num_classes, backend="mmseg")
    ours = intersect_and_union(pred, target, num_classes, backend="torch")
    torch.testing.assert_close(torch.tensor(ours.per_class_iou), torch.tensor(ref.per_class_iou), equal_nan=True)
    torch.testing.assert_close(torch.tensor(ours.per_class_acc), torch.tensor(ref.per_class_acc), equal_nan=True)
    assert math.isnan(ref.per_class_iou[6]) and ref.per_class_iou[5] == 0.0
    assert ours.miou == pytest.approx(ref.miou, abs=1e-7)
    assert ours.aacc == pytest.approx(ref.aacc, abs=1e-7)
    assert ours.macc == pytest.approx(ref.macc, abs=1e-7)
    assert intersect_and_union(pred, target, num_classes, backend="auto").miou == pytest.approx(ref.miou, abs=1e-7)
    # The hand-made mask gives the same numbers through mmseg too.
    assert intersect_and_union(PRED, TARGET, 4, backend="mmseg").miou == pytest.approx(5 / 9, abs=1e-7)


def test_shim_lets_mmseg_models_import():
    pytest.importorskip("mmseg")
    from glare.eval.mmseg_shim import install_mmcv_ops_shim

    shimmed = install_mmcv_ops_shim()
    assert install_mmcv_ops_shim() == shimmed  # idempotent
    import mmcv.ops
    from mmseg.models.decode_heads import FCNHead

    head = FCNHead(in_channels=8, channels=8, num_classes=3, num_convs=1, concat_input=False)
    assert head([torch.randn(2, 8, 4, 4)]).shape == (2, 3, 4, 4)
    coords = torch.full((1, 1, 2), 0.5)  # the centre of a 2x2 map: the mean of its 4 values
    assert mmcv.ops.point_sample(torch.arange(4.0).view(1, 1, 2, 2), coords).item() == pytest.approx(1.5)
    if shimmed:
        with pytest.raises(NotImplementedError, match="compiled mmcv"):
            mmcv.ops.sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))
