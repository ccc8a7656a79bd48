"""Unlabelled pre-training images as a Ray Data dataset of fixed-size uint8 RGB arrays.

:func:`build_pretrain_dataset` turns a source (a folder, a glob, a .txt list, a
.parquet file of encoded images, or any URI Ray Data reads) into rows
``{"image": uint8 (base_size, base_size, 3)}``: decoded, converted to RGB,
short side resized to ``base_size`` and centre-cropped. The views are made
later, on the training device.

Files that cannot be decoded are skipped, logged with ``logging.warning`` and
recorded in a small named Ray actor; :func:`skipped_images` returns them to
the driver, e.g. at the end of a run. A source that is missing or holds no
images raises :class:`DataError` before any training starts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from PIL import Image, ImageOps

from glare.data.sources import IMAGE_EXTENSIONS, DataError, check_parquet, local_files

__all__ = ["DataError", "PretrainData", "build_pretrain_dataset", "decide_materialize", "decode_image",
           "open_pretrain_data", "shuffled_batches", "skipped_images"]

logger = logging.getLogger(__name__)

SKIP_LOG_NAME = "glare_skipped_images"
# Rows per block when the set is large; small sets get at least two blocks per CPU instead.
_ROWS_PER_BLOCK = 64
_SKIP_LOG_HANDLES: list = []


@ray.remote(num_cpus=0)  # bookkeeping only: never hold a CPU that a decode task could use
class _SkipLog:
    """Images skipped while decoding, per source, with the reason (one entry per image across epochs)."""

    def __init__(self) -> None:
        self._skipped: dict[tuple[str, str], str] = {}

    def add(self, source: str, name: str, reason: str) -> bool:
        """Record a skip; True the first time this image is skipped."""
        new = (source, name) not in self._skipped
        self._skipped.setdefault((source, name), reason)
        return new

    def items(self, source: str | None) -> list[tuple[str, str]]:
        return [(name, reason) for (src, name), reason in self._skipped.items() if source in (None, src)]


def skipped_images(source: str | None = None) -> list[tuple[str, str]]:
    """(name, reason) of every image skipped so far in this Ray job, optionally only those of ``source``.

    A name is a file path, or ``<parquet file>#sha1=<digest>`` for a parquet row;
    ``source`` is the string given to :func:`build_pretrain_dataset`.
    """
    if not ray.is_initialized():
        return []
    try:
        log = ray.get_actor(SKIP_LOG_NAME)
    except ValueError:  # no dataset has been built in this job
        return []
    return ray.get(log.items.remote(source))


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to (size, size, 3) uint8 RGB: short side to ``size``, centre crop.

    Raises whatever PIL raises for bytes that are not a readable image.
    """
    with Image.open(io.BytesIO(data)) as img:
        # Let JPEG decode at a reduced scale when the file is much larger than needed.
        img.draft("RGB", (size, size))
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    return np.asarray(ImageOps.fit(rgb, (size, size), method=Image.Resampling.BILINEAR))


_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


def failure_reason(err: BaseException) -> str:
    """``Type: message`` of a decode failure, without object reprs (``<_io.BytesIO object at 0x7f...>``).

    The same file then gives the same reason on every run and every worker.
    """
    return f"{type(err).__name__}: {_ADDRESS.sub('', str(err))}"


def _payload(batch: dict[str, np.ndarray], column: str | None, i: int, rows_are_files: bool) -> tuple[str, bytes]:
    """Name and encoded bytes of row ``i``: read from its path, or taken from ``column``.

    A row of a parquet file has no name of its own: the file's path plus a hash of the bytes names it.
    """
    path = str(batch["path"][i])
    if column is None:
        return path, Path(path).read_bytes()
    value = batch[column][i]
    if isinstance(value, dict):  # Hugging Face-style image struct {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"column {column!r} holds {type(value).__name__}, not encoded image bytes")
    name = path if rows_are_files else f"{path}#sha1={hashlib.sha1(value).hexdigest()[:12]}"
    return name, bytes(value)


def _decode_batch(
    batch: dict[str, np.ndarray], *, size: int, column: str | None, rows_are_files: bool, source: str, skip_log: Any
) -> dict[str, np.ndarray]:
    """Ray Data map: decode a batch, dropping (and recording) rows that fail."""
    images = []
    for i in range(len(batch["path"])):
        name = str(batch["path"][i])
        try:
            name, data = _payload(batch, column, i, rows_are_files)
            images.append(decode_image(data, size))
        except Exception as err:  # any failure on one file (missing, truncated, not an image) skips just that file
            reason = failure_reason(err)
            # Blocking: the record exists once the task is done. Warn once, not every epoch.
            if ray.get(skip_log.add.remote(source, name, reason)):
                logger.warning("skipping image %s: %s", name, reason)
    if not images:
        return {"image": np.empty((0, size, size, 3), np.uint8)}
    return {"image": np.stack(images)}


def _num_blocks(n: int) -> int:
    """Enough blocks to keep every CPU busy on a small set; ~64 rows per block on a large one."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(n, max(2 * cpus, math.ceil(n / _ROWS_PER_BLOCK))))


def _read(source: str, image_column: str) -> tuple[ray.data.Dataset, str | None, bool, int | None]:
    """Encoded images with a ``path`` column.

    Returns the dataset, the column holding the bytes (None: read each row's path),
    whether every row is a whole file (else rows of a parquet file) and the number
    of images (None for a remote source, which is not listed up front).
    """
    if "://" in source:
        # Remote data can be huge: keep Ray's own file-based blocking, no repartition.
        try:
            if source.rstrip("/").endswith(".parquet"):
                ds = ray.data.read_parquet(source, columns=[image_column], include_paths=True)
                return ds, image_column, False, None
            exts = [e.lstrip(".") for e in IMAGE_EXTENSIONS]
            return ray.data.read_binary_files(source, include_paths=True, file_extensions=exts), "bytes", True, None
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read pre-training source {source}: {err}") from None
    path = Path(source).expanduser()
    if path.suffix.lower() == ".parquet":
        if not path.is_file():
            raise DataError(f"pre-training source not found: {source}")
        rows = check_parquet(path, image_column)
        ds = ray.data.read_parquet(str(path), columns=[image_column], include_paths=True)
        return ds.repartition(_num_blocks(rows)), image_column, False, rows
    files = local_files(source)
    items = [{"path": str(p)} for p in files]
    return ray.data.from_items(items, override_num_blocks=_num_blocks(len(items))), None, True, len(items)


# "auto" materialises a set only if its decoded rows take at most this share of the object store: the rest
# is left for the blocks in flight (the iterator's prefetch, the train workers' batches).
STORE_FRACTION = 0.5


@dataclass
class PretrainData:
    """The pre-training dataset and how it is held (what the run's data summary line reports)."""

    dataset: ray.data.Dataset
    num_images: int | None  # files or parquet rows found (None: a remote source, not listed up front)
    materialized: bool
    reason: str  # why it is materialised or streamed, for the summary line

    def summary(self) -> str:
        """One line: how many images and whether they are materialised or streamed, and why."""
        count = "an unlisted number of" if self.num_images is None else f"{self.num_images}"
        how = "materialised" if self.materialized else "streamed"
        return f"{count} unlabelled images, {how} ({self.reason})"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def decide_materialize(mode: str | bool, num_images: int | None, base_size: int, store_bytes: float | None,
                       fraction: float = STORE_FRACTION) -> tuple[bool, str]:
    """Whether to keep the decoded set in the object store, and why (for the data summary line).

    ``mode`` ``true``/``false`` decides by itself; ``auto`` materialises when the decoded size,
    ``num_images`` x ``base_size``^2 x 3 bytes, fits in ``fraction`` of the object store
    (``store_bytes``), and streams a set whose size or store is unknown.
    """
    mode = str(mode).lower()
    if mode not in ("auto", "true", "false"):
        raise DataError(f"data.materialize must be 'auto', 'true' or 'false', got {mode!r}")
    if mode != "auto":
        return mode == "true", f"data.materialize={mode}"
    if num_images is None:
        return False, "data.materialize=auto: a remote source's size is not known up front"
    if not store_bytes:
        return False, "data.materialize=auto: the object store's size is unknown"
    need, room = num_images * base_size * base_size * 3, fraction * store_bytes
    verdict = "fits in" if need <= room else "exceeds"
    return need <= room, (f"data.materialize=auto: {_gb(need)} decoded {verdict} {fraction:.0%} of the "
                          f"{_gb(store_bytes)} object store")


def object_store_bytes() -> float | None:
    """The object store memory Ray reports as available now (else the cluster's total), in bytes."""
    return ray.available_resources().get("object_store_memory") or ray.cluster_resources().get("object_store_memory")


def build_pretrain_dataset(
    source: str, base_size: int, image_column: str = "image", materialize: bool | str = False
) -> ray.data.Dataset:
    """Unlabelled images as rows ``{"image": uint8 (base_size, base_size, 3)}``: :func:`open_pretrain_data`'s
    dataset (see there for the arguments)."""
    return open_pretrain_data(source, base_size, image_column, materialize).dataset


def open_pretrain_data(
    source: str, base_size: int, image_column: str = "image", materialize: bool | str = "auto"
) -> PretrainData:
    """Unlabelled images as rows ``{"image": uint8 (base_size, base_size, 3)}``, with how they are held.

    Args:
        source: a folder (searched recursively for image files), a glob pattern, a
            ``.txt`` file listing image paths (one per line, relative to the list's
            folder or absolute), a ``.parquet`` file whose ``image_column``
            holds encoded images, or a URI Ray Data reads (``s3://``, ``gs://``; a
            ``.parquet`` URI is read as parquet, anything else as image files).
            For the embedded mosaic, pass its ``unlabelled`` folder.
        base_size: side of the square uint8 images the rows hold.
        image_column: the parquet column with the encoded images.
        materialize: True: decode everything now and keep it in the object store
            (fast epochs for sets that fit; also checks that at least one image
            decodes). False: decode while streaming, every epoch. ``"auto"``:
            materialise if the decoded set fits (:func:`decide_materialize`).

    Raises:
        DataError: the source is missing, names no images, is a parquet file
            without a usable ``image_column``, or (with ``materialize``) no image
            in it decodes.
    """
    if base_size < 1:
        raise DataError(f"base_size must be >= 1, got {base_size}")
    if not ray.is_initialized():
        ray.init()
    # Blocks in file order, not in the order their tasks finish: with it a seeded run sees the same
    # images in the same batches every time (without it two runs of one seed differed by ~0.5 mIoU).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    skip_log = _SkipLog.options(name=SKIP_LOG_NAME, get_if_exists=True).remote()
    # A non-detached actor lives only while the handle that *created* it does; copies inside the
    # lazy plan and handles from later `get_if_exists` calls do not count. Keep every handle (they
    # are tiny) so the creating one stays alive as long as this process drives the job.
    _SKIP_LOG_HANDLES.append(skip_log)
    encoded, column, rows_are_files, num_images = _read(source, image_column)
    materialized, reason = decide_materialize(materialize, num_images, base_size, object_store_bytes())
    ds = encoded.map_batches(
        _decode_batch,
        fn_kwargs={"size": base_size, "column": column, "rows_are_files": rows_are_files, "source": source,
                   "skip_log": skip_log},
        batch_size=None,  # one task per block: keeps the blocks made above as the unit of parallelism
        batch_format="numpy",
    )
    if materialized:
        ds = ds.materialize()
        if ds.count() == 0:
            examples = "; ".join(f"{n} ({r})" for n, r in skipped_images(source)[:3])
            raise DataError(f"no image in the pre-training source {source} could be decoded (e.g. {examples})")
    return PretrainData(ds, num_images, materialized, reason)


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle seed of one worker's epoch: a function of the run's seed, so a resume recomputes it."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def shuffled_batches(shard: Any, batch_size: int, *, seed: int, epoch: int, rank: int, buffer: int,
                     drop_last: bool = True) -> Any:
    """One epoch of torch batches from a Ray Data shard (a ``DataIterator``), in a seeded order.

    Ray Data's local shuffle buffer (``buffer`` rows, 0: the stored order) is seeded by (seed, epoch,
    rank): each epoch sees another order, and a run resumed in the middle of an epoch sees the same
    order again, so skipping the batches it already trained on lands on the right images.
    """
    return shard.iter_torch_batches(
        batch_size=batch_size, drop_last=drop_last, local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=shuffle_seed(seed, epoch, rank) if buffer else None)
