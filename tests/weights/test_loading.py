"""Checkpoint remapping and strict loading, on tiny random timm ViTs saved in each format."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from glare.weights.loading import (
    WeightsError,
    fit_pos_embed,
    load_backbone,
    load_state_file,
    load_strict,
    read_backbone,
    remap_checkpoint,
)


def tiny_vit(img_size: int = 64, seed: int | None = None, **kwargs) -> nn.Module:
    """A 2-block ViT on a 4x4 grid; with ``seed``, every parameter is made clearly non-trivial."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, embed_dim=64, depth=2,
                            num_heads=2, num_classes=0, dynamic_img_size=True, **kwargs).eval()
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in vit.parameters():  # timm's init leaves tokens ~1e-6: too small to catch a mix-up
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return vit


def features(vit: nn.Module, size: int = 64) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vit.forward_features(x)


class DinoHead(nn.Module):
    """DINO's projection head layout: mlp -> L2 norm -> weight-normed prototypes."""

    def __init__(self, dim: int = 64, out_dim: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 48), nn.GELU(), nn.Linear(48, 16))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(16, out_dim, bias=False))


class NotATensor:
    """Any custom class: unpickling it would need code from outside torch."""


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_plain_timm_file_loads_exactly(tmp_path: Path, suffix: str) -> None:
    src = tiny_vit(seed=1)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        save_file(src.state_dict(), path)
    dst = tiny_vit(seed=2)
    out = load_backbone(dst, path)
    assert torch.equal(features(dst), features(src))
    assert out.head == {} and out.adapters == {}
    assert set(out.backbone) == set(src.state_dict())


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dict(tmp_path: Path, wrapper: str) -> None:
    src = tiny_vit(seed=1)
    torch.save({wrapper: prefixed(src.state_dict(), "module."), "epoch": 7}, tmp_path / "w.pth")
    dst = tiny_vit(seed=2)
    out = load_backbone(dst, tmp_path / "w.pth")
    assert torch.equal(features(dst), features(src))
    assert "epoch" not in out.dropped  # the wrapper's siblings are never looked at


def test_classifier_is_dropped_for_a_headless_model(tmp_path: Path) -> None:
    src = tiny_vit(seed=1)
    state = {**src.state_dict(), "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "cls.pth")
    dst = tiny_vit(seed=2)
    out = load_backbone(dst, tmp_path / "cls.pth")
    assert torch.equal(features(dst), features(src))
    assert sorted(out.dropped) == ["head.bias", "head.weight"]


def dino_checkpoint(teacher: nn.Module, student: nn.Module, head: nn.Module | None) -> dict:
    """What DINO's main_dino.py saves: DDP student, plain teacher, args as a Namespace."""
    t_state = prefixed(teacher.state_dict(), "backbone.")
    s_state = prefixed(prefixed(student.state_dict(), "backbone."), "module.")
    if head is not None:
        t_state.update(prefixed(head.state_dict(), "head."))
        s_state.update(prefixed(prefixed(head.state_dict(), "head."), "module."))
    return {"student": s_state, "teacher": t_state, "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=32)}


def test_dino_checkpoint_teacher_student_and_head(tmp_path: Path) -> None:
    teacher, student, head = tiny_vit(seed=1), tiny_vit(seed=2), DinoHead()
    torch.save(dino_checkpoint(teacher, student, head), tmp_path / "checkpoint.pth")

    dst = tiny_vit(seed=3)
    out = load_backbone(dst, tmp_path / "checkpoint.pth")
    assert torch.equal(features(dst), features(teacher))
    fresh = DinoHead()
    fresh.load_state_dict(out.head, strict=True)
    assert set(out.head) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                             "last_layer.parametrizations.weight.original0",
                             "last_layer.parametrizations.weight.original1"}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in head.state_dict().items())

    load_backbone(dst, tmp_path / "checkpoint.pth", branch="student")
    assert torch.equal(features(dst), features(student))


def test_dino_checkpoint_without_head_and_old_weight_norm_names() -> None:
    teacher = tiny_vit(seed=1)
    out = remap_checkpoint({"teacher": prefixed(teacher.state_dict(), "backbone.")})
    assert out.head == {} and set(out.backbone) == set(teacher.state_dict())
    old_head = {"head.last_layer.weight_g": torch.ones(32, 1), "head.last_layer.weight_v": torch.randn(32, 16)}
    out = remap_checkpoint({"teacher": {**prefixed(teacher.state_dict(), "backbone."), **old_head}})
    assert set(out.head) == {"last_layer.weight_g", "last_layer.weight_v"}


def test_missing_branch_is_named() -> None:
    state = {"student": prefixed(tiny_vit().state_dict(), "module.backbone.")}
    with pytest.raises(WeightsError, match="no 'teacher' branch"):
        remap_checkpoint(state)


def test_udi_two_class_tokens_become_cls_and_reg_token(tmp_path: Path) -> None:
    src = tiny_vit(seed=1, reg_tokens=1)  # timm: both prefix tokens get a position (no_embed_class=False)
    assert src.pos_embed.shape == (1, 2 + 16, 64)
    vit_state = src.state_dict()
    vit_state["cls_token"] = torch.cat([vit_state["cls_token"], vit_state.pop("reg_token")], dim=1)  # (1, 2, D)
    # UDI: MultiCropWrapper(UDIWrapper(vit, attn=MaskedAttention), DINOHead); the ViT one level deeper.
    extra = {"backbone.attn.qkv.weight": torch.randn(192, 64)}
    teacher = {**prefixed(vit_state, "backbone.backbone."), **extra, **prefixed(DinoHead().state_dict(), "head.")}
    torch.save({"student": prefixed(teacher, "module."), "teacher": teacher}, tmp_path / "udi.pth")

    dst = tiny_vit(seed=2, reg_tokens=1)
    out = load_backbone(dst, tmp_path / "udi.pth")
    assert torch.equal(features(dst), features(src))
    assert out.backbone["cls_token"].shape == out.backbone["reg_token"].shape == (1, 1, 64)
    assert out.dropped == ["backbone.attn.qkv.weight"]
    assert "mlp.0.weight" in out.head

    with pytest.raises(WeightsError, match="unexpected keys.*reg_token"):
        load_backbone(tiny_vit(), tmp_path / "udi.pth")  # a model without the second token


def dinov2_register_checkpoint(seed: int) -> tuple[nn.Module, dict]:
    """A DINOv2-with-registers network as timm module + DINOv2's own checkpoint layout."""
    net = tiny_vit(seed=seed, reg_tokens=2)
    with torch.no_grad():
        net.pos_embed[:, 1:3] = 0  # DINOv2's registers carry no position
    s = net.state_dict()
    ckpt = {k: v for k, v in s.items() if k not in ("reg_token", "pos_embed")}
    ckpt.update(register_tokens=s["reg_token"], pos_embed=torch.cat([s["pos_embed"][:, :1], s["pos_embed"][:, 3:]], 1),
                mask_token=torch.zeros(1, 64))
    return net, ckpt


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_dinov2_registers(tmp_path: Path, no_embed_class: bool) -> None:
    net, ckpt = dinov2_register_checkpoint(seed=1)
    save_file(ckpt, tmp_path / "dinov2.safetensors")
    dst = tiny_vit(seed=2, reg_tokens=2, no_embed_class=no_embed_class)
    out = load_backbone(dst, tmp_path / "dinov2.safetensors")
    assert torch.allclose(features(dst), features(net), atol=1e-5)
    assert out.dropped == ["mask_token"]
    if no_embed_class:  # same result as timm's own DINOv2 conversion
        ref = tiny_vit(reg_tokens=2, no_embed_class=True)
        ref.load_state_dict(checkpoint_filter_fn(dict(ckpt), ref))
        assert torch.allclose(features(dst), features(ref), atol=1e-5)


def test_adapters_are_returned_apart(tmp_path: Path) -> None:
    src = tiny_vit(seed=1)
    adapters = nn.ModuleList(nn.ModuleDict({"down": nn.Linear(64, 8), "up": nn.Linear(8, 64)}) for _ in range(2))
    flat = {**src.state_dict(), **{f"blocks.{k.split('.', 1)[0]}.adapter.{k.split('.', 1)[1]}": v
                                   for k, v in adapters.state_dict().items()}}
    nested = {**prefixed(src.state_dict(), "vit."), **prefixed(adapters.state_dict(), "adapters.")}
    for i, state in enumerate((flat, nested)):
        torch.save(state, tmp_path / f"export{i}.pth")
        dst = tiny_vit(seed=2)
        out = load_backbone(dst, tmp_path / f"export{i}.pth")
        assert torch.equal(features(dst), features(src))
        fresh = nn.ModuleList(nn.ModuleDict({"down": nn.Linear(64, 8), "up": nn.Linear(8, 64)}) for _ in range(2))
        fresh.load_state_dict(out.adapters, strict=True)
        assert torch.equal(fresh[1]["up"].weight, adapters[1]["up"].weight)


def test_missing_key_is_listed(tmp_path: Path) -> None:
    state = tiny_vit(seed=1).state_dict()
    del state["blocks.1.norm1.weight"]
    torch.save(state, tmp_path / "m.pth")
    dst = tiny_vit(seed=2)
    before = features(dst)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): blocks\.1\.norm1\.weight"):
        load_backbone(dst, tmp_path / "m.pth")
    assert torch.equal(features(dst), before)  # nothing was loaded


def test_unexpected_key_and_shape_mismatch_are_listed(tmp_path: Path) -> None:
    state = tiny_vit(seed=1).state_dict()
    state["blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "u.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): blocks\.0\.extra\.weight"):
        load_backbone(tiny_vit(), tmp_path / "u.pth")
    torch.save(tiny_vit(seed=1).state_dict(), tmp_path / "s.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches.*blocks\.0\.mlp\.fc1\.weight \(256, 64\) vs model"):
        load_backbone(tiny_vit(mlp_ratio=2.0), tmp_path / "s.pth")


def test_pickle_with_arbitrary_object_is_refused(tmp_path: Path) -> None:
    torch.save({"pos_embed": torch.zeros(1), "meta": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="arbitrary Python objects.*NotATensor"):
        load_state_file(tmp_path / "evil.pth")


def test_bad_files_and_sources(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="neither 'imgfocus', 'timm', 'none' nor an existing file"):
        load_backbone(tiny_vit(), tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="not found"):
        load_state_file(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights file type '.npz'"):
        load_state_file(tmp_path / "w.npz")
    torch.save(torch.zeros(3), tmp_path / "t.pth")
    with pytest.raises(WeightsError, match="holds a Tensor"):
        load_state_file(tmp_path / "t.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="junk.safetensors is not a complete safetensors file"):
        load_state_file(tmp_path / "junk.safetensors")
    # Files that are no checkpoint at all are named as such (they used to surface as KeyError / IndexError).
    (tmp_path / "junk.pth").write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(WeightsError, match=r"junk.pth is not a torch checkpoint \(neither a zip archive nor a pickle"):
        load_state_file(tmp_path / "junk.pth")
    (tmp_path / "damaged.pth").write_bytes(b"\x80\x04" + b"garbage" * 20)
    with pytest.raises(WeightsError, match="cannot read .*damaged.pth as a torch checkpoint"):
        load_state_file(tmp_path / "damaged.pth")
    good = tmp_path / "good.pth"
    torch.save(tiny_vit(seed=1).state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.pth"):
        load_state_file(tmp_path / "cut.pth")


def test_read_backbone_checks_the_fit_on_the_meta_device(tmp_path: Path) -> None:
    """What the driver's preflight does: shapes only, no memory for the model, nothing loaded."""
    torch.save(tiny_vit(seed=1).state_dict(), tmp_path / "s.pth")
    with torch.device("meta"):
        good, other = tiny_vit(), tiny_vit(mlp_ratio=2.0)
    assert read_backbone(good, tmp_path / "s.pth").backbone  # fits
    assert good.blocks[0].mlp.fc1.weight.is_meta  # and nothing was loaded
    with pytest.raises(WeightsError, match=r"shape mismatches.*blocks\.0\.mlp\.fc1\.weight"):
        read_backbone(other, tmp_path / "s.pth")
    with pytest.raises(WeightsError, match="no ViT backbone"):
        remap_checkpoint({"conv1.weight": torch.zeros(1)})


def test_none_keeps_the_random_init() -> None:
    dst = tiny_vit(seed=2)
    before = features(dst)
    assert load_backbone(dst, "none").backbone == {}
    assert torch.equal(features(dst), before)


def test_pos_embed_is_resampled_to_the_model_grid(tmp_path: Path) -> None:
    src = tiny_vit(img_size=64, seed=1)  # 4x4 grid
    torch.save(src.state_dict(), tmp_path / "v.pth")
    dst = tiny_vit(img_size=96, seed=2)  # 6x6 grid
    load_backbone(dst, tmp_path / "v.pth")
    assert dst.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # class position kept
    expected = resample_abs_pos_embed(src.pos_embed[:, 1:], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=0,
                                      antialias=False)
    assert torch.allclose(dst.pos_embed[:, 1:], expected)
    # With antialias=True: the same table timm's dynamic-size forward builds on the fly (it antialiases).
    dst_aa = tiny_vit(img_size=96, seed=2)
    load_backbone(dst_aa, tmp_path / "v.pth", antialias=True)
    assert torch.allclose(features(dst_aa, 96), features(src, 96), atol=1e-5)
    assert not torch.allclose(features(dst, 96), features(src, 96), atol=1e-5)


def test_img_size_disambiguates_the_grid() -> None:
    src = tiny_vit(img_size=32, seed=1, reg_tokens=4)  # 2x2 grid + 5 prefix positions = 9, also a 3x3 grid
    dst = tiny_vit(img_size=32, reg_tokens=4)
    with pytest.raises(WeightsError, match=r"candidate sides \[3, 2\].*pass the checkpoint's img_size"):
        fit_pos_embed(src.state_dict(), dst)
    load_strict(dst, fit_pos_embed(src.state_dict(), dst, img_size=32))
    assert torch.equal(features(dst, 32), features(src, 32))


def test_timm_source_copies_the_hub_model(monkeypatch: pytest.MonkeyPatch) -> None:
    hub, dst = tiny_vit(seed=5), tiny_vit(seed=2)
    calls = []

    def fake_create_model(name: str, pretrained: bool = False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return hub

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    load_backbone(dst, "timm")
    assert calls == [("vit_tiny_patch16_224.augreg_in21k_ft_in1k", True, {"num_classes": 0})]
    assert torch.equal(features(dst), features(hub))

    def offline(*args, **kwargs):
        raise OSError("We have no connection")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="could not fetch .*offline, use 'imgfocus'"):
        load_backbone(dst, "timm")
