"""Exports of the adapted backbone (safetensors) and loading them back.

Two layouts of the same tensors:
- ``timm``: timm's ViT keys plus ``blocks.{i}.adapter.*``; :func:`glare.models.pretrained.load_pretrained`
  rebuilds an :class:`~glare.models.AdaptedViT` from it alone (the model
  settings travel in the file's metadata);
- ``mmseg``: the same keys under ``backbone.``, what an mmsegmentation
  ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')`` reads.
Every export is re-read and checked key for key before it is reported written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glare.config import AdapterConfig, ModelConfig

FORMAT = "glare-export-v1"
# An adapter's parameter in a state dict, as ``<block>.<name>`` groups: the export layout (the timm block
# keeps its adapter) and the training / AdaptedViT layout (an ``adapters`` ModuleDict beside the ViT).
EXPORT_ADAPTER_KEY = re.compile(r"blocks\.(\d+)\.adapter\.(.+)")
ADAPTER_KEYS = (EXPORT_ADAPTER_KEY, re.compile(r"adapters\.(\d+)\.(.+)"))


class ExportError(ValueError):
    """An export file is not ours, or does not match the model it describes."""


def export_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The flat ``timm`` layout of an AdaptedViT: backbone keys + ``blocks.{i}.adapter.*``."""
    state = {k: v for k, v in model.vit.state_dict().items()}
    for key, value in model.adapters.state_dict().items():
        index, rest = key.split(".", 1)
        state[f"blocks.{index}.adapter.{rest}"] = value
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def split_adapter_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an export's state into (backbone state, adapter ModuleList state ``{i}.{name}``)."""
    backbone, adapters = {}, {}
    for key, value in state.items():
        m = EXPORT_ADAPTER_KEY.fullmatch(key)
        if m:
            adapters[f"{m.group(1)}.{m.group(2)}"] = value
        else:
            backbone[key] = value
    return backbone, adapters


def save_export(model: torch.nn.Module, path: str | Path, model_cfg: ModelConfig,
                layout: Literal["timm", "mmseg"] = "timm") -> Path:
    """Write an AdaptedViT as safetensors (atomically), re-read it and check every key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = export_state(model)
    prefix = "backbone." if layout == "mmseg" else ""
    tensors = {prefix + k: v for k, v in state.items()}
    meta = {
        "format": FORMAT,
        "layout": layout,
        "arch": model_cfg.arch,
        "img_size": str(model_cfg.img_size),
        "global_token": str(model_cfg.global_token),
        "timm_kwargs": json.dumps(dict(model_cfg.timm_kwargs)),
        "adapter": json.dumps(dataclasses.asdict(model_cfg.adapter)),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    with safe_open(str(path), framework="pt") as f:
        written = set(f.keys())
    if written != set(tensors):
        raise ExportError(f"export {path} lost keys: {sorted(set(tensors) ^ written)[:10]}")
    return path


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (``backbone.`` prefix stripped) and metadata of one of our exports."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no export at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise ExportError(f"{path} is not a safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not a GLARE export (metadata format={meta.get('format')!r}); "
                          "load foreign checkpoints through model.weights instead")
    if meta.get("layout") == "mmseg":
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    return state, meta


def model_config_from_meta(meta: dict[str, str]) -> ModelConfig:
    """The ModelConfig an export was written with."""
    return ModelConfig(
        arch=meta["arch"], weights="none", img_size=int(meta["img_size"]),
        global_token=int(meta.get("global_token", 0)), timm_kwargs=json.loads(meta["timm_kwargs"]),
        adapter=AdapterConfig(**json.loads(meta["adapter"])),
    )


def export_metadata(path: str | Path | None) -> dict[str, str] | None:
    """The metadata of a GLARE export (read from its header only), or None when ``path`` is not one.

    The one test of "is this one of our exports?": an init spec, a foreign or unreadable file is not.
    """
    if path is None or not str(path).endswith(".safetensors") or not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a readable safetensors file: not an export; the weights loader names the problem
        return None
    return meta if meta.get("format") == FORMAT else None


def export_model_config(weights: str | Path) -> ModelConfig | None:
    """The ModelConfig of a GLARE export (read from its header only), or None for anything else."""
    meta = export_metadata(weights)
    return None if meta is None else model_config_from_meta(meta)


def arch_notice(weights: str | Path, model_cfg: ModelConfig) -> str | None:
    """One line saying that an export's own architecture is used, when it differs from ``model_cfg``'s."""
    own = export_model_config(weights)
    if own is None or (own.arch, dict(own.timm_kwargs)) == (model_cfg.arch, dict(model_cfg.timm_kwargs)):
        return None
    kwargs = f" {json.dumps(dict(own.timm_kwargs))}" if own.timm_kwargs else ""
    return (f"[glare] note: {weights} is an export of {own.arch}{kwargs}; it is evaluated as that architecture, "
            f"and the config's model.arch={model_cfg.arch} is not used")
