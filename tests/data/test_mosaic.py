"""The embedded real-texture mosaic: determinism, exact labels, disjoint train/val sources, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glare.config import MosaicConfig
from glare.data.mosaic import (
    MAX_CLASSES,
    class_names,
    class_texture,
    ensure_mosaic,
    generate_mosaic,
    mosaic_root,
)
from glare.data.segmentation import open_segmentation


def _codes(rgb: np.ndarray) -> np.ndarray:
    """One int per RGB colour, to compare colour sets."""
    rgb = rgb.reshape(-1, 3).astype(np.int64)
    return rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]


def test_shapes_dtypes_and_label_range() -> None:
    images, labels = generate_mosaic(num_classes=6, image_size=40, n=5, seed=0, split="train")
    assert images.shape == (5, 40, 40, 3) and images.dtype == np.uint8
    assert labels.shape == (5, 40, 40) and labels.dtype == np.uint8
    assert labels.max() < 6
    assert all(len(np.unique(lb)) >= 2 for lb in labels)  # every image is a real segmentation problem


def test_same_seed_same_bytes_other_seed_or_split_differs() -> None:
    a = generate_mosaic(5, 32, 3, seed=7, split="train")
    b = generate_mosaic(5, 32, 3, seed=7, split="train")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], generate_mosaic(5, 32, 3, seed=8, split="train")[1])
    assert not np.array_equal(a[1], generate_mosaic(5, 32, 3, seed=7, split="val")[1])
    # Image i depends on (seed, split, i) only: a shorter draw is a prefix of a longer one.
    shorter = generate_mosaic(5, 32, 2, seed=7, split="train")
    assert np.array_equal(shorter[0], a[0][:2]) and np.array_equal(shorter[1], a[1][:2])


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_are_exact_every_pixel_comes_from_its_class_texture(split: str) -> None:
    k, size = 8, 48
    images, labels = generate_mosaic(k, size, 6, seed=3, split=split)
    present = np.unique(labels)
    assert len(present) >= 5
    for c in present:
        pixels = _codes(images[labels == c])
        own = np.isin(pixels, _codes(class_texture(int(c), size, split)))
        assert own.all(), f"class {c}: {np.count_nonzero(~own)} pixels not from its texture"
    # The check can fail: pixels of brick (0) are mostly absent from grass's (1) texture.
    brick = _codes(images[labels == 0]) if (labels == 0).any() else _codes(class_texture(0, size, split))
    assert np.isin(brick, _codes(class_texture(1, size, split))).mean() < 0.2


def test_class_colour_statistics_differ_between_classes() -> None:
    images, labels = generate_mosaic(10, 64, 20, seed=0, split="train")
    means = np.stack([images[labels == c].mean(0) for c in range(10)])
    # Tinted grey textures get their own mean colours: brick is red, grass green, moon-like tints differ.
    assert means[0, 0] > means[0, 1] + 40  # brick: red > green
    assert means[1, 1] > means[1, 0] + 30  # grass: green > red
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(10, 1)]
    assert gaps.min() > 5


def test_train_and_val_use_disjoint_halves_of_the_sources() -> None:
    for c in range(12):
        train, val = class_texture(c, 64, "train"), class_texture(c, 64, "val")
        assert train.shape != val.shape or not np.array_equal(train, val)
    assert np.array_equal(class_texture(2, 64, "unlabelled"), class_texture(2, 64, "train"))


def test_class_names_and_bad_arguments() -> None:
    names = class_names(10)
    assert len(names) == len(set(names)) == 10 and names[:3] == ["brick", "grass", "gravel"]
    assert class_names(13)[12] == "brick_1" and len(set(class_names(MAX_CLASSES))) == MAX_CLASSES
    for bad in (1, MAX_CLASSES + 1):
        with pytest.raises(ValueError, match="num_classes"):
            class_names(bad)
    with pytest.raises(ValueError, match="split"):
        generate_mosaic(4, 32, 1, 0, split="test")
    with pytest.raises(ValueError, match="image_size"):
        generate_mosaic(4, 4, 1, 0)


def test_more_classes_than_sources_use_permuted_colours() -> None:
    images, labels = generate_mosaic(30, 32, 6, seed=1, split="train")
    assert labels.max() < 30 and labels.max() >= 12
    base, variant = class_texture(0, 32, "train"), class_texture(12, 32, "train")
    assert np.array_equal(variant, base[..., [0, 2, 1]])


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ensure_mosaic_writes_once_and_reuses(tmp_path: Path) -> None:
    cfg = MosaicConfig(num_classes=4, image_size=32, train=3, val=2, unlabelled=2, seed=5, cache_dir=str(tmp_path))
    root = ensure_mosaic(cfg)
    assert root == mosaic_root(cfg) and root.parent == tmp_path
    assert sorted(p.name for p in (root / "train" / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert len(list((root / "val" / "masks").glob("*.png"))) == 2
    assert len(list((root / "unlabelled").glob("*.png"))) == 2
    meta = json.loads((root / "classes.json").read_text())
    assert meta["classes"] == class_names(4) and meta["counts"] == {"train": 3, "val": 2, "unlabelled": 2}
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind

    # Files round-trip exactly.
    images, labels = generate_mosaic(4, 32, 2, seed=5, split="val")
    assert np.array_equal(np.asarray(Image.open(root / "val" / "images" / "00001.png")), images[1])
    assert np.array_equal(np.asarray(Image.open(root / "val" / "masks" / "00001.png")), labels[1])
    unlabelled, _ = generate_mosaic(4, 32, 2, seed=5, split="unlabelled")
    assert np.array_equal(np.asarray(Image.open(root / "unlabelled" / "00001.png")), unlabelled[1])

    before = _mtimes(root)
    assert ensure_mosaic(cfg) == root and _mtimes(root) == before  # reused, not rewritten

    # Other settings, other folder.
    assert ensure_mosaic(MosaicConfig(num_classes=4, image_size=32, train=3, val=2, unlabelled=2, seed=6,
                                      cache_dir=str(tmp_path))) != root


def test_ensure_mosaic_regenerates_an_incomplete_set(tmp_path: Path) -> None:
    cfg = MosaicConfig(num_classes=3, image_size=16, train=2, val=1, unlabelled=1, cache_dir=str(tmp_path))
    root = ensure_mosaic(cfg)
    (root / "train" / "masks" / "00001.png").unlink()
    assert ensure_mosaic(cfg) == root
    assert (root / "train" / "masks" / "00001.png").is_file()
    # A half-written set (e.g. a crash before classes.json) is not taken as complete.
    (root / "classes.json").unlink()
    ensure_mosaic(cfg)
    assert json.loads((root / "classes.json").read_text())["counts"]["train"] == 2


def test_mosaic_tree_reads_as_a_segmentation_set(tmp_path: Path) -> None:
    cfg = MosaicConfig(num_classes=5, image_size=24, train=2, val=3, unlabelled=0, cache_dir=str(tmp_path))
    ds = open_segmentation("mosaic", ensure_mosaic(cfg), "val")
    assert len(ds) == 3 and ds.class_names == class_names(5) and not ds.reduce_zero_label
    image, labels = ds.load(2)
    expected_images, expected_labels = generate_mosaic(5, 24, 3, seed=0, split="val")
    assert np.array_equal(image, expected_images[2]) and np.array_equal(labels, expected_labels[2])
    assert labels.dtype == np.int64
