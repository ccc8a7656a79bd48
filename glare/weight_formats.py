"""Which kind of weights file a path holds, from its first bytes, without importing torch.

(Outside the ``glare.weights`` package on purpose: importing that package imports torch and timm.)

The driver's preflight calls :func:`sniff_weights_file` before anything heavy is imported, so a
missing, foreign or damaged weights file fails in a fraction of a second;
:func:`glare.weights.loading.load_state_file` calls it before reading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


class WeightsError(ValueError):
    """A weights source is missing, unreadable, or does not fit the model."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = b"\x80"  # legacy torch.save: a pickle of protocol 2 or later
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _check_safetensors_header(path: Path) -> None:
    """Raise WeightsError unless ``path`` starts with a complete safetensors header (8-byte length + JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 2 <= length <= size - 8
        header = f.read(length) if ok else b""
    try:
        ok = ok and isinstance(json.loads(header), dict)
    except ValueError:
        ok = False
    if not ok:
        raise WeightsError(f"{path} is not a complete safetensors file (its header is missing, truncated or not "
                           "JSON); re-download or re-export it")


def sniff_weights_file(path: str | Path) -> Literal["safetensors", "zip", "pickle"]:
    """``safetensors``, ``zip`` (torch.save's format) or ``pickle`` (legacy torch.save), checked by content.

    Raises:
        WeightsError: missing file, unknown suffix, or content that is not what the suffix says (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _check_safetensors_header(path)
        return "safetensors"
    if suffix not in _TORCH_SUFFIXES:
        raise WeightsError(f"unknown weights file type {suffix!r} ({path}): expected .safetensors, .pth, .pt or .bin")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC:
        return "zip"
    if magic.startswith(_PICKLE_MAGIC):
        return "pickle"
    raise WeightsError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle; it starts with "
                       f"{magic!r}); re-save it with torch.save(model.state_dict(), ...) or convert it to "
                       ".safetensors")
