"""The adapted ViT from a weights file: one of our exports, or an initialisation.

Models build on weights (never the reverse): :mod:`glare.weights.export` reads and writes the
files, this module turns them into an :class:`~glare.models.vit.AdaptedViT`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from glare.config import AdapterConfig, ModelConfig
from glare.models.vit import AdaptedViT, create_backbone
from glare.weights.export import (
    ExportError,
    export_model_config,
    model_config_from_meta,
    read_export,
    split_adapter_keys,
)
from glare.weights.loading import load_backbone


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the adapted ViT an export holds; every key must match (strict).

    The model accepts any input size (timm's ``dynamic_img_size``).
    """
    state, meta = read_export(path)
    cfg = model_config_from_meta(meta)
    model = AdaptedViT(create_backbone(cfg), adapter_cfg=cfg.adapter)
    backbone, adapters = split_adapter_keys(state)
    for part, module, sd in (("backbone", model.vit, backbone), ("adapters", model.adapters, adapters)):
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ExportError(f"{path}: {part} keys do not match the model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    return model.to(device).eval()


def load_encoder(weights: str | Path, model_cfg: ModelConfig | None = None, device: str | torch.device = "cpu"
                 ) -> torch.nn.Module:
    """An AdaptedViT from either one of our exports or an initialisation.

    ``weights`` is a GLARE export (``.safetensors`` written by :func:`glare.weights.export.save_export`),
    or anything ``model.weights`` accepts ("imgfocus", "none", "timm", a foreign
    checkpoint) combined with ``model_cfg``'s architecture; the latter gets
    zero-initialised adapters, i.e. it is exactly the initialisation.
    """
    if export_model_config(weights) is not None:
        return load_pretrained(weights, device=device)
    cfg = dataclasses.replace(model_cfg or ModelConfig(), weights=str(weights))
    vit = create_backbone(cfg)
    if cfg.weights != "none":
        load_backbone(vit, cfg.weights)
    return AdaptedViT(vit, adapter_cfg=cfg.adapter).to(device).eval()


def encoder_config(arch: str, img_size: int, timm_kwargs: dict | None, adapter: dict | None,
                   weights: str | None) -> ModelConfig:
    """The architecture of the adapted ViT to build: the export's own when ``weights`` is one of our
    exports, else ``arch`` (for an init spec such as "imgfocus", a foreign checkpoint, or None: random).

    For an export, ``timm_kwargs`` are laid over the export's (for fine-tuning settings such as
    ``drop_path_rate``); ``arch``, ``img_size`` and ``adapter`` come from the export.
    """
    cfg = export_model_config(weights) if weights is not None else None
    if cfg is not None:
        return dataclasses.replace(cfg, weights=str(weights), timm_kwargs={**cfg.timm_kwargs, **(timm_kwargs or {})})
    try:
        adapter_cfg = AdapterConfig(**(adapter or {}))
    except TypeError as err:
        raise ValueError(f"adapter={adapter!r} is not a valid AdapterConfig: {err}") from None
    return ModelConfig(arch=arch, weights=str(weights or "none"), img_size=img_size,
                       timm_kwargs=dict(timm_kwargs or {}), adapter=adapter_cfg)
