"""The mmseg protocol: the GlareViT backbone, layer-wise lr decay, the runner's config handling, and a
tiny end-to-end UperNet run on the mosaic (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("mmcv")
pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402

from glare.config import ModelConfig, MosaicConfig  # noqa: E402
from glare.data.mosaic import class_names, ensure_mosaic  # noqa: E402
from glare.eval.metrics import confusion_matrix, metrics_from_confusion  # noqa: E402
from glare.eval.mmseg import GlareIoUMetric, GlareViT  # noqa: E402
from glare.eval.mmseg.runner import (  # noqa: E402
    RESULT_FILE,
    _fit_channels,
    available_configs,
    build_config,
    main,
    resolve_config,
)
from glare.models import AdaptedViT, create_backbone  # noqa: E402
from glare.weights.export import save_export  # noqa: E402

TINY = ModelConfig(arch="vit_tiny_patch16_224", weights="none", img_size=32,
                   timm_kwargs={"embed_dim": 48, "depth": 4, "num_heads": 3, "patch_size": 8})
TINY_LEVELS = "model.backbone.out_indices=[0,1,2,3]"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores OpenMP contention made a step ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny AdaptedViT with non-zero adapters, exported in both layouts: (model, {layout: path})."""
    torch.manual_seed(0)
    model = AdaptedViT(create_backbone(TINY), adapter_cfg=TINY.adapter).eval()
    with torch.no_grad():  # zero-initialised adapters would hide a load that skipped them
        for p in model.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("exports")
    paths = {layout: save_export(model, out / f"tiny_{layout}.safetensors", TINY, layout=layout)
             for layout in ("timm", "mmseg")}
    return model, paths


@pytest.fixture(scope="module")
def mosaic_root(tmp_path_factory):
    return ensure_mosaic(MosaicConfig(image_size=64, train=8, val=4, unlabelled=0,
                                      cache_dir=str(tmp_path_factory.mktemp("mosaic"))))


def _backbone(checkpoint=None, out_indices=(0, 2, 3)) -> GlareViT:
    init_cfg = None if checkpoint is None else dict(type="Pretrained", checkpoint=str(checkpoint), prefix="backbone.")
    backbone = MODELS.build(dict(type="GlareViT", arch=TINY.arch, img_size=32, timm_kwargs=TINY.timm_kwargs,
                                 out_indices=out_indices, init_cfg=init_cfg))
    backbone.init_weights()
    return backbone.eval()


def _expected(model: AdaptedViT, images: torch.Tensor, blocks=(0, 2, 3)) -> list[torch.Tensor]:
    feats = model.features(images, blocks=blocks)
    return [feats.patch_map(h) for h in feats.hidden]


@pytest.mark.parametrize("layout", ["timm", "mmseg"])
def test_backbone_loads_export_and_matches_adapted_vit(tiny, layout):
    model, paths = tiny
    backbone = _backbone(paths[layout])
    assert backbone.embed_dim == 48 and backbone.out_indices == (0, 2, 3)
    assert all(p.requires_grad for p in backbone.parameters())  # fine-tuned, unlike pre-training
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        outs = backbone(images)
        expected = _expected(model, images)
        plain = _expected(AdaptedViT(model.vit).eval(), images)  # same ViT, zero adapters
        random = _backbone(None)(images)
    assert len(outs) == 3
    for out, exp, no_adapter, rand in zip(outs, expected, plain, random):
        assert out.shape == (2, 48, 4, 6)
        assert torch.equal(out, exp)
        assert (out - no_adapter).abs().max() > 1e-3  # the adapters were loaded and are used
        assert (out - rand).abs().max() > 1e-1


def test_config_preprocessor_feeds_the_backbone_unit_range(tiny, natural_images):
    """uint8 BGR images through the configs' data_preprocessor give exactly the features of RGB / 255."""
    model, paths = tiny
    cfg = Config.fromfile(str(resolve_config("upernet_mosaic")))
    with DefaultScope.overwrite_default_scope("mmseg"):
        preprocessor = MODELS.build(cfg.model.data_preprocessor)
    rgb = natural_images(32)[:2]
    batch = preprocessor(dict(inputs=list(rgb.flip(1)), data_samples=None), training=False)["inputs"]
    with torch.no_grad():
        outs = _backbone(paths["mmseg"])(batch)
        expected = _expected(model, rgb.float() / 255)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=0, atol=1e-6)


def test_backbone_resizes_sides_to_patch_multiples(tiny):
    model, paths = tiny
    images = torch.rand(1, 3, 30, 45)
    with torch.no_grad():
        outs = _backbone(paths["timm"])(images)
        resized = torch.nn.functional.interpolate(images, size=(32, 48), mode="bilinear", align_corners=False)
        expected = _expected(model, resized)
    assert outs[0].shape == (1, 48, 4, 6)
    for out, exp in zip(outs, expected):
        assert torch.equal(out, exp)


@pytest.mark.parametrize("out_indices", [(0, 4), (2, 1), ()])
def test_backbone_rejects_bad_out_indices(out_indices):
    with pytest.raises(ValueError, match="out_indices"):
        MODELS.build(dict(type="GlareViT", arch=TINY.arch, img_size=32, timm_kwargs=TINY.timm_kwargs,
                          out_indices=out_indices))


def test_layer_decay_groups_blocks_with_their_adapters():
    cfg = Config.fromfile(str(resolve_config("upernet_mosaic")))
    cfg.model.backbone.update(arch=TINY.arch, img_size=32, timm_kwargs=TINY.timm_kwargs, out_indices=(0, 1, 2, 3))
    _fit_channels(cfg.model, 48)
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(cfg.model)
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type="GlareLayerDecayOptimizerConstructor",
        optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        paramwise_cfg=dict(decay_rate=0.5)))
    groups = constructor(model).optimizer.param_groups
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(setting) == sum(len(g["params"]) for g in groups) == len(named)  # each parameter once
    lr = {name: setting[id(p)][0] for name, p in named.items()}
    wd = {name: setting[id(p)][1] for name, p in named.items()}
    for i in range(4):  # depth 4: block i is layer i + 1, lr = 1e-3 * 0.5 ** (5 - (i + 1))
        assert lr[f"backbone.vit.blocks.{i}.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5 ** (4 - i))
        assert lr[f"backbone.adapters.{i}.down.weight"] == lr[f"backbone.vit.blocks.{i}.attn.qkv.weight"]
    assert lr["backbone.vit.pos_embed"] == lr["backbone.vit.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**5)
    assert lr["backbone.vit.norm.weight"] == lr["decode_head.conv_seg.weight"] == pytest.approx(1e-3)
    assert wd["backbone.vit.blocks.0.attn.qkv.weight"] == wd["decode_head.conv_seg.weight"] == 0.05
    assert wd["backbone.vit.pos_embed"] == wd["backbone.vit.cls_token"] == wd["decode_head.conv_seg.bias"] == 0.0
    assert wd["backbone.vit.blocks.0.norm1.weight"] == 0.0


def test_iou_metric_fractions_match_confusion_matrix():
    torch.manual_seed(1)
    metric = GlareIoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=("a", "b", "c", "d"))
    target = torch.randint(0, 3, (3, 16, 16))  # class "d" never occurs: IoU NaN -> None
    target[0, :2] = 255
    pred = torch.where(torch.rand(3, 16, 16) < 0.6, target, torch.randint(0, 3, (3, 16, 16))).clamp(max=2)
    pred[target == 255] = 0
    metric.process({}, [dict(pred_sem_seg=dict(data=p[None]), gt_sem_seg=dict(data=t[None]))
                        for p, t in zip(pred, target)])
    summary = metric.evaluate(3)
    ref = metrics_from_confusion(confusion_matrix(pred, target, 4))
    fr = metric.fractions
    assert fr["mIoU"] == pytest.approx(ref.miou) and fr["aAcc"] == pytest.approx(ref.aacc)
    assert [fr["IoU"][c] for c in "abc"] == pytest.approx(ref.per_class_iou[:3])
    assert fr["IoU"]["d"] is None
    assert summary["mIoU"] == pytest.approx(100 * ref.miou, abs=0.006)  # mmseg: percent, 2 decimals


def test_build_config_fits_channels_schedule_and_data(tiny, mosaic_root, tmp_path):
    _, paths = tiny
    cfg = build_config(paths["mmseg"], "upernet_mosaic", data_root=mosaic_root, work_dir=tmp_path, iters=6,
                       batch_size=2, num_workers=0, cfg_options={"model.backbone.out_indices": [0, 1, 2, 3]})
    model = cfg.model
    assert model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(paths["mmseg"]), prefix="backbone.")
    assert model.neck.in_channels == [48] * 4 and model.neck.out_channels == 48
    assert model.decode_head.in_channels == [48] * 4 and model.auxiliary_head.in_channels == 48
    # the 100-iteration warm-up of 2000 shrinks below 2 iterations and is dropped; the decay spans the run
    assert [(s.type, s.begin, s.end) for s in cfg.param_scheduler] == [("PolyLR", 0, 6)]
    assert cfg.train_cfg.max_iters == 6 and cfg.train_dataloader.batch_size == 2
    assert cfg.val_dataloader.dataset.data_root == str(mosaic_root)
    assert not cfg.train_dataloader.persistent_workers

    fpn = Config.fromfile(str(resolve_config("fpn_ade20k")))
    _fit_channels(fpn.model, 768)
    first, second = fpn.model.neck
    assert first.in_channels == [768] * 4 and first.out_channels == 768 and second.in_channels == [768] * 4
    assert fpn.model.decode_head.in_channels == [256] * 4  # reads the FPN, whose width is the config's


def test_configs_cover_the_protocol():
    assert {"upernet_ade20k", "upernet_cityscapes", "upernet_pascal_context59", "upernet_loveda", "upernet_mosaic",
            "fpn_ade20k"} <= set(available_configs())
    expected = {
        "upernet_ade20k": ("ADE20KDataset", 150, 160000),
        "upernet_cityscapes": ("CityscapesDataset", 19, 80000),
        "upernet_pascal_context59": ("PascalContextDataset59", 59, 80000),
        "upernet_loveda": ("LoveDADataset", 7, 80000),
        "upernet_mosaic": ("GlareMosaicDataset", 10, 2000),
    }
    for name, (dataset, classes, iters) in expected.items():
        cfg = Config.fromfile(str(resolve_config(name)))
        assert cfg.train_dataloader.dataset.type == dataset
        assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == classes
        assert cfg.train_cfg.max_iters == iters and cfg.param_scheduler[-1].end == iters
        assert cfg.model.data_preprocessor.mean == [0.0] * 3 and cfg.model.data_preprocessor.std == [255.0] * 3
        assert cfg.optim_wrapper.constructor == "GlareLayerDecayOptimizerConstructor"


def test_main_reports_bad_input(tiny, mosaic_root, tmp_path, capsys):
    _, paths = tiny
    base = ["--weights", str(paths["timm"]), "--work-dir", str(tmp_path)]
    assert main(base + ["--config", "upernet_nowhere"]) == 2
    assert "upernet_ade20k" in capsys.readouterr().err  # lists the configs there are
    assert main(base + ["--config", "upernet_cityscapes", "--data-root", str(tmp_path / "none")]) == 2
    assert "no image folder" in capsys.readouterr().err
    # the default out_indices (3, 5, 7, 11) do not exist in the 4-block export
    assert main(base + ["--config", "upernet_mosaic", "--data-root", str(mosaic_root)]) == 2
    assert "out_indices" in capsys.readouterr().err
    assert main(base + ["--config", "upernet_mosaic", "--data-root", str(mosaic_root), "--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_upernet_on_mosaic(tiny, mosaic_root, tmp_path, capsys):
    _, paths = tiny
    rc = main(["--weights", str(paths["mmseg"]), "--config", "upernet_mosaic", "--data-root", str(mosaic_root),
               "--work-dir", str(tmp_path), "--iters", "6", "--batch-size", "2", "--num-workers", "0",
               "--cfg-options", TINY_LEVELS, "model.decode_head.channels=32", "model.auxiliary_head.channels=16"])
    assert rc == 0
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert result["iters"] == 6 and result["weights"] == str(paths["mmseg"])
    assert list(result["per_class_iou"]) == class_names(10)
    ious = [v for v in result["per_class_iou"].values() if v is not None]
    assert ious and all(0.0 <= v <= 1.0 for v in ious)
    assert math.isfinite(result["mIoU"]) and 0.0 <= result["mIoU"] <= 1.0
    assert result["mIoU"] == pytest.approx(sum(ious) / len(ious))
    assert 0.0 < result["aAcc"] <= 1.0
    assert "mIoU" in capsys.readouterr().out
