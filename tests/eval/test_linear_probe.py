"""The fast linear probe: learns what the features encode, not what they don't; deterministic; honest."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glare.eval.linear_probe import ProbeResult, _Upsample, extract_features, linear_probe

NUM_CLASSES = 4
SIZE, BLOCK = 32, 8
# Affinely independent colours, so a linear head on the mean colour of a patch can separate all four.
PALETTE = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 230]])


def colour_coded(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose 8x8 blocks are painted with their class colour plus noise, and the label maps."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, NUM_CLASSES, (n, SIZE // BLOCK, SIZE // BLOCK), generator=g)
    labels = blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    images = PALETTE[labels].permute(0, 3, 1, 2).float() + 12 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Stride-4 'patch features': the mean colour of each 4x4 patch, (B, 3, 8, 8)."""
    return F.avg_pool2d(x, 4)


TRAIN, VAL = colour_coded(32, seed=1), colour_coded(12, seed=2)
FAST = dict(steps=100, lr=1e-2)  # enough on this easy task; the defaults are exercised in the first test


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds sync cost, which explodes on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_probe_learns_features_that_encode_the_label():
    result = linear_probe(mean_colour, TRAIN, VAL, NUM_CLASSES, class_names=["red", "green", "blue", "white"])
    assert result.miou > 0.9
    assert result.aacc > 0.95
    assert result.feature_dim == 3 and result.steps == 300
    assert len(result.per_class_iou) == NUM_CLASSES and min(result.per_class_iou) > 0.8
    assert int(result.confusion.sum()) == 12 * SIZE * SIZE  # every val pixel scored, at label resolution
    assert 0 < result.feature_seconds < result.seconds
    table = result.table()
    assert "white" in table and "mIoU" in table and f"{100 * result.miou:.2f}" in table
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["miou"] == result.miou and "confusion" not in summary


def test_noise_features_stay_near_chance():
    g = torch.Generator().manual_seed(0)

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), 8, 8, 8, generator=g)

    result = linear_probe(noise, TRAIN, VAL, NUM_CLASSES, **FAST)
    # Uniformly random predictions over 4 balanced classes give IoU about 1/7 per class, aAcc about 1/4.
    assert result.miou < 0.2
    assert result.aacc < 0.35


def test_same_seed_same_number_and_global_rng_untouched():
    rng_state = torch.random.get_rng_state()
    a = linear_probe(mean_colour, TRAIN, VAL, NUM_CLASSES, steps=40, seed=3)
    b = linear_probe(mean_colour, TRAIN, VAL, NUM_CLASSES, steps=40, seed=3)
    c = linear_probe(mean_colour, TRAIN, VAL, NUM_CLASSES, steps=40, seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert (a.miou, a.per_class_iou, a.train_loss) == (b.miou, b.per_class_iou, b.train_loss)
    assert torch.equal(a.confusion, b.confusion)
    assert a.train_loss != c.train_loss  # the seed drives the initialisation and batch order


def test_ignored_pixels_neither_train_nor_score():
    g = torch.Generator().manual_seed(5)
    # Train: the left half of every image is random colours labelled ignore; the probe must still learn.
    train_images, train_labels = TRAIN[0].clone(), TRAIN[1].clone()
    train_images[..., : SIZE // 2] = torch.randint(0, 256, (32, 3, SIZE, SIZE // 2), generator=g, dtype=torch.uint8)
    train_labels[..., : SIZE // 2] = 255
    # Val: the top half of every image is random colours; ignored in one copy, labelled class 0 in the other.
    val_images, val_labels = VAL[0].clone(), VAL[1].clone()
    val_images[:, :, : SIZE // 2] = torch.randint(0, 256, (12, 3, SIZE // 2, SIZE), generator=g, dtype=torch.uint8)
    val_labels[:, : SIZE // 2] = 255
    garbage_as_zero = val_labels.clone()
    garbage_as_zero[:, : SIZE // 2] = 0

    ignored = linear_probe(mean_colour, (train_images, train_labels), (val_images, val_labels), NUM_CLASSES, **FAST)
    counted = linear_probe(
        mean_colour, (train_images, train_labels), (val_images, garbage_as_zero), NUM_CLASSES, **FAST
    )
    assert ignored.miou > 0.9 and ignored.aacc > 0.95
    assert int(ignored.confusion.sum()) == 12 * SIZE * SIZE // 2
    assert counted.aacc < ignored.aacc - 0.2  # the same predictions, scored on the garbage, do much worse
    # Identical heads (same train set and seed): the counted run scores exactly the ignored pixels on top.
    extra = counted.confusion - ignored.confusion
    assert int(extra[0].sum()) == 12 * SIZE * SIZE // 2 and int(extra[1:].abs().sum()) == 0


def test_labels_at_another_resolution_than_images():
    half = (TRAIN[0], TRAIN[1][:, ::2, ::2].contiguous()), (VAL[0], VAL[1][:, ::2, ::2].contiguous())
    result = linear_probe(mean_colour, *half, NUM_CLASSES, **FAST)
    assert int(result.confusion.sum()) == 12 * (SIZE // 2) ** 2
    assert result.miou > 0.9


def test_matmul_upsampling_equals_bilinear_interpolate():
    x = torch.randn(2, 5, 7, 9)
    expected = F.interpolate(x, size=(30, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(_Upsample((7, 9), (30, 20))(x), expected, atol=1e-5, rtol=1e-5)


def test_module_feature_fn_runs_in_eval_mode_and_is_restored():
    class Pool(nn.Module):
        modes: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.modes.append(self.training)
            return mean_colour(x)

    pool = Pool().train()
    feats = extract_features(pool, TRAIN[0], batch_size=10)
    assert feats.shape == (32, 3, 8, 8) and feats.dtype == torch.float32
    assert pool.modes == [False] * 4 and pool.training
    torch.testing.assert_close(feats, mean_colour(TRAIN[0].float() / 255))


def _bad(kind: str):
    images, labels = TRAIN
    if kind == "float images":
        return dict(train=(images.float(), labels))
    if kind == "label range":
        return dict(train=(images, torch.full_like(labels, 9)))
    if kind == "label count":
        return dict(train=(images, labels[:5]))
    if kind == "names":
        return dict(class_names=["a", "b"])
    if kind == "3-d features":
        return dict(feature_fn=lambda x: x.mean(1))
    if kind == "nan features":
        return dict(feature_fn=lambda x: mean_colour(x) * float("nan"))
    return dict(steps=0)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("float images", "train images must be uint8"),
        ("label range", r"outside \[0, 4\).*\[9\]"),
        ("label count", "train labels must be int64"),
        ("names", "class_names has 2 entries"),
        ("3-d features", "4-d tensor"),
        ("nan features", "non-finite"),
        ("steps", "must be >= 1"),
    ],
)
def test_bad_input_is_named(kind, match):
    kwargs = dict(feature_fn=mean_colour, train=TRAIN, val=VAL, num_classes=NUM_CLASSES, steps=2) | _bad(kind)
    with pytest.raises(ValueError, match=match):
        linear_probe(**kwargs)


def test_result_table_marks_absent_classes():
    result = ProbeResult(
        miou=0.5,
        aacc=0.75,
        macc=0.6,
        per_class_iou=[0.5, float("nan")],
        class_names=["road", "sky"],
        steps=1,
        feature_dim=2,
        seconds=0.1,
        feature_seconds=0.0,
        train_loss=1.0,
        confusion=torch.zeros(2, 2, dtype=torch.long),
    )
    assert result.table().splitlines()[3].split() == ["sky", "n/a"]
    assert result.to_dict()["per_class_iou"] == [0.5, None]
