"""Labelled segmentation sets for evaluation, read from the layouts mmsegmentation documents.

Every reader returns a :class:`SegmentationSet`: a list of (image, mask) file
pairs plus class names. Loaded labels use the ignore index 255 throughout (a set
whose masks mark void pixels with another value is mapped to it); sets whose
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
- ``generic`` (your own set): ``<split>/{images,masks}`` or ``{images,masks}/<split>``, paired
  by file stem (masks are PNGs); the classes come from :func:`generic_class_names`
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
    ignore_index: int = IGNORE_INDEX  # the mask value of void pixels on disk (loaded labels use IGNORE_INDEX)
    reduce_zero_label: bool = False
    hint: str = ""  # what to set when a mask holds labels outside the classes (the config keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i`` as (H, W, 3) uint8 RGB and (H, W) int64 labels in ``[0, num_classes)`` or IGNORE_INDEX.

        Raises:
            DataError: unreadable files, a mask that is not one channel or not the
                image's size, or label values outside the class range.
        """
        image_path, mask_path = self.pairs[i]
        image = np.asarray(_open(image_path).convert("RGB"))
        labels = self.labels(i)
        if labels.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask size {labels.shape} differs from image {image_path} "
                            f"{image.shape[:2]}")
        return image, labels

    def labels(self, i: int) -> np.ndarray:
        """The mask of item ``i`` as (H, W) int64 labels in ``[0, num_classes)`` or IGNORE_INDEX (image unread)."""
        mask_path = self.pairs[i][1]
        mask = np.asarray(_open(mask_path))
        if mask.ndim != 2:
            raise DataError(f"{mask_path}: mask has shape {mask.shape}; expected a single-channel label map")
        mask = mask.astype(np.int64)
        void = mask == self.ignore_index
        if self.reduce_zero_label:
            void |= mask == 0
        labels = np.where(void, IGNORE_INDEX, mask - int(self.reduce_zero_label))
        bad = ~void & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            values = np.unique(mask[bad])[:10].tolist()
            n = self.num_classes
            valid = f"[1, {n}] (0 is unlabelled)" if self.reduce_zero_label else f"[0, {n})"
            hint = f"; {self.hint}" if self.hint else ""
            raise DataError(f"{mask_path}: label values {values} outside {valid} and not the ignore index "
                            f"{self.ignore_index}{hint}")
        return labels

    def check_labels(self) -> None:
        """Read every mask (not the images) and raise the first :meth:`labels` error, naming its file."""
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for _ in pool.map(self.labels, range(len(self))):
                pass

    def frame_shape(self, short_side: int, multiple: int = 1, sample: int = 512) -> tuple[int, int]:
        """(H, W) that keeps the set's typical frame: short side ``short_side``, the long side from the median
        aspect ratio of (the first ``sample``) images, rounded to a multiple of ``multiple`` (e.g. the patch size).
        A square set gives (short_side, short_side).
        """
        sizes = [_open_header(image) for image, _ in self.pairs[:sample]]
        aspect = float(np.median([w / h for w, h in sizes])) if sizes else 1.0
        long_side = max(short_side, multiple * round(short_side * max(aspect, 1 / aspect) / multiple))
        return (short_side, long_side) if aspect >= 1 else (long_side, short_side)


def _open(path: Path) -> Image.Image:
    """Open and decode an image file, turning PIL's errors into a DataError naming the file."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return img


def _open_header(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def _fit(array: np.ndarray, size: int | tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """``size`` (an int): short side to ``size``, centre crop to a square (PIL's ImageOps.fit).
    ``(h, w)``: the whole frame resized to exactly h x w.
    """
    img = Image.fromarray(array)
    if isinstance(size, int):
        return np.asarray(ImageOps.fit(img, (size, size), method=resample))
    h, w = size
    return np.asarray(img.resize((w, h), resample=resample))


def load_arrays(ds: SegmentationSet, size: int | tuple[int, int], limit: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (the first ``limit``) items at one size for the linear probe.

    ``size`` an int: short side resized to it and a centre-cropped square kept (a 2:1 frame
    loses half its pixels). ``(h, w)``: every whole frame resized to h x w (see
    :meth:`SegmentationSet.frame_shape`). Images are resized bilinearly; masks get the same
    geometry with nearest-neighbour sampling so labels stay exact.

    Returns:
        images (N, 3, H, W) uint8 and labels (N, H, W) int64.
    """
    n = len(ds) if limit is None else min(limit, len(ds))
    h, w = (size, size) if isinstance(size, int) else size

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = ds.load(i)
        # Labels fit uint8: classes < 255 is checked when the set is opened.
        return _fit(image, size, Image.Resampling.BILINEAR), _fit(labels.astype(np.uint8), size,
                                                                 Image.Resampling.NEAREST)

    # Threads: PIL releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        items = list(pool.map(one, range(n)))
    images = np.stack([im for im, _ in items]) if items else np.empty((0, h, w, 3), np.uint8)
    labels = np.stack([lb for _, lb in items]) if items else np.empty((0, h, w), np.uint8)
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


def generic_splits(root: Path) -> list[str]:
    """The split folders a generic tree holds: ``<split>/images`` or ``images/<split>``."""
    first = [p.name for p in root.iterdir() if (p / "images").is_dir()] if root.is_dir() else []
    second = [p.name for p in (root / "images").iterdir() if p.is_dir()] if (root / "images").is_dir() else []
    return sorted(set(first + second))


def _generic(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str], bool]:
    image_dir, mask_dir = root / split / "images", root / split / "masks"
    if not image_dir.is_dir():
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
    if not image_dir.is_dir():
        found = ", ".join(generic_splits(root)) or "none"
        raise DataError(f"no {root}/{split}/images nor {root}/images/{split} folder for split {split!r} "
                        f"(splits found: {found})")
    return _folder_pairs(image_dir, mask_dir, IMAGE_EXTENSIONS, (".png",)), [], False


CLASS_NAME_FILES = ("classes.txt", "class_names.txt")


def generic_class_names(root: str | Path, num_classes: int = 0, class_names: list[str] | tuple[str, ...] = ()
                        ) -> list[str]:
    """The classes of a generic set: ``class_names``, else the root's classes.txt / class_names.txt
    (one name a line; blank lines and ``#`` comments skipped), else ``num_classes`` numbered names.
    ``num_classes`` (0: unset) must agree with the names when both are given.

    Raises:
        DataError: naming the file or the config key (``data.seg_num_classes``, ``data.seg_class_names``).
    """
    names, origin = list(class_names), "data.seg_class_names"
    if not names:
        files = [Path(root) / f for f in CLASS_NAME_FILES if (Path(root) / f).is_file()]
        if len(files) > 1:
            raise DataError(f"{files[0]} and {files[1]} both name the classes; keep one")
        if files:
            origin = str(files[0])
            try:
                lines = files[0].read_text().splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"{origin}: cannot read the class names ({err})") from None
            names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            if not names:
                raise DataError(f"{origin}: names no classes (one name a line)")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise DataError(f"{origin}: class names must be distinct, repeated: {', '.join(dupes)}")
    if not names:
        if num_classes < 1:
            raise DataError(f"the generic format needs its classes: set data.seg_num_classes or "
                            f"data.seg_class_names, or put a {' or '.join(CLASS_NAME_FILES)} in {root}")
        return [f"class_{i}" for i in range(num_classes)]
    if num_classes and num_classes != len(names):
        raise DataError(f"data.seg_num_classes={num_classes}, but {origin} names {len(names)} classes")
    return names


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


def open_segmentation(fmt: str, root: str | Path, split: str, num_classes: int | None = None, *,
                      class_names: list[str] | tuple[str, ...] = (), ignore_index: int = IGNORE_INDEX,
                      zero_is_void: bool = False, split_key: str = "") -> SegmentationSet:
    """Open one split of a labelled set.

    Args:
        fmt: one of :data:`FORMATS`.
        root: the data set folder (or the folder above the one the layout names).
        split: ``train`` / ``val`` (ADE20k's ``training`` / ``validation`` are accepted too), or
            any split folder of a generic set.
        num_classes: for ``generic``, the class count (or infer it from the names, see
            :func:`generic_class_names`); for the others it must match the format if given.
        class_names: ``generic`` only: the class names (else the root's class-names file).
        ignore_index: ``generic`` only: the mask value of void pixels.
        zero_is_void: ``generic`` only: 0 is void and mask values 1..N are the N classes.
        split_key: the config key that chose ``split``; errors about the split's files start with it.

    Raises:
        DataError: unknown format, missing root or split, unpaired files, an empty split,
            or a class count that does not fit the format or the ignore index.
    """
    if fmt not in _READERS:
        raise DataError(f"unknown segmentation format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{fmt} root not found: {root}")
    where = f"{split_key}={split!r}: " if split_key else ""
    try:
        pairs, names, reduce_zero_label = _READERS[fmt](root, split)
    except DataError as err:
        raise DataError(f"{where}{err}") from None
    if not pairs:
        raise DataError(f"{where}{fmt} split {split!r} under {root} is empty")
    hint = ""
    if fmt == "generic":
        names = generic_class_names(root, num_classes or 0, class_names)
        reduce_zero_label = zero_is_void
        hint = (f"check data.seg_num_classes ({len(names)}), data.seg_ignore_index ({ignore_index}) and "
                f"data.seg_zero_is_void ({str(zero_is_void).lower()})")
    elif num_classes is not None and num_classes != len(names):
        raise DataError(f"{fmt} has {len(names)} classes, but num_classes={num_classes} was given")
    else:
        ignore_index = IGNORE_INDEX
    if not 1 <= len(names) < IGNORE_INDEX:
        raise DataError(f"num_classes must be in [1, {IGNORE_INDEX}) so labels stay below the ignore index, "
                        f"got {len(names)}")
    if fmt == "generic" and (reduce_zero_label and 1 <= ignore_index <= len(names)
                             or not reduce_zero_label and ignore_index < len(names)):
        raise DataError(f"data.seg_ignore_index={ignore_index} is a class value of the {len(names)} classes; "
                        "pick a value no class uses (or set data.seg_zero_is_void)")
    return SegmentationSet(pairs, names, ignore_index, reduce_zero_label, hint)
