"""Checks the driver runs before Ray starts, so that a mistake costs a second, not a cluster start-up.

:func:`preflight` runs every check that would otherwise fail inside a worker or half-way
through a start: the model-dependent config rules (regions vs attention heads, the global
token, the view size vs the patch size; the model is built on the meta device, so this costs
no memory and no weights), the weights source (exists, readable, of the format its suffix
says, fits the architecture after the project's remapping), the pre-training and labelled
pre-training data source (exists, holds images) and the storage path (a directory can be created there).
Each failure raises a ``ValueError`` subclass (:class:`~glare.config.ConfigError`,
:class:`~glare.weights.loading.WeightsError`, :class:`~glare.data.segmentation.DataError`)
whose message names the key or file and the fix; the command lines print it as one
``error:`` line and exit with status 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from glare.config import ConfigError, GlareConfig

if TYPE_CHECKING:
    import torch

# How many of a local source's images are tried: one that decodes is enough to start.
_DECODE_SAMPLE = 16


def check_weights_file(weights: str) -> None:
    """A weights file exists and its content is what its suffix says (no torch needed: runs first)."""
    from glare.weight_formats import WeightsError, sniff_weights_file

    if weights in ("none", "imgfocus", "timm"):
        return
    if not Path(weights).is_file():
        what = "is a directory" if Path(weights).is_dir() else "does not exist"
        raise WeightsError(f"config key 'model.weights': {weights} {what}; give a checkpoint file "
                           "(.safetensors, .pth, .pt, .bin, .ckpt), or imgfocus, timm or none")
    try:
        sniff_weights_file(weights)
    except WeightsError as err:
        raise WeightsError(f"config key 'model.weights': {err}") from None


def check_model_rules(cfg: GlareConfig) -> torch.nn.Module:
    """Build the whole GLARE model on the meta device (no memory, no weights): every check its constructor
    makes, i.e. the rules only a model knows (regions vs heads, ...). Returns the (meta) backbone."""
    import torch

    from glare.models.glare import GlareModel
    from glare.models.vit import create_backbone

    try:
        with torch.device("meta"):
            backbone = create_backbone(cfg.model)
            GlareModel(cfg, backbone)
    except ConfigError:
        raise
    except ValueError as err:  # create_backbone: an arch or timm_kwargs timm cannot build
        raise ConfigError(f"config key 'model.arch': {err}") from None
    return backbone


def check_model(cfg: GlareConfig) -> None:
    """:func:`check_model_rules`, then the weights file fits the architecture."""
    from glare.weights.loading import WeightsError, read_backbone

    weights = cfg.model.weights
    backbone = check_model_rules(cfg)
    if weights in ("none", "imgfocus", "timm"):
        return  # imgfocus is checked by the caller (installed or not); timm's hub weights need the network
    check_weights_file(weights)
    try:
        read_backbone(backbone, weights)
    except WeightsError as err:
        raise WeightsError(f"config key 'model.weights': {err}") from None


def check_pretrain_source(source: str, image_column: str = "image") -> None:
    """The pre-training source exists and holds at least one image that decodes (local sources only)."""
    from PIL import Image

    from glare.data.sources import MOSAIC, DataError, check_parquet, local_files

    if source == MOSAIC or "://" in source:
        return  # generated on demand / remote: read by Ray Data itself
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() == ".parquet":
            if not path.is_file():
                raise DataError(f"pre-training source not found: {source}")
            check_parquet(path, image_column)
            return
        files = local_files(source)
    except DataError as err:
        raise DataError(f"config key 'data.source': {err}") from None
    sample = [f for f in files[:_DECODE_SAMPLE] if f.is_file()]
    for file in sample:
        try:
            with Image.open(file) as img:
                img.verify()
            return
        except Exception:  # noqa: BLE001 - any failure means "not a readable image"; the next one may be
            continue
    if len(sample) == len(files):
        raise DataError(f"config key 'data.source': none of the {len(files)} files in {source} is a readable "
                        f"image (e.g. {files[0]})")
    # A large set whose first files are damaged: the decode stage skips and names them.


def check_storage(storage: str, key: str = "train.storage_path") -> None:
    """A directory can be created under ``storage`` (local paths; URIs are left to their filesystem).

    Nothing is left behind: the check creates a temporary folder in the nearest existing
    ancestor and removes it.
    """
    if "://" in storage:
        return
    path = Path(storage).expanduser().absolute()
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"config key {key!r}: {ancestor} is a file, not a directory, so {path} cannot be "
                          "created; pick another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".glare-check-", dir=ancestor))
    except OSError as err:
        raise ConfigError(f"config key {key!r}: cannot create a directory in {ancestor} ({err.strerror}); "
                          "pick a writable path") from None


def preflight(cfg: GlareConfig, *, data: bool = True, storage: bool = True) -> None:
    """Every check a training run needs before Ray starts; raises a ValueError naming the key or file."""
    if storage:
        check_storage(cfg.train.storage_path)
    check_weights_file(cfg.model.weights)
    if data:  # before the model: these need neither torch nor timm
        check_pretrain_source(cfg.data.source, cfg.data.image_column)
        # The labelled (probe) set is checked by glare.engine.driver.run and tune/sweep.py (open_probe_sets),
        # also before Ray.
    check_model(cfg)
