"""Per-image probe confusions and the paired bootstrap of an mIoU difference."""

import torch

from glare.eval.linear_probe import linear_probe, probe_confusions
from glare.eval.metrics import batched_miou, metrics_from_confusion, paired_miou_difference


def _split(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose red channel tells the class of each 4x4 cell: a linear probe can learn it."""
    labels = torch.randint(3, (n, 4, 4), generator=generator)
    red = (labels * 100).to(torch.uint8).repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = torch.stack([red, torch.zeros_like(red), torch.zeros_like(red)], 1)
    return images, labels.repeat_interleave(4, 1).repeat_interleave(4, 2)


def _cells(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, 4)


def test_per_image_confusions_add_up_to_the_probe_of_the_same_seed() -> None:
    g = torch.Generator().manual_seed(0)
    train, val = _split(12, g), _split(6, g)
    cms = probe_confusions(_cells, train, val, 3, seeds=[0, 5], steps=20)
    assert cms.shape == (2, 6, 3, 3)
    for k, seed in enumerate([0, 5]):
        whole = linear_probe(_cells, train, val, 3, steps=20, seed=seed).confusion
        assert torch.equal(cms[k].sum(0), whole)
        assert batched_miou(cms[k].sum(0)).item() == metrics_from_confusion(whole).miou


def _confusions(correct: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """(1, n, 2, 2) per-image matrices of a model that labels about ``correct`` of 100 pixels per class right."""
    hits = torch.binomial(torch.full((n, 2), 100.0), torch.full((n, 2), correct), generator=generator).long()
    cms = torch.zeros(1, n, 2, 2, dtype=torch.long)
    cms[0, :, 0, 0], cms[0, :, 0, 1] = hits[:, 0], 100 - hits[:, 0]
    cms[0, :, 1, 1], cms[0, :, 1, 0] = hits[:, 1], 100 - hits[:, 1]
    return cms


def test_a_model_against_itself_differs_by_nothing() -> None:
    cms = _confusions(0.7, 20, torch.Generator().manual_seed(1))
    assert paired_miou_difference(cms, cms.clone(), resamples=200) == (0.0, 0.0, 0.0)


def test_the_interval_holds_a_real_difference_and_narrows_with_more_images() -> None:
    g = torch.Generator().manual_seed(2)
    widths = []
    for n in (10, 160):
        better, worse = _confusions(0.8, n, g), _confusions(0.7, n, g)
        diff, low, high = paired_miou_difference(better, worse, resamples=500)
        assert low < diff < high and low > 0  # about 0.14 mIoU apart, and the interval says so
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the images: about a quarter of the width
