"""Readers for the labelled layouts, on tiny trees written in each exact layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glare.data.segmentation import FORMATS, DataError, SegmentationSet, load_arrays, open_segmentation

H, W = 16, 24


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, values: list[int], palette: bool = False) -> np.ndarray:
    """A mask with one vertical band per value; saved as 'L' or, VOC-style, as a palette PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.repeat(np.asarray(values, np.uint8), -(-W // len(values)))[:W][None].repeat(H, 0)
    img = Image.fromarray(mask)
    if palette:
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)
    return mask


def _bands(labels: np.ndarray) -> list[int]:
    """The band values along a row, in order, without repeats."""
    row = labels[0].tolist()
    return [v for i, v in enumerate(row) if i == 0 or v != row[i - 1]]


# ---------------------------------------------------------------------------- each layout


def test_ade20k_reduces_the_zero_label(tmp_path: Path) -> None:
    ade = tmp_path / "ADEChallengeData2016"
    for i, name in enumerate(["ADE_train_00000001", "ADE_train_00000002"]):
        _image(ade / "images" / "training" / f"{name}.jpg", i)
        _mask(ade / "annotations" / "training" / f"{name}.png", [0, 1, 150, 7])
    _image(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    _mask(ade / "annotations" / "validation" / "ADE_val_00000001.png", [3])

    for root in (tmp_path, ade):  # the data set folder or the folder above it
        ds = open_segmentation("ade20k", root, "train")
        assert len(ds) == 2 and ds.num_classes == 150 and ds.reduce_zero_label
    image, labels = ds.load(1)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and labels.dtype == np.int64
    assert _bands(labels) == [255, 0, 149, 6]
    assert len(open_segmentation("ade20k", tmp_path, "validation")) == 1
    assert _bands(open_segmentation("ade20k", tmp_path, "val").load(0)[1]) == [2]

    _mask(ade / "annotations" / "training" / "ADE_train_00000002.png", [0, 151])
    with pytest.raises(DataError, match=r"ADE_train_00000002.png: label values \[151\] outside \[1, 150\]"):
        ds.load(1)
    with pytest.raises(DataError, match="ade20k has 150 classes, but num_classes=20"):
        open_segmentation("ade20k", tmp_path, "train", num_classes=20)


def test_cityscapes_pairs_by_city_and_frame_and_ignores_other_gt_files(tmp_path: Path) -> None:
    for city, frame in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]:
        _image(tmp_path / "leftImg8bit" / "train" / city / f"{frame}_leftImg8bit.png")
        gt = tmp_path / "gtFine" / "train" / city
        _mask(gt / f"{frame}_gtFine_labelTrainIds.png", [0, 18, 255])
        _mask(gt / f"{frame}_gtFine_labelIds.png", [7, 33, 0])  # the raw ids sit beside the train ids
        _image(gt / f"{frame}_gtFine_color.png")
    ds = open_segmentation("cityscapes", tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and not ds.reduce_zero_label
    assert [p.parent.name for p, _ in ds.pairs] == ["aachen", "bremen"]
    assert ds.pairs[1][1].name == "bremen_000001_000019_gtFine_labelTrainIds.png"
    assert _bands(ds.load(0)[1]) == [0, 18, 255]

    _mask(tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", [19])
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelTrainIds.png: label values \[19\]"):
        ds.load(0)
    with pytest.raises(DataError, match="image folder not found: .*leftImg8bit/val .*found: train"):
        open_segmentation("cityscapes", tmp_path, "val")


def test_pascal_context_59_uses_the_split_list_and_reduces_zero(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    for i, name in enumerate(["2008_000002", "2008_000003", "2008_000007"]):
        _image(voc / "JPEGImages" / f"{name}.jpg", i)
        _mask(voc / "SegmentationClassContext" / f"{name}.png", [0, 1, 59])
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000002\n2008_000007\n")
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000003\n2008_000099\n")

    ds = open_segmentation("pascal_context", tmp_path, "train")
    assert [p.stem for p, _ in ds.pairs] == ["2008_000002", "2008_000007"]
    assert ds.num_classes == 59 and _bands(ds.load(1)[1]) == [255, 0, 58]
    missing = "2 file.* listed in .*val.txt are missing: .*JPEGImages/2008_000099.jpg, .*Context/2008_000099.png"
    with pytest.raises(DataError, match=missing):
        open_segmentation("pascal_context", voc, "val")
    with pytest.raises(DataError, match="split list not found: .*test.txt"):
        open_segmentation("pascal_context", voc, "test")


def test_loveda_reduces_zero_label_to_seven_classes(tmp_path: Path) -> None:
    for i in (1, 2):
        _image(tmp_path / "img_dir" / "train" / f"{i}.png", i)
        _mask(tmp_path / "ann_dir" / "train" / f"{i}.png", [0, 1, 7])
    ds = open_segmentation("loveda", tmp_path, "train")
    assert len(ds) == 2 and ds.class_names[0] == "background" and ds.num_classes == 7
    assert _bands(ds.load(0)[1]) == [255, 0, 6]
    _mask(tmp_path / "ann_dir" / "train" / "2.png", [8])
    with pytest.raises(DataError, match=r"2.png: label values \[8\] outside \[1, 7\]"):
        ds.load(1)


def test_voc_reads_palette_masks_as_class_indices(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    _image(voc / "JPEGImages" / "2007_000032.jpg")
    _mask(voc / "SegmentationClass" / "2007_000032.png", [0, 15, 255, 20], palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")
    ds = open_segmentation("voc", tmp_path, "val")
    assert ds.num_classes == 21 and not ds.reduce_zero_label and ds.class_names[15] == "person"
    assert _bands(ds.load(0)[1]) == [0, 15, 255, 20]
    _mask(voc / "SegmentationClass" / "2007_000032.png", [21], palette=True)
    with pytest.raises(DataError, match=r"label values \[21\] outside \[0, 21\)"):
        ds.load(0)


@pytest.mark.parametrize("layout", ["split_first", "kind_first"])
def test_generic_pairs_by_stem_in_both_layouts(tmp_path: Path, layout: str) -> None:
    def folder(kind: str) -> Path:
        return tmp_path / "val" / kind if layout == "split_first" else tmp_path / kind / "val"

    _image(folder("images") / "b.jpg")
    _image(folder("images") / "a.png")
    _mask(folder("masks") / "a.png", [0, 2])
    _mask(folder("masks") / "b.png", [1, 255])
    ds = open_segmentation("generic", tmp_path, "val", num_classes=3)
    assert [(i.name, m.name) for i, m in ds.pairs] == [("a.png", "a.png"), ("b.jpg", "b.png")]
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    assert _bands(ds.load(1)[1]) == [1, 255]
    with pytest.raises(DataError, match="needs its classes: set data.seg_num_classes or data.seg_class_names"):
        open_segmentation("generic", tmp_path, "val")


# ---------------------------------------------------------------------------- errors


def test_unpaired_files_are_named(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "images" / "a.png")
    _image(tmp_path / "train" / "images" / "lonely.png")
    _mask(tmp_path / "train" / "masks" / "a.png", [0])
    _mask(tmp_path / "train" / "masks" / "orphan.png", [0])
    with pytest.raises(DataError) as err:
        open_segmentation("generic", tmp_path, "train", num_classes=2)
    message = str(err.value)
    assert "1 image(s) without a mask" in message and "lonely.png" in message
    assert "1 mask(s) without an image" in message and "orphan.png" in message


def test_size_mismatch_and_colour_masks_are_rejected_on_load(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "images" / "a.png")
    small = tmp_path / "train" / "masks" / "a.png"
    small.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((H // 2, W), np.uint8)).save(small)
    _image(tmp_path / "train" / "images" / "b.png")
    _image(tmp_path / "train" / "masks" / "b.png")  # an RGB picture where a label map belongs
    ds = open_segmentation("generic", tmp_path, "train", num_classes=2)
    with pytest.raises(DataError, match=r"a.png: mask size \(8, 24\) differs from image .*a.png \(16, 24\)"):
        ds.load(0)
    with pytest.raises(DataError, match="b.png: mask has shape .*single-channel"):
        ds.load(1)


def test_missing_root_empty_split_unknown_format_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ade20k root not found"):
        open_segmentation("ade20k", tmp_path / "nope", "train")
    with pytest.raises(DataError, match="unknown segmentation format 'coco'.*ade20k, cityscapes"):
        open_segmentation("coco", tmp_path, "train")
    (tmp_path / "img_dir" / "val").mkdir(parents=True)
    (tmp_path / "ann_dir" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="loveda split 'val' under .* is empty"):
        open_segmentation("loveda", tmp_path, "val")
    with pytest.raises(DataError, match=r"no .*/test/images nor .*/images/test folder .*\(splits found: none\)"):
        open_segmentation("generic", tmp_path, "test", num_classes=2)
    with pytest.raises(DataError, match="not a mosaic set"):
        open_segmentation("mosaic", tmp_path, "train")
    with pytest.raises(DataError, match="below the ignore index"):
        open_segmentation("generic", _tiny_generic(tmp_path / "g"), "train", num_classes=300)
    bad = SegmentationSet([(tmp_path / "broken.png", tmp_path / "broken.png")], ["x", "y"])
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        bad.load(0)
    assert set(FORMATS) == {"ade20k", "cityscapes", "pascal_context", "loveda", "voc", "generic", "mosaic"}


def _tiny_generic(root: Path) -> Path:
    _image(root / "train" / "images" / "x.png")
    _mask(root / "train" / "masks" / "x.png", [1, 0])
    return root


# ---------------------------------------------------------------------------- load_arrays


def test_load_arrays_resizes_short_side_and_centre_crops_both_alike(tmp_path: Path) -> None:
    _tiny_generic(tmp_path)
    image = np.zeros((H, W, 3), np.uint8)
    image[:, W // 2 :] = 200  # bright right half, the mask's class 0 half
    Image.fromarray(image).save(tmp_path / "train" / "images" / "x.png")
    _image(tmp_path / "train" / "images" / "y.png")
    _mask(tmp_path / "train" / "masks" / "y.png", [255])
    ds = open_segmentation("generic", tmp_path, "train", num_classes=2)

    images, labels = load_arrays(ds, 8)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (2, 8, 8) and labels.dtype == torch.int64
    # 16x24 -> 8x12, centre crop keeps columns 2..9: class 1 in columns 0-3, class 0 in 4-7.
    assert labels[0, :, :4].eq(1).all() and labels[0, :, 4:].eq(0).all()
    assert images[0, :, :, :3].eq(0).all() and images[0, :, :, 5:].eq(200).all()
    assert labels[1].eq(255).all()  # ignore survives resizing

    images, labels = load_arrays(ds, 8, limit=1)
    assert images.shape[0] == labels.shape[0] == 1
    images, labels = load_arrays(ds, 8, limit=0)
    assert images.shape == (0, 3, 8, 8) and labels.shape == (0, 8, 8)
