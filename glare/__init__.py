"""GLARE on Ray: continual self-supervised pre-training of ViTs for semantic segmentation.

Public entry points: :func:`load_config`, :func:`build_model`, :func:`load_pretrained`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glare.config import ConfigError, GlareConfig, load_config

if TYPE_CHECKING:  # the model stack imports torch/timm/kornia: load it only when used
    from glare.models import AdaptedViT, GlareModel

__version__ = "0.1.0"
__all__ = ["ConfigError", "GlareConfig", "build_model", "load_config", "load_pretrained"]


def build_model(cfg: GlareConfig) -> GlareModel:
    """The GLARE student/teacher model for ``cfg`` (see :class:`glare.models.GlareModel`)."""
    from glare.models import build_model as _build

    return _build(cfg)


def load_pretrained(path: str, **kwargs: Any) -> AdaptedViT:
    """An adapted ViT (backbone + adapters) from one of our exports (see :mod:`glare.weights.export`)."""
    from glare.models.pretrained import load_pretrained as _load

    return _load(path, **kwargs)
