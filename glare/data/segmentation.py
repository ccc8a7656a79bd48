"""Labelled segmentation sets for evaluation, read from the layouts mmsegmentation documents.

Every reader returns a :class:`SegmentationSet`: a list of (image, mask) file
pairs plus class names. Labels use the ignore index 255 throughout; sets whose
masks use 0 for "unlabelled" (ADE20k, Pascal Context 59, LoveDA) are read with
``reduce_zero_label`` (0 -> 255, k -> k-1), as mmsegmentation does.

Layouts (``root`` may also be the folder above the named one):

- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``
- ``cityscapes``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 train ids)
- ``pascal_context``: ``VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}`` listed by
  ``ImageSets/SegmentationContext/<split>.txt`` (59 classes)
- ``loveda``: ``{img_dir,ann_dir}/<split>/*.png`` (7 classes)
- ``voc``: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass}`` listed by
  ``ImageSets/Segmentation/<split>.txt`` (21 classes)
- ``generic``: ``<split>/{images,masks}`` or ``{images,masks}/<split>``, paired by file
  stem, ``num_classes`` given
- ``mosaic``: the tree written by :func:`glare.data.mosaic.ensure_mosaic`
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from glare.data.sources import IMAGE_EXTENSIONS, DataError  # defined without torch, for the driver's preflight

IGNORE_INDEX = 255

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agricultural")


@dataclass
class SegmentationSet:
    """(image, mask) file pairs of one split and how to read their labels."""

    pairs: list[tuple[Path, Path]]
    class_names: list[str]
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i`` as (H, W, 3) uint8 RGB and (H, W) int64 labels in ``[0, num_classes)`` or ignore.

        Raises:
            DataError: unreadable files, a mask that is not one channel or not the
                image's size, or label values outside the class range.
        """
        image_path, mask_path = self.pairs[i]
        image = np.asarray(_open(image_path).convert("RGB"))
        mask = np.asarray(_open(mask_path))
        if mask.ndim != 2:
            raise DataError(f"{mask_path}: mask has shape {mask.shape}; expected a single-channel label map")
        if mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask size {mask.shape} differs from image {image_path} {image.shape[:2]}")
        labels = mask.astype(np.int64)
        if self.reduce_zero_label:
            labels = np.where((labels == 0) | (labels == self.ignore_index), self.ignore_index, labels - 1)
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            values = np.unique(mask[bad])[:10].tolist()
            n = self.num_classes
            valid = f"[1, {n}] (0 is unlabelled)" if self.reduce_zero_label else f"[0, {n})"
            raise DataError(f"{mask_path}: label values {values} outside {valid} and not the ignore index "
                            f"{self.ignore_index}")
        return image, labels


def _open(path: Path) -> Image.Image:
    """Open and decode an image file, turning PIL's errors into a DataError naming the file."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return img


def _fit(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop to ``size`` x ``size`` (PIL's ImageOps.fit)."""
    return np.asarray(ImageOps.fit(Image.fromarray(array), (size, size), method=resample))


def load_arrays(ds: SegmentationSet, size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (the first ``limit``) items at one square size for the linear probe.

    Images are resized bilinearly (short side to ``size``, centre crop); masks get
    the same geometry with nearest-neighbour sampling so labels stay exact.

    Returns:
        images (N, 3, S, S) uint8 and labels (N, S, S) int64.
    """
    n = len(ds) if limit is None else min(limit, len(ds))

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = ds.load(i)
        # Labels fit uint8: classes < 255 is checked when the set is opened.
        return _fit(image, size, Image.Resampling.BILINEAR), _fit(labels.astype(np.uint8), size,
                                                                 Image.Resampling.NEAREST)

    # Threads: PIL releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        items = list(pool.map(one, range(n)))
    images = np.stack([im for im, _ in items]) if items else np.empty((0, size, size, 3), np.uint8)
    labels = np.stack([lb for _, lb in items]) if items else np.empty((0, size, size), np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


# ----------------------------------------------------------------------------- readers


def _descend(root: Path, *subdirs: str) -> Path:
    """Accept the dataset folder itself or a folder above it (e.g. ``data/`` holding ``VOCdevkit/VOC2012``)."""
    for sub in subdirs:
        if (root / sub).is_dir():
            return root / sub
    return root


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        hint = f" (found: {', '.join(siblings)})" if siblings else ""
        raise DataError(f"{what} folder not found: {path}{hint}")
    return path


def _scan(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files under ``folder`` (recursively) ending in one of ``suffixes``, keyed by relative path minus suffix."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        name = path.name.lower()
        suffix = next((s for s in suffixes if name.endswith(s.lower())), None)
        if suffix is None or not path.is_file():
            continue
        key = str(path.relative_to(folder))[: -len(suffix)]
        if key in found:
            raise DataError(f"two files share the name {key!r}: {found[key]} and {path}")
        found[key] = path
    return found


def _pair(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """Match images and masks by key; every image needs a mask and vice versa."""
    lonely_images = sorted(images.keys() - masks.keys())
    lonely_masks = sorted(masks.keys() - images.keys())
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            names = ", ".join(str(images[k]) for k in lonely_images[:5])
            parts.append(f"{len(lonely_images)} image(s) without a mask in {mask_dir}: {names}")
        if lonely_masks:
            names = ", ".join(str(masks[k]) for k in lonely_masks[:5])
            parts.append(f"{len(lonely_masks)} mask(s) without an image in {image_dir}: {names}")
        raise DataError("; ".join(parts))
    return [(images[k], masks[k]) for k in sorted(images)]


def _folder_pairs(image_dir: Path, mask_dir: Path, image_suffixes: tuple[str, ...],
                  mask_suffixes: tuple[str, ...]) -> list[tuple[Path, Path]]:
    images = _scan(_require_dir(image_dir, "image"), image_suffixes)
    masks = _scan(_require_dir(mask_dir, "mask"), mask_suffixes)
    return _pair(images, masks, image_dir, mask_dir)


def _listed_pairs(root: Path, list_file: Path, image_dir: str, mask_dir: str) -> list[tuple[Path, Path]]:
    """VOC-style pairs: ids listed in a text file, ``<image_dir>/<id>.jpg`` + ``<mask_dir>/<id>.png``."""
    if not list_file.is_file():
        raise DataError(f"split list not found: {list_file}")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    pairs = [(root / image_dir / f"{i}.jpg", root / mask_dir / f"{i}.png") for i in ids]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {list_file} are missing: {', '.join(missing[:5])}")
    return pairs


def _ade20k(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    root = _descend(root, "ADEChallengeData2016")
    sub = {"train": "training", "val": "validation"}.get(split, split)
    pairs = _folder_pairs(root / "images" / sub, root / "annotations" / sub, (".jpg",), (".png",))
    # Names are not shipped with the images; numbered names keep this reader free of mmseg.
    return pairs, [f"class_{i}" for i in range(150)], True


def _cityscapes(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    root = _descend(root, "cityscapes")
    pairs = _folder_pairs(root / "leftImg8bit" / split, root / "gtFine" / split,
                          ("_leftImg8bit.png",), ("_gtFine_labelTrainIds.png",))
    return pairs, list(CITYSCAPES_CLASSES), False


def _pascal_context(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    root = _descend(root, "VOCdevkit/VOC2010", "VOC2010")
    list_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    pairs = _listed_pairs(root, list_file, "JPEGImages", "SegmentationClassContext")
    return pairs, [f"class_{i}" for i in range(59)], True


def _loveda(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    root = _descend(root, "loveDA", "LoveDA")
    pairs = _folder_pairs(root / "img_dir" / split, root / "ann_dir" / split, (".png",), (".png",))
    return pairs, list(LOVEDA_CLASSES), True


def _voc(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    root = _descend(root, "VOCdevkit/VOC2012", "VOC2012")
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    return _listed_pairs(root, list_file, "JPEGImages", "SegmentationClass"), list(VOC_CLASSES), False


def _generic(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    image_dir, mask_dir = root / split / "images", root / split / "masks"
    if not image_dir.is_dir():
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
    if not image_dir.is_dir():
        raise DataError(f"no {root}/{split}/images nor {root}/images/{split} folder for split {split!r}")
    return _folder_pairs(image_dir, mask_dir, IMAGE_EXTENSIONS, (".png",)), [], False


def _mosaic(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    meta_file = root / "classes.json"
    try:
        names = list(json.loads(meta_file.read_text())["classes"])
    except (OSError, ValueError, KeyError) as err:
        hint = "make one with glare.data.mosaic.ensure_mosaic"
        raise DataError(f"{meta_file}: not a mosaic set ({err}); {hint}") from None
    if split not in ("train", "val"):
        raise DataError(f"mosaic split {split!r} has no labels; use 'train' or 'val'")
    pairs = _folder_pairs(root / split / "images", root / split / "masks", (".png",), (".png",))
    return pairs, names, False


_READERS: dict[str, Callable[[Path, str], tuple[list[tuple[Path, Path]], list[str], bool]]] = {
    "ade20k": _ade20k,
    "cityscapes": _cityscapes,
    "pascal_context": _pascal_context,
    "loveda": _loveda,
    "voc": _voc,
    "generic": _generic,
    "mosaic": _mosaic,
}
FORMATS = tuple(_READERS)


def open_segmentation(fmt: str, root: str | Path, split: str, num_classes: int | None = None) -> SegmentationSet:
    """Open one split of a labelled set.

    Args:
        fmt: one of :data:`FORMATS`.
        root: the data set folder (or the folder above the one the layout names).
        split: ``train`` / ``val`` (ADE20k's ``training`` / ``validation`` are accepted too).
        num_classes: required for ``generic``; for the others it must match the format if given.

    Raises:
        DataError: unknown format, missing root or split, unpaired files, an empty split,
            or a class count that does not fit the format or the ignore index.
    """
    if fmt not in _READERS:
        raise DataError(f"unknown segmentation format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{fmt} root not found: {root}")
    pairs, names, reduce_zero_label = _READERS[fmt](root, split)
    if fmt == "generic":
        if num_classes is None:
            raise DataError("the generic format needs num_classes")
        names = [f"class_{i}" for i in range(num_classes)]
    elif num_classes is not None and num_classes != len(names):
        raise DataError(f"{fmt} has {len(names)} classes, but num_classes={num_classes} was given")
    if not 1 <= len(names) < IGNORE_INDEX:
        raise DataError(f"num_classes must be in [1, {IGNORE_INDEX}) so labels stay below the ignore index, "
                        f"got {len(names)}")
    if not pairs:
        raise DataError(f"{fmt} split {split!r} under {root} is empty")
    return SegmentationSet(pairs, names, IGNORE_INDEX, reduce_zero_label)
