"""The adapted ViT and the GLARE student/teacher model."""

from glare.models.adapter import UniAdapter, build_adapters
from glare.models.glare import GlareModel, build_model
from glare.models.heads import DinoHead
from glare.models.region_attention import RegionCrossAttention
from glare.models.vit import AdaptedViT, Features, create_backbone, encode

__all__ = [
    "AdaptedViT",
    "DinoHead",
    "Features",
    "GlareModel",
    "RegionCrossAttention",
    "UniAdapter",
    "build_adapters",
    "build_model",
    "create_backbone",
    "encode",
]
