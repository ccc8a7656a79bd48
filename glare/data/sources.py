"""Local pre-training sources, listed and checked without Ray (the driver's preflight uses them too)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from glare.config import MosaicConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GLOB_CHARS = "*?["
# The value of ``data.source`` / ``data.seg_format`` that names the embedded set (glare/data/mosaic.py).
MOSAIC = "mosaic"


class DataError(ValueError):
    """Data that is missing, empty or malformed (the message names the file or folder)."""


def embedded_root(mosaic: MosaicConfig) -> Path:
    """The embedded mosaic set's folder, generated on first use (``data.source=mosaic``, ``data.seg_format=mosaic``)."""
    from glare.data.mosaic import ensure_mosaic  # numpy + scikit-image: only when the set is really used

    return ensure_mosaic(mosaic)


def resolve_pretrain_source(source: str, mosaic: MosaicConfig) -> str:
    """``data.source`` as Ray Data reads it: ``mosaic`` becomes the embedded set's unlabelled folder."""
    return str(embedded_root(mosaic) / "unlabelled") if source == MOSAIC else source


def folder_images(folder: Path) -> list[Path]:
    """The image files (by suffix, :data:`IMAGE_EXTENSIONS`) directly in ``folder``, sorted."""
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())


def read_square_image(path: Path, size: int) -> np.ndarray:
    """An image file as (size, size, 3) uint8 RGB: short side to ``size``, centre crop (bicubic).

    Raises:
        ValueError: naming the file, when it is not a readable image.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            square = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return np.asarray(square).copy()


def local_files(source: str) -> list[Path]:
    """The image files a local folder, glob, .txt list or single image names; DataError if none."""
    path = Path(source).expanduser()
    if any(ch in source for ch in _GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"no files match the pre-training pattern {source!r}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the pre-training folder {path}")
        return files
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        files = [path.parent / ln for ln in lines if ln and not ln.startswith("#")]  # absolute ln wins in `/`
        if not files:
            raise DataError(f"the pre-training list {path} names no images")
        # Missing entries are skipped (and named) while decoding; a list of only missing ones is an error now.
        if not any(f.is_file() for f in files):
            raise DataError(f"none of the {len(files)} files listed in {path} exist (e.g. {files[0]})")
        return files
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [path]
    if not path.exists():
        raise DataError(f"pre-training source not found: {source}")
    raise DataError(f"unsupported pre-training source {source}: expected a folder, a glob, a .txt list, "
                    "a .parquet file or a URI")


def check_parquet(path: Path, column: str) -> int:
    """Row count of a local parquet file whose ``column`` holds encoded images."""
    import pyarrow as pa  # imported here: checking a folder source should not pay for pyarrow
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read parquet {path}: {err}") from None
    if column not in schema.names:
        raise DataError(f"parquet {path} has no column {column!r} (columns: {', '.join(schema.names)}); "
                        "set data.image_column")
    kind = schema.field(column).type
    is_struct_with_bytes = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or is_struct_with_bytes):
        raise DataError(f"parquet {path} column {column!r} has type {kind}; expected encoded image bytes")
    if rows == 0:
        raise DataError(f"parquet {path} has no rows")
    return rows
