"""The GLARE model: one frozen backbone, student and teacher adapter sets, heads and losses.

The train loop only calls :meth:`GlareModel.forward_backward` and
:meth:`GlareModel.update_teacher`; everything the method does between an
image batch and a gradient lives here. The loop owns every schedule: it
passes the step's teacher temperature and EMA momentum in as values
(see :mod:`glare.engine.schedules`), as DINOv2's ``SSLMetaArch`` does.
"""

from __future__ import annotations

import copy
import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from glare.augment import ViewPair, distort_patches, make_views, region_queries, sample_regions
from glare.config import ConfigError, GlareConfig
from glare.losses import CenteredCrossEntropy, GlobalLoss
from glare.models.adapter import build_adapters
from glare.models.bootstrap import bootstrap_head
from glare.models.heads import DinoHead
from glare.models.region_attention import RegionCrossAttention
from glare.models.vit import AdaptedViT, Features, create_backbone, dense_of_last_blocks, encode

Branch = Literal["student", "teacher"]


class GlareModel(nn.Module):
    """Student/teacher ViT over ONE frozen backbone; only the adapter sets differ.

    ``student`` holds what trains (adapters, DINO heads, region cross-attention);
    ``teacher`` is its EMA copy. With ``model.tune=full`` (the baseline GLARE is
    measured against) there are no adapters: the student owns a trainable copy
    of the whole backbone and the teacher an EMA copy of it. Modules a zero-weighted loss term would use are
    not built, so every parameter gets a gradient (DDP needs no
    ``find_unused_parameters``) and a switched-off term costs nothing.
    """

    def __init__(self, cfg: GlareConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        full = cfg.model.tune == "full"
        self.frozen_backbone = None if full else backbone.requires_grad_(False)
        dim, depth = backbone.embed_dim, len(backbone.blocks)
        heads = backbone.blocks[-1].attn.num_heads
        lo, reg = cfg.loss, cfg.region
        if lo.reg > 0 and reg.num_regions > heads:
            raise ConfigError(f"config key 'region.num_regions': {reg.num_regions} regions need as many attention "
                              f"heads, but {cfg.model.arch} has {heads}")
        if cfg.model.global_token >= backbone.num_prefix_tokens:
            raise ConfigError(f"config key 'model.global_token': {cfg.model.global_token} is not a prefix token "
                              f"({backbone.num_prefix_tokens} in {cfg.model.arch})")
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        if cfg.augment.view_size % self.patch_size:
            raise ConfigError(f"config key 'augment.view_size': {cfg.augment.view_size} is not a multiple of the "
                              f"patch size {self.patch_size}")

        if full:
            student = nn.ModuleDict({"backbone": backbone.requires_grad_(True)})
        else:
            student = nn.ModuleDict({"adapters": build_adapters(dim, depth, cfg.model.adapter)})
        if lo.glob > 0:
            student["head"] = DinoHead(dim, cfg.model.head)
        if lo.reg > 0 or lo.loc1 > 0 or lo.loc2 > 0:  # regions are pooled patch tokens: the patch-level head
            student["local_head"] = DinoHead(dim, cfg.model.local_head)
        if lo.reg > 0 and reg.correspondence == "cross_attention":
            student["cross_attention"] = RegionCrossAttention(dim)
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.pretrained_heads: set[str] = set()  # heads loaded from a checkpoint (build_model fills it)

        args = (lo.student_temp, lo.center_momentum)
        k, k_local = cfg.model.head.out_dim, cfg.model.local_head.out_dim
        terms = {"glob": (GlobalLoss, k), "reg": (CenteredCrossEntropy, k_local),
                 "loc1": (CenteredCrossEntropy, k_local), "loc2": (CenteredCrossEntropy, k_local)}
        self.losses = nn.ModuleDict({name: cls(dim_k, *args) for name, (cls, dim_k) in terms.items()
                                     if getattr(lo, name) > 0})

    # ----------------------------------------------------------------- encoders
    @property
    def backbone(self) -> nn.Module:
        """The student's ViT: the shared frozen one, or (``tune=full``) the student's own copy."""
        return self.frozen_backbone if self.frozen_backbone is not None else self.student["backbone"]

    def features(self, images: torch.Tensor, branch: Branch = "student", *, attention: bool = False,
                 blocks: tuple[int, ...] = ()) -> Features:
        """Tokens of images in [0, 1] through the student's or the teacher's adapters.

        ``attention=True`` adds the last block's global-token -> patch attention
        of every head (computed only then).
        """
        part = getattr(self, branch)
        vit, adapters = (self.frozen_backbone, part["adapters"]) if "adapters" in part else (part["backbone"], None)
        return encode(vit, adapters, images, attention=attention,
                      global_token=self.cfg.model.global_token, blocks=blocks)

    def dense_features(self, images: torch.Tensor, last_blocks: int = 1, branch: Branch = "student"
                       ) -> torch.Tensor:
        """Patch features of the last ``last_blocks`` blocks, concatenated: (B, C, rows, cols)."""
        return dense_of_last_blocks(functools.partial(self.features, images, branch), len(self.backbone.blocks),
                                    last_blocks)

    def export(self, branch: Branch = "student") -> AdaptedViT:
        """A standalone adapted ViT (backbone + one adapter set; heads and cross-attention dropped).

        With ``tune=full`` the branch's own backbone is exported with identity
        (zero-initialised) adapters, so every export has the same layout.
        """
        part = getattr(self, branch)
        if "adapters" in part:
            return AdaptedViT(copy.deepcopy(self.frozen_backbone), copy.deepcopy(part["adapters"]))
        vit = copy.deepcopy(part["backbone"]).requires_grad_(False)
        return AdaptedViT(vit, adapter_cfg=self.cfg.model.adapter)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the student's adapters, heads and cross-attention."""
        return [p for p in self.student.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Views -> teacher (clean) and student (distorted) passes -> weighted loss terms.

        ``images``: uint8 (B, 3, H, W) on the training device; ``teacher_temp``: the
        teacher's softmax temperature for this step. Returns ``loss``
        (the weighted total) and one entry per active term.
        """
        cfg, aug = self.cfg, self.cfg.augment
        lo, b = cfg.loss, images.shape[0]
        views = make_views(images, aug)
        clean = torch.cat([views.x1, views.x2])
        distorted, mask = distort_patches(clean, self.patch_size, aug.patch_fraction, tuple(aug.blur_sigma),
                                          aug.patch_noise_p, aug.patch_noise_std, aug.patch_jitter_p)
        with torch.no_grad():
            t = self.features(clean, "teacher", attention="reg" in self.losses)
        s = self.features(distorted, "student")
        g = cfg.model.global_token
        pair = views.pair(self.patch_size)  # view 1 -> view 2; pair.reverse() is view 2 -> view 1
        out: dict[str, torch.Tensor] = {}

        # Each term is a function of logits: the student's heads run with gradient, the teacher's without.
        if "glob" in self.losses:  # global tokens of views 1 and 2; the loss pairs each with the other view
            out["glob"] = self.losses["glob"](self.student["head"](s.prefix[:, g]),
                                              self._teacher_logits("head", t.prefix[:, g]), teacher_temp)
        if "reg" in self.losses:  # a region of one view against its counterpart in the other
            rep_s, rep_t, valid = self._regions(s, t, b, pair)
            out["reg"] = self.losses["reg"](self.student["local_head"](rep_s[valid]),
                                            self._teacher_logits("local_head", rep_t[valid]), teacher_temp)
        local: dict[str, torch.Tensor] = {}  # loss term -> (2B, N) patches of X~ it supervises
        if "loc1" in self.losses:
            local["loc1"] = mask
        if "loc2" in self.losses:
            c12, in12 = pair.match_patches()
            c21, in21 = pair.reverse().match_patches()
            local["loc2"] = torch.cat([in12, in21])
        logits = self._student_local_logits(s.patches, local) if local else {}
        if "loc1" in self.losses:  # distorted patches of X~ against the same clean patches of X
            out["loc1"] = self.losses["loc1"](logits["loc1"], self._teacher_logits("local_head", t.patches[mask]),
                                              teacher_temp)
        if "loc2" in self.losses:  # patches of X~ against the teacher's token of X' at the same scene point
            t1, t2 = t.patch_map().split(b)
            other = _tokens_at(torch.cat([t2, t1]), torch.cat([c12, c21]))[local["loc2"]]
            out["loc2"] = self.losses["loc2"](logits["loc2"], self._teacher_logits("local_head", other),
                                              teacher_temp)
        out["loss"] = sum(getattr(lo, name) * value for name, value in out.items())
        return out

    @torch.no_grad()
    def _teacher_logits(self, head: str, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher's ``head`` on ``tokens`` (M, D): targets, so no gradient."""
        return self.teacher[head](tokens)

    def _student_local_logits(self, patches: torch.Tensor, selections: dict[str, torch.Tensor]
                              ) -> dict[str, torch.Tensor]:
        """The student's local-head logits on each term's selected patches, from ONE head pass.

        The head runs once on the union of the selections (distorted and inside-the-other-view
        patches overlap by about a quarter of the grid), then each term takes its rows, in the
        row-major order ``patches[selection]`` would give. Same numbers as one pass per term.
        """
        union = functools.reduce(torch.logical_or, selections.values())
        logits = self.student["local_head"](patches[union])
        row = union.flatten().cumsum(0) - 1  # each selected patch's row in `logits`
        return {name: logits[row[sel.flatten()]] for name, sel in selections.items()}

    def _regions(self, s: Features, t: Features, b: int, pair: ViewPair
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student and teacher region representations (2B, R, D) for both view directions, and validity.

        ``pair`` maps view 1 to view 2 (the first B rows of ``s`` and ``t`` are view 1).
        """
        reg = self.cfg.region
        assert t.cls_attn is not None
        masks = sample_regions(t.cls_attn, reg.num_regions, reg.top_q)  # (2B, R, N): view 1 then view 2
        q_s = region_queries(s.patches, masks)
        q_t = region_queries(t.patches, masks)
        t_other = torch.cat(t.patches.split(b)[::-1])  # for view 1 rows: tokens of view 2, and vice versa
        if reg.correspondence == "cross_attention":
            rep_s = self.student["cross_attention"](q_s, s.patches)
            with torch.no_grad():
                rep_t = self.teacher["cross_attention"](q_t, t_other)
            valid = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
            return rep_s, rep_t, valid
        m1, m2 = masks.split(b)
        mapped = torch.cat([pair.map_regions(m1), pair.reverse().map_regions(m2)])
        with torch.no_grad():
            rep_t = region_queries(t_other, mapped)
        return q_s, rep_t, mapped.any(dim=-1)

    def heads_to_bootstrap(self) -> list[str]:
        """The heads :meth:`bootstrap_heads` re-initialises, per ``model.head_init``."""
        mode = self.cfg.model.head_init
        if mode == "random":
            return []
        heads = [name for name in ("head", "local_head") if name in self.student]
        return heads if mode == "data" else [h for h in heads if h not in self.pretrained_heads]

    @torch.no_grad()
    def bootstrap_heads(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, int]:
        """Re-initialise the heads of :meth:`heads_to_bootstrap` from the init's tokens on ``images``.

        ``images``: uint8 (B, 3, H, W). The teacher sees two clean views of each image, as in training;
        the global head is fitted to what it will see (global tokens and, with ``L_reg``, region
        representations), the local head to patch tokens. The teacher then copies the student.
        Returns how many tokens each bootstrapped head was fitted to.
        """
        heads = self.heads_to_bootstrap()
        if not heads:
            return {}
        views = make_views(images, self.cfg.augment, generator)
        b = images.shape[0]
        t = self.features(torch.cat([views.x1, views.x2]), "teacher", attention="reg" in self.losses)
        seen: dict[str, int] = {}
        if "head" in heads:
            tokens = t.prefix[:, self.cfg.model.global_token]
            bootstrap_head(self.student["head"], tokens, generator=generator)
            seen["head"] = len(tokens)
        if "local_head" in heads:
            tokens = [t.patches.flatten(0, 1)] if ("loc1" in self.losses or "loc2" in self.losses) else []
            if "reg" in self.losses:
                _, regions, valid = self._regions(t, t, b, views.pair(self.patch_size))
                tokens.append(regions[valid])
            tokens = torch.cat(tokens)
            bootstrap_head(self.student["local_head"], tokens, generator=generator)
            seen["local_head"] = len(tokens)
        self.teacher.load_state_dict(self.student.state_dict())
        return seen

    def forward_backward(self, images: torch.Tensor, teacher_temp: float, runner: nn.Module | None = None,
                         amp: bool = False) -> dict[str, float]:
        """One training forward and backward; returns the loss terms as floats.

        ``teacher_temp`` is the step's teacher temperature
        (:func:`glare.engine.schedules.teacher_temp`); it is also returned as a metric.

        ``runner`` is this model's DDP wrapper when distributed: calling the
        forward through it is what makes DDP all-reduce the gradients. The
        backward always runs, even on a non-finite loss, so every worker takes
        part in the same all-reduce; the caller then sees non-finite gradients
        (identical on every worker) and skips the step. ``amp`` runs the forward
        in bf16 autocast on CUDA (ignored elsewhere).
        """
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp and images.is_cuda):
            out = (runner or self)(images, teacher_temp)
        out["loss"].backward()
        metrics = {name: float(value.detach()) for name, value in out.items()}
        metrics["teacher_temp"] = teacher_temp
        for name, term in self.losses.items():
            metrics.update(term.entropy_metrics(name))
        return metrics

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> float:
        """EMA of the student into the teacher: ``teacher <- m * teacher + (1 - m) * student``; returns ``m``.

        ``momentum`` is the step's value (:func:`glare.engine.schedules.teacher_momentum`).
        """
        m = momentum
        student = [p.detach() for p in self.student.parameters()]
        teacher = [p for p in self.teacher.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)
        return m


@torch.no_grad()
def _tokens_at(token_map: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Tokens (B, N, D) read bilinearly from ``token_map`` (B, D, rows, cols) at ``coords`` (B, N, 2),
    given in ``grid_sample``'s [-1, 1] convention (see :meth:`ViewPair.match_patches`)."""
    sampled = F.grid_sample(token_map, coords.unsqueeze(2).to(token_map.dtype), mode="bilinear",
                            align_corners=False)  # (B, D, N, 1)
    return sampled.squeeze(-1).transpose(1, 2)


def build_model(cfg: GlareConfig) -> GlareModel:
    """Build the GLARE model: timm backbone, weights per ``cfg.model.weights``, adapters, heads, losses.

    A checkpoint's DINO head (if any) initialises both heads; adapters in one of
    our exports initialise both adapter sets (continuing a previous run).
    """
    from glare.weights import load_backbone  # heavy (onnx/safetensors) only when building

    backbone = create_backbone(cfg.model)
    loaded = None
    if cfg.model.weights != "none":
        loaded = load_backbone(backbone, cfg.model.weights)
    model = GlareModel(cfg, backbone)
    if cfg.optim.head_lr_scale == 0:  # held at their initial weights: nothing to compute a gradient for
        for name in ("head", "local_head"):
            if name in model.student:
                model.student[name].requires_grad_(False)
    if loaded is not None:
        if loaded.head and "head" in model.student:
            model.student["head"].load_dino_state(loaded.head)
            model.pretrained_heads.add("head")
        if loaded.adapters and "adapters" in model.student:
            model.student["adapters"].load_state_dict(loaded.adapters)
        model.teacher.load_state_dict(model.student.state_dict())
    return model
