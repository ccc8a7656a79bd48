"""GLARE's adapted ViT as an mmsegmentation backbone, and its layer-wise lr decay.

Input convention: :class:`GlareViT` takes RGB images in [0, 1] and applies the
ViT's own mean/std itself (as :class:`~glare.models.AdaptedViT` does), so the
configs set mmseg's ``data_preprocessor`` to ``mean=0, std=255, bgr_to_rgb=True``.
A config that keeps mmseg's ImageNet normalisation would feed the ViT
doubly-normalised images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from mmengine.model import BaseModule
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from glare.models.pretrained import encoder_config, load_encoder
from glare.models.vit import AdaptedViT, block_indices, create_backbone, multi_level_maps, patch_size

# Weights sources that are not files (see glare.weights.loading.load_backbone).
_NO_WEIGHTS = "none"


@MODELS.register_module()
class GlareViT(BaseModule):
    """A timm ViT with one UniAdapter per block, giving multi-level NCHW maps to an mmseg neck.

    The model is built by glare.models (:func:`~glare.models.pretrained.encoder_config`,
    :func:`~glare.models.vit.multi_level_maps`); this class registers it with mmseg and
    reads mmengine's ``init_cfg``.

    Args:
        arch, img_size, timm_kwargs, adapter: the architecture for random init or an init spec
            (ignored, except ``timm_kwargs`` overrides, when ``init_cfg`` names a GLARE export).
        out_indices: blocks whose final-normed patch tokens are returned, in order.
        init_cfg: ``dict(type='Pretrained', checkpoint=W, prefix='backbone.')`` where ``W`` is a GLARE
            export (either layout), ``"imgfocus"``, ``"timm"``, ``"none"`` or a foreign ViT checkpoint
            (anything :func:`glare.models.pretrained.load_encoder` takes); other init_cfgs go to mmengine.

    The whole network (ViT and adapters) is trainable: the downstream protocol fine-tunes it.
    """

    def __init__(self, arch: str = "vit_small_patch14_dinov2", img_size: int = 512, timm_kwargs: dict | None = None,
                 adapter: dict | None = None, out_indices: Sequence[int] = (3, 5, 7, 11),
                 init_cfg: dict | list | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        try:
            self.model_cfg = encoder_config(arch, img_size, timm_kwargs, adapter, self._checkpoint())
        except ValueError as err:  # the message names the argument; say whose
            raise ValueError(f"GlareViT {err}") from None
        encoder = AdaptedViT(create_backbone(self.model_cfg), adapter_cfg=self.model_cfg.adapter)
        # The same `vit` + `adapters` pair as an AdaptedViT, so state dict keys match one to one.
        self.vit, self.adapters = encoder.vit, encoder.adapters
        try:
            self.out_indices = block_indices(out_indices, len(self.vit.blocks))
        except ValueError as err:
            raise ValueError(f"GlareViT {err}") from None
        self.requires_grad_(True)  # create_backbone freezes the ViT for pre-training; fine-tuning trains it

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> int:
        return patch_size(self.vit)

    def _checkpoint(self) -> str | None:
        """The checkpoint of a ``Pretrained`` init_cfg, if there is exactly one."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        found = [c.get("checkpoint") for c in cfgs if c.get("type") == "Pretrained"]
        return str(found[0]) if len(found) == 1 and found[0] is not None else None

    def init_weights(self) -> None:
        """Load a GLARE export or an init spec; mmengine's loader reads neither safetensors nor "imgfocus"."""
        checkpoint = self._checkpoint()
        if checkpoint is None:
            super().init_weights()
            return
        if checkpoint != _NO_WEIGHTS:
            source = load_encoder(checkpoint, self.model_cfg)
            self.load_state_dict(source.state_dict())
        self._is_init = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, D, rows, cols) maps of the ``out_indices`` blocks for RGB images in [0, 1] (any size)."""
        return multi_level_maps(self.vit, self.adapters, x, self.out_indices)


# Parameters of the ViT before its first block: layer 0 of the decay.
_EMBEDDINGS = {"cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "mask_token"}
_BLOCK = re.compile(r"^backbone\.(?:vit\.blocks|adapters)\.(\d+)\.")
_NO_DECAY_TOKENS = {"cls_token", "reg_token", "pos_embed", "mask_token"}


def layer_id(name: str, depth: int) -> int:
    """Decay layer of a parameter: 0 for the embeddings, i + 1 for block i and its adapter,
    ``depth + 1`` for everything after the blocks (final norm, neck, heads)."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    parts = name.split(".")
    if parts[:2] == ["backbone", "vit"] and parts[2] in _EMBEDDINGS:
        return 0
    return depth + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class GlareLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Param groups with lr ``base_lr * decay_rate ** (depth + 1 - layer_id)`` (``paramwise_cfg.decay_rate``).

    Written here because mmseg's ``LearningRateDecayOptimizerConstructor`` cannot place our
    parameters: it picks its rule by the backbone's class name (BEiT / MAE / ConvNeXt, otherwise
    NotImplementedError) and its ViT rule reads ``backbone.layers.<i>``, while ours are
    ``backbone.vit.blocks.<i>`` plus each block's adapter at ``backbone.adapters.<i>``, which must
    share that block's rate. The depth is read off the model, so the config needs no ``num_layers``.
    No weight decay on 1-D parameters (norms, biases, adapter scales) and on tokens / position embeddings.
    """

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        backbone = getattr(module, "backbone", None)
        if not isinstance(backbone, GlareViT):
            raise TypeError(f"GlareLayerDecayOptimizerConstructor needs a GlareViT backbone, got "
                            f"{type(backbone).__name__}")
        depth = len(backbone.vit.blocks)
        decay_rate = float(self.paramwise_cfg.get("decay_rate", 1.0))
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer = layer_id(name, depth)
            no_decay = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in _NO_DECAY_TOKENS
            group = groups.setdefault((layer, no_decay), {
                "params": [], "param_names": [],
                "lr": self.base_lr * decay_rate ** (depth + 1 - layer),
                "weight_decay": 0.0 if no_decay else (self.base_wd or 0.0),
            })
            group["params"].append(param)
            group["param_names"].append(name)
        params.extend(groups[k] for k in sorted(groups))
