"""Load foreign ViT checkpoints into a timm ``VisionTransformer``.

Every format goes through one remapping function, :func:`remap_checkpoint`
(timm's pattern): it unwraps the checkpoint, renames keys to timm's
``VisionTransformer`` names and sorts them into backbone, DINO head and adapter
state. :func:`load_backbone` then fits the position embedding to the model's
grid and loads the backbone strictly: a missing, unexpected or mis-shaped key
is an error, never a silent partial load.

Formats understood:

- plain timm state dicts (``.pth`` / ``.safetensors``), optionally under a
  ``model`` / ``state_dict`` / ``module`` wrapper;
- DINO / iBOT / UDI training checkpoints: ``{"student": ..., "teacher": ...}``
  with ``module.`` (DDP) and ``backbone.`` prefixes and the projection head
  under ``head.`` (``dino_head.`` for DINOv2); the teacher is used by default,
  as DINO does for evaluation;
- UDI's ViT with two class tokens, ``cls_token`` of shape (1, 2, D): the second
  token becomes timm's ``reg_token`` (build the model with ``reg_tokens=1``).
  UDI's public ``main_udi.py`` saves ``student``/``teacher`` state dicts of
  ``MultiCropWrapper(UDIWrapper(vit, attn=...), DINOHead)``; the inner names of
  ``UDIWrapper`` are not public, so the ViT is found by its
  ``patch_embed.proj.weight`` key and UDIWrapper's own modules (its extra
  attention) are reported as dropped. Its ``pos_embed`` is assumed to give
  both class tokens a position, (1, 2 + N, D); one with only the first class
  position, (1, 1 + N, D), also loads (the second token gets none);
- DINOv2 backbones: ``register_tokens`` -> ``reg_token`` (registers carry no
  position), ``mask_token`` dropped, SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``;
- GLARE's own exports: ``blocks.i.adapter.*`` or ``adapters.i.*`` keys become
  adapter state keyed ``"i.<param>"`` (loadable into an ``nn.ModuleList``).
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from glare.weight_formats import WeightsError, sniff_weights_file
from glare.weights.export import ADAPTER_KEYS
from glare.weights.imgfocus import imgfocus_weights


@dataclass
class RemappedCheckpoint:
    """A checkpoint sorted into the parts GLARE loads separately.

    Attributes:
        backbone: timm ``VisionTransformer`` state (after :func:`load_backbone`:
            exactly what was loaded, position embedding fitted to the model).
        head: DINO projection head state, keys relative to the head
            (``mlp.0.weight``, ``last_layer.weight_g`` ...); ``{}`` if none.
        adapters: adapter state keyed ``"<block>.<param>"``; ``{}`` if none.
        dropped: keys deliberately left out (mask token, classifier, UDI's
            wrapper modules, non-tensor entries), for logging.
    """

    backbone: dict[str, Tensor]
    head: dict[str, Tensor] = field(default_factory=dict)
    adapters: dict[str, Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


_ANCHOR = "patch_embed.proj.weight"
_WRAPPERS = ("model", "state_dict", "module")
_BRANCHES = ("teacher", "student")
_HEAD_PREFIXES = ("head.", "dino_head.")
_CLASSIFIER = ("head.weight", "head.bias")
# DINOv2's SwiGLU names (giant) to timm's.
_RENAMES = (
    (re.compile(r"(blocks\.\d+\.mlp)\.w12\."), r"\1.fc1."),
    (re.compile(r"(blocks\.\d+\.mlp)\.w3\."), r"\1.fc2."),
)


def load_state_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file without executing code from it.

    ``.safetensors`` through safetensors; ``.pth`` / ``.pt`` / ``.bin`` /
    ``.ckpt`` through ``torch.load(weights_only=True)``, which only rebuilds
    tensors and plain containers (plus ``argparse.Namespace``, the ``args``
    entry of DINO/UDI training checkpoints). The file's first bytes are
    checked first (safetensors header, zip archive or pickle), so a file of
    another kind is named as such. The result may be nested
    (``{"teacher": {...}, "epoch": 3}``); :func:`remap_checkpoint` unwraps it.

    Raises:
        WeightsError: missing file, unknown suffix, unreadable data, or a
            pickle that needs arbitrary Python objects; the message names the file.
    """
    path = Path(path)
    kind = sniff_weights_file(path)
    if kind == "safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"cannot read safetensors file {path}: {err}; re-download or re-export it") from None
    zipped = kind == "zip"
    try:
        # torch warns about the pickle protocol of damaged files; the error below says what matters.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # mmap: the tensors are read when used, so checking a large file's keys and shapes is cheap.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if not found:  # a damaged pickle, not one that asks for Python objects
            raise WeightsError(f"cannot read {path} as a torch checkpoint (damaged: {str(err).splitlines()[0]}); "
                               "re-save or re-download it") from None
        raise WeightsError(
            f"{path} needs arbitrary Python objects to unpickle (it contains {found.group(1)}); GLARE only loads "
            "tensors and plain containers because unpickling can run code. Re-save just the state dict "
            "(torch.save(model.state_dict(), ...)) or convert it to .safetensors."
        ) from None
    except Exception as err:  # damaged data surfaces as KeyError, IndexError, RuntimeError ... from torch's reader
        detail = str(err).splitlines()[0] if str(err) else ""
        raise WeightsError(f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {detail}); it is "
                           "damaged or truncated: re-save or re-download it") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def _unwrap(state: Mapping[str, Any], branch: str) -> dict[str, Any]:
    """Descend through student/teacher and model/state_dict/module wrappers to a flat state dict."""
    while True:
        branches = [b for b in _BRANCHES if isinstance(state.get(b), Mapping)]
        if branches:
            if branch not in branches:
                raise WeightsError(f"checkpoint has no {branch!r} branch, only {branches}")
            state = state[branch]
            continue
        wrapper = next((w for w in _WRAPPERS if isinstance(state.get(w), Mapping)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    flat = {k.removeprefix("module."): v for k, v in state.items()}
    # DINOv2's full model state keeps both networks flat under "student." / "teacher.".
    if any(k.startswith(tuple(f"{b}." for b in _BRANCHES)) for k in flat):
        flat = {k[len(branch) + 1:]: v for k, v in flat.items() if k.startswith(f"{branch}.")}
    return flat


def _classify(key: str, prefix: str, model_keys: set[str] | None) -> tuple[str, str]:
    """Which part of a :class:`RemappedCheckpoint` ``key`` belongs to, and its name there."""
    rel = key[len(prefix):] if key.startswith(prefix) else None
    for candidate in filter(None, (rel, key)):
        for pattern in ADAPTER_KEYS:
            m = pattern.fullmatch(candidate)
            if m:
                return "adapters", f"{m.group(1)}.{m.group(2)}"
    if rel is not None and rel in _CLASSIFIER:
        # A classification layer is not part of the backbone unless the model has one.
        return ("backbone", rel) if model_keys is not None and rel in model_keys else ("dropped", key)
    if rel is not None and not rel.startswith(_HEAD_PREFIXES):
        return "backbone", rel
    name = key if rel is None else rel
    head = next((p for p in _HEAD_PREFIXES if name.startswith(p)), None)
    return ("head", name[len(head):]) if head else ("dropped", key)


def _canonical(backbone: dict[str, Tensor], dropped: list[str]) -> dict[str, Tensor]:
    """DINOv2 / UDI token names to timm's (``cls_token`` + ``reg_token``)."""
    out = {}
    for key, value in backbone.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    if "mask_token" in out:  # DINOv2/iBOT masking token, unused at inference
        del out["mask_token"]
        dropped.append("mask_token")
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
    cls = out.get("cls_token")
    if cls is not None and cls.ndim == 3 and cls.shape[1] > 1:
        # UDI: the extra class token(s) follow [CLS], which is where timm puts reg_token.
        extra = [cls[:, 1:]] + ([out["reg_token"]] if "reg_token" in out else [])
        out["cls_token"], out["reg_token"] = cls[:, :1].clone(), torch.cat(extra, dim=1)
    return out


def remap_checkpoint(
    state: Mapping[str, Any], model_keys: set[str] | None = None, branch: str = "teacher"
) -> RemappedCheckpoint:
    """Sort any supported checkpoint into timm backbone, DINO head and adapter state.

    Args:
        state: what :func:`load_state_file` returned (nested or flat).
        model_keys: the target model's ``state_dict()`` keys; used to keep a
            classification layer (``head.weight``) only when the model has one.
        branch: ``"teacher"`` (default) or ``"student"`` for checkpoints holding both.

    Raises:
        WeightsError: no ViT backbone found, or the requested branch is absent.
    """
    if branch not in _BRANCHES:
        raise WeightsError(f"branch must be one of {_BRANCHES}, got {branch!r}")
    flat = _unwrap(state, branch)
    # The ViT sits wherever its patch embedding is: "", "backbone.", "backbone.backbone." (UDI) ...
    anchors = [k[: len(k) - len(_ANCHOR)] for k in flat if k == _ANCHOR or k.endswith("." + _ANCHOR)]
    if not anchors:
        sample = ", ".join(list(flat)[:8])
        raise WeightsError(f"no ViT backbone in the checkpoint: no key ends in {_ANCHOR!r} (keys start: {sample})")
    prefix = min(anchors, key=len)
    parts: dict[str, dict[str, Tensor]] = {"backbone": {}, "head": {}, "adapters": {}}
    dropped: list[str] = []
    for key, value in flat.items():
        if not isinstance(value, Tensor):
            dropped.append(key)
            continue
        kind, name = _classify(key, prefix, model_keys)
        if kind == "dropped":
            dropped.append(key)
        else:
            parts[kind][name] = value
    backbone = _canonical(parts["backbone"], dropped)
    return RemappedCheckpoint(backbone, parts["head"], parts["adapters"], dropped)


def fit_pos_embed(
    state: dict[str, Tensor], vit: nn.Module, img_size: int | None = None, antialias: bool = False
) -> dict[str, Tensor]:
    """Fit a checkpoint's ``pos_embed`` (and prefix tokens) to ``vit``'s layout and grid.

    The checkpoint's table is read as ``r`` prefix positions (0 <= r <= its
    class + register tokens) followed by a square grid; the grid is resampled
    to the model's with timm's ``resample_abs_pos_embed`` (bicubic), the prefix
    positions are kept. Tokens without a stored position get a zero one. For a
    ``no_embed_class`` model the prefix positions are added to the tokens
    instead, which computes the same thing.

    Args:
        img_size: image size the checkpoint was trained at, to read its grid
            (``img_size // patch`` per side) when the table's length is
            ambiguous (tiny grids with many prefix tokens); default: the one
            square that fits.
        antialias: antialiased downsampling; off by default, as in DINO,
            DINOv2 and Hugging Face's Dinov2, so resampled tables match the
            features those checkpoints were used with.
    """
    if "pos_embed" not in state or getattr(vit, "pos_embed", None) is None:
        return state
    state = dict(state)
    pos = state["pos_embed"]
    token_keys = [k for k in ("cls_token", "reg_token") if k in state]
    n_prefix = sum(state[k].shape[1] for k in token_keys)
    length = pos.shape[1]
    if img_size:
        sides = [img_size // vit.patch_embed.patch_size[0]]
    else:  # every square grid that leaves room for at most n_prefix prefix positions
        sides = [s for s in range(math.isqrt(length), 0, -1) if length - s * s <= n_prefix]
    if len(sides) != 1 or not 0 <= length - sides[0] ** 2 <= n_prefix:
        raise WeightsError(f"cannot read pos_embed {tuple(pos.shape)} as a square grid (candidate sides {sides}) "
                           f"plus at most {n_prefix} prefix positions; pass the checkpoint's img_size")
    side = sides[0]
    rows = length - side * side
    prefix_pos, grid_pos = pos[:, :rows], pos[:, rows:]
    new_grid = [int(s) for s in vit.patch_embed.grid_size]
    if [side, side] != new_grid:
        grid_pos = resample_abs_pos_embed(grid_pos, new_size=new_grid, old_size=[side, side], num_prefix_tokens=0,
                                          antialias=antialias)
    if vit.no_embed_class:
        # This model gives prefix tokens no position: fold theirs into the tokens (as timm does for DINOv2).
        tokens = torch.cat([state[k] for k in token_keys], dim=1) if token_keys else None
        if tokens is not None and rows:
            tokens = torch.cat([tokens[:, :rows] + prefix_pos, tokens[:, rows:]], dim=1)
            sizes = [state[k].shape[1] for k in token_keys]
            state.update(zip(token_keys, torch.split(tokens, sizes, dim=1), strict=True))
        state["pos_embed"] = grid_pos
    else:
        pad = pos.new_zeros(1, n_prefix - rows, pos.shape[2])
        state["pos_embed"] = torch.cat([prefix_pos, pad, grid_pos], dim=1)
    return state


def _listing(label: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{label} ({len(items)}): {', '.join(items[:limit])}{more}"


def check_fit(vit: nn.Module, backbone: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise WeightsError if any key of ``backbone`` is missing from, unexpected in or mis-shaped for ``vit``.

    Reads only shapes, so ``vit`` may live on the meta device (the driver's preflight).
    The model's own adapter keys (``blocks.i.adapter.*``) are not required:
    adapters are loaded separately by the caller.
    """
    model_state = vit.state_dict()
    expected = {k for k in model_state if not any(p.fullmatch(k) for p in ADAPTER_KEYS)}
    missing = sorted(expected - backbone.keys())
    unexpected = sorted(backbone.keys() - expected)
    mismatched = sorted(f"{k} {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                        for k, v in backbone.items() if k in expected and v.shape != model_state[k].shape)
    problems = [_listing(label, items) for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                if items]
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(problems))


def load_strict(vit: nn.Module, backbone: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``backbone`` into ``vit``, raising if any key is missing, unexpected or mis-shaped (:func:`check_fit`)."""
    check_fit(vit, backbone, source)
    vit.load_state_dict(backbone, strict=False)  # strictness checked above, adapters aside


def _timm_hub_state(vit: nn.Module) -> dict[str, Tensor]:
    """The model's own pretrained weights from the timm / Hugging Face hub (needs a network)."""
    import timm

    cfg = getattr(vit, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        raise WeightsError("weights 'timm' need a model created by timm (it has no pretrained_cfg architecture)")
    name = f"{arch}.{tag}" if tag else arch
    try:
        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as err:  # hub/network failures come as many exception types; all mean "not available"
        raise WeightsError(f"weights 'timm' could not fetch {name!r} from the hub ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); offline, use 'imgfocus' or a "
                           "local checkpoint file") from None


def read_backbone(
    vit: nn.Module,
    source: str | Path,
    img_size: int | None = None,
    *,
    branch: str = "teacher",
    antialias: bool = False,
) -> RemappedCheckpoint:
    """Read, remap and fit a weights source to ``vit`` and check that it fits, without loading it.

    Everything :func:`load_backbone` does short of copying the tensors, so ``vit`` may be
    built on the meta device: the driver checks a weights source this way before any
    worker starts. Arguments as :func:`load_backbone`.
    """
    name = str(source)
    if name == "none":
        return RemappedCheckpoint({})
    if name == "imgfocus":
        state: Mapping[str, Any] = load_state_file(imgfocus_weights())
    elif name == "timm":
        state = _timm_hub_state(vit)
    elif Path(name).is_file():
        state = load_state_file(name)
    else:
        raise WeightsError(f"weights source {name!r} is neither 'imgfocus', 'timm', 'none' nor an existing file")
    remapped = remap_checkpoint(state, set(vit.state_dict()), branch=branch)
    remapped.backbone = fit_pos_embed(remapped.backbone, vit, img_size=img_size, antialias=antialias)
    check_fit(vit, remapped.backbone, source=f"weights {name!r}")
    return remapped


def load_backbone(
    vit: nn.Module,
    source: str | Path,
    img_size: int | None = None,
    *,
    branch: str = "teacher",
    antialias: bool = False,
) -> RemappedCheckpoint:
    """Load pretrained backbone weights into a timm ``VisionTransformer``, strictly.

    Args:
        vit: the target model (its grid and token layout decide the fitting).
        source: ``"imgfocus"`` (offline DINOv2-S/14-derived weights),
            ``"timm"`` (the model's own hub weights; needs a network),
            ``"none"`` (keep the random init), or a checkpoint file path.
        img_size: image size the checkpoint was trained at (see :func:`fit_pos_embed`).
        branch: for student/teacher checkpoints, which network to load.
        antialias: see :func:`fit_pos_embed`.

    Returns:
        The remapped checkpoint (backbone as loaded), so the caller can load
        the DINO head and adapters.

    Raises:
        WeightsError: unknown source, unreadable file, or any missing,
            unexpected or mis-shaped backbone key.
    """
    remapped = read_backbone(vit, source, img_size, branch=branch, antialias=antialias)
    if remapped.backbone:
        vit.load_state_dict(remapped.backbone, strict=False)  # check_fit checked every key, adapters aside
    return remapped
