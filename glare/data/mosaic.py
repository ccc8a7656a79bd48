"""The embedded default data set: a seeded real-texture mosaic with exact labels.

No segmentation benchmark ships in a package, so GLARE generates its default
labelled set. Each class is a real CC0 texture bundled with scikit-image
(brick, grass, gravel, and texture crops of bundled photos); grey sources are
tinted with a per-class colour so every class has its own colour statistics.
An image is a random Voronoi partition plus 1-4 ellipses or polygons, each
cell filled with one class; the pixels of a class are copied from a window of
that class's texture, so the label map is exact by construction.

Train and val come from disjoint halves of every source texture, so val is
never a copy of train. The unlabelled split (for pre-training) is a separate
draw from the train halves.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from skimage.draw import ellipse, polygon

from glare.config import MosaicConfig

# Bump when the generator changes, so cached sets are regenerated.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "unlabelled")
# Texture windows are cut at this scale: sources are resized by image_size / REFERENCE_SIZE
# so that a mosaic looks the same at every resolution.
REFERENCE_SIZE = 224


@dataclass(frozen=True)
class _Source:
    """One texture source: a bundled scikit-image picture, a crop box, a zoom and an optional tint."""

    name: str
    image: str  # attribute of skimage.data (all of these load offline)
    box: tuple[int, int, int, int] | None = None  # rows r0:r1, cols c0:c1
    tint: tuple[int, int, int] | None = None  # mean RGB given to a grey source
    zoom: float = 1.0  # chosen so each half of the crop covers a 224 px window at a visible texture scale


# Order mixes grey and colour sources so that small K still covers both kinds.
_SOURCES = (
    _Source("brick", "brick", tint=(170, 92, 64)),
    _Source("grass", "grass", tint=(92, 140, 64)),
    _Source("gravel", "gravel", tint=(150, 140, 118)),
    _Source("tissue", "immunohistochemistry"),
    _Source("stars", "hubble_deep_field"),
    _Source("vessels", "retina", box=(260, 1160, 290, 1190), zoom=0.5),
    _Source("cat", "chelsea"),
    _Source("espresso", "coffee"),
    _Source("coins", "coins", tint=(200, 178, 90), zoom=1.2),
    _Source("launchpad", "rocket"),
    _Source("moon", "moon", tint=(118, 128, 172)),
    _Source("suit", "astronaut", box=(256, 512, 0, 512)),
)
# Classes beyond len(_SOURCES) reuse a source with its colour channels permuted.
_PERMUTATIONS = tuple(itertools.permutations(range(3)))
MAX_CLASSES = len(_SOURCES) * len(_PERMUTATIONS)


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"mosaic num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")


def _check_args(num_classes: int, image_size: int, split: str) -> None:
    _check_num_classes(num_classes)
    if image_size < 8:
        raise ValueError(f"mosaic image_size must be >= 8, got {image_size}")
    if split not in SPLITS:
        raise ValueError(f"unknown mosaic split {split!r}, expected one of {SPLITS}")


def class_names(num_classes: int = 10) -> list[str]:
    """Names of the first ``num_classes`` mosaic classes (``brick``, ``grass``, ..., ``brick_1``, ...)."""
    _check_num_classes(num_classes)
    names = []
    for c in range(num_classes):
        variant, src = divmod(c, len(_SOURCES))
        names.append(_SOURCES[src].name + (f"_{variant}" if variant else ""))
    return names


@functools.cache
def _source_rgb(index: int) -> np.ndarray:
    """The (cropped, tinted) RGB uint8 picture of source ``index``."""
    src = _SOURCES[index]
    img = np.asarray(getattr(skimage.data, src.image)())
    if src.box is not None:
        r0, r1, c0, c1 = src.box
        img = img[r0:r1, c0:c1]
    if src.tint is not None:
        grey = img.astype(np.float32)
        # Shift the grey texture to the class colour, keeping its own contrast.
        img = grey[..., None] - grey.mean() + np.asarray(src.tint, np.float32)
    return np.clip(img[..., :3], 0, 255).astype(np.uint8)


@functools.cache
def _texture(class_index: int, image_size: int, split: str) -> np.ndarray:
    """The texture a class's pixels are copied from: one half of its source, at mosaic scale.

    The source is cut in two along its longer side: the first half feeds train and
    unlabelled images, the second half val. Halves smaller than one image are
    mirror-tiled so that any image_size x image_size window fits.
    """
    variant, src = divmod(class_index, len(_SOURCES))
    rgb = _source_rgb(src)[..., list(_PERMUTATIONS[variant])]
    h, w = rgb.shape[:2]
    first = split in ("train", "unlabelled")
    if h >= w:
        half = rgb[: h // 2] if first else rgb[h // 2 :]
    else:
        half = rgb[:, : w // 2] if first else rgb[:, w // 2 :]
    scale = _SOURCES[src].zoom * image_size / REFERENCE_SIZE
    size = (max(1, round(half.shape[1] * scale)), max(1, round(half.shape[0] * scale)))
    half = np.asarray(Image.fromarray(half).resize(size, Image.Resampling.BILINEAR))
    pad_h, pad_w = max(0, image_size - half.shape[0]), max(0, image_size - half.shape[1])
    if pad_h or pad_w:
        half = np.pad(half, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    half.setflags(write=False)  # shared through the cache
    return half


def class_texture(class_index: int, image_size: int, split: str) -> np.ndarray:
    """Read-only RGB uint8 texture that class ``class_index`` draws its pixels from in ``split``."""
    if not 0 <= class_index < MAX_CLASSES:
        raise ValueError(f"mosaic class index must be in [0, {MAX_CLASSES}), got {class_index}")
    _check_args(2, image_size, split)
    return _texture(class_index, image_size, split)


def _label_map(rng: np.random.Generator, num_classes: int, size: int) -> np.ndarray:
    """Random Voronoi cells plus 1-4 ellipses / star-shaped polygons, each with a random class (>= 2 in all)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n_cells = int(rng.integers(5, 13))
    points = rng.uniform(0, size, (n_cells, 2)).astype(np.float32)
    cell_classes = rng.integers(0, num_classes, n_cells)
    # Guarantee two classes even if every shape below lands on one cell.
    cell_classes[1] = (cell_classes[0] + rng.integers(1, num_classes)) % num_classes
    dist = (yy[None] - points[:, 0, None, None]) ** 2 + (xx[None] - points[:, 1, None, None]) ** 2
    labels = cell_classes[dist.argmin(0)].astype(np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(0.08, 0.3) * size
        if rng.random() < 0.5:
            rr, cc = ellipse(cy, cx, radius, radius * rng.uniform(0.4, 1.0), shape=labels.shape,
                             rotation=rng.uniform(-np.pi, np.pi))
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))))
            radii = radius * rng.uniform(0.5, 1.0, angles.size)
            rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=labels.shape)
        labels[rr, cc] = rng.integers(0, num_classes)
    if len(np.unique(labels)) < 2:  # shapes covered every other class (rare): draw again
        return _label_map(rng, num_classes, size)
    return labels


def _render(rng: np.random.Generator, labels: np.ndarray, split: str) -> np.ndarray:
    """Fill each class's pixels from a random window of its texture (random flip / 90-degree turn)."""
    size = labels.shape[0]
    image = np.empty((size, size, 3), np.uint8)
    for c in np.unique(labels):
        tex = _texture(int(c), size, split)
        r0 = int(rng.integers(0, tex.shape[0] - size + 1))
        c0 = int(rng.integers(0, tex.shape[1] - size + 1))
        window = np.rot90(tex[r0 : r0 + size, c0 : c0 + size], k=int(rng.integers(4)))
        if rng.random() < 0.5:
            window = window[:, ::-1]
        where = labels == c
        image[where] = window[where]
    return image


def _draw(num_classes: int, image_size: int, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of a split and its labels; it depends on (seed, split, index) only."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    labels = _label_map(rng, num_classes, image_size)
    return _render(rng, labels, split), labels


def generate_mosaic(
    num_classes: int = 10, image_size: int = 224, n: int = 1, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` mosaic images and their exact label maps.

    Image ``i`` depends only on (seed, split, i), so a larger ``n`` extends a smaller one.

    Returns:
        images (n, H, W, 3) uint8 RGB and labels (n, H, W) uint8 in ``[0, num_classes)``.
    """
    _check_args(num_classes, image_size, split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty((n, image_size, image_size), np.uint8)
    for i in range(n):
        images[i], labels[i] = _draw(num_classes, image_size, seed, split, i)
    return images, labels


def _counts(cfg: MosaicConfig) -> dict[str, int]:
    return {"train": cfg.train, "val": cfg.val, "unlabelled": cfg.unlabelled}


def mosaic_root(cfg: MosaicConfig) -> Path:
    """Where :func:`ensure_mosaic` keeps the set for these settings (a hash of them under the cache dir)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    key = json.dumps({**settings, "version": GENERATOR_VERSION}, sort_keys=True)
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "glare" / "mosaic"
    return base / hashlib.sha256(key.encode()).hexdigest()[:16]


def _expected_files(root: Path, cfg: MosaicConfig) -> dict[Path, int]:
    """Every folder of a complete set and how many PNGs it holds."""
    return {
        root / "train" / "images": cfg.train,
        root / "train" / "masks": cfg.train,
        root / "val" / "images": cfg.val,
        root / "val" / "masks": cfg.val,
        root / "unlabelled": cfg.unlabelled,
    }


def _is_complete(root: Path, cfg: MosaicConfig) -> bool:
    """True when ``root`` holds a readable classes.json and every file it promises."""
    try:
        meta = json.loads((root / "classes.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("counts") != _counts(cfg):
        return False
    return all(d.is_dir() and sum(1 for _ in d.glob("*.png")) == n for d, n in _expected_files(root, cfg).items())


def _write_set(out: Path, cfg: MosaicConfig) -> None:
    """Write every split of the set as PNG files, then classes.json, into ``out``."""
    for folder in _expected_files(out, cfg):
        folder.mkdir(parents=True)
    for split, n in _counts(cfg).items():
        for i in range(n):
            image, labels = _draw(cfg.num_classes, cfg.image_size, cfg.seed, split, i)
            # Low PNG compression: written once, read often; speed matters more than bytes.
            if split == "unlabelled":
                Image.fromarray(image).save(out / split / f"{i:05d}.png", compress_level=1)
            else:
                Image.fromarray(image).save(out / split / "images" / f"{i:05d}.png", compress_level=1)
                Image.fromarray(labels).save(out / split / "masks" / f"{i:05d}.png", compress_level=1)
    meta = {
        "classes": class_names(cfg.num_classes),
        "ignore_index": 255,
        "counts": _counts(cfg),
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "version": GENERATOR_VERSION,
        "sources": "scikit-image bundled pictures (CC0 / public domain)",
    }
    (out / "classes.json").write_text(json.dumps(meta, indent=2))


def ensure_mosaic(cfg: MosaicConfig) -> Path:
    """Generate the mosaic set once and return its root.

    Layout: ``<root>/{train,val}/{images,masks}/NNNNN.png``, ``<root>/unlabelled/NNNNN.png``
    and ``<root>/classes.json``. The set is written into a temporary sibling folder
    and renamed into place, so an interrupted run never leaves a set that looks
    complete; an incomplete one found on disk is regenerated. Concurrent callers
    are safe: the first rename wins and the others discard their copy.
    """
    _check_args(cfg.num_classes, cfg.image_size, "train")
    if min(cfg.train, cfg.val, cfg.unlabelled) < 0:
        raise ValueError(f"mosaic counts must be >= 0, got {_counts(cfg)}")
    root = mosaic_root(cfg)
    if _is_complete(root, cfg):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _write_set(tmp, cfg)
        if root.exists() and not _is_complete(root, cfg):
            shutil.rmtree(root, ignore_errors=True)  # a damaged set (e.g. files deleted by hand)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, cfg):  # lost a race to a writer whose set is now complete?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
