"""glare.viz: each figure is a PNG of the documented pixel size, rows per model, deterministic; helpers are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glare.config import EvalConfig, load_config
from glare.data.mosaic import generate_mosaic
from glare.models import AdaptedViT, create_backbone
from glare.viz import (
    CELL,
    TITLE,
    attention_figure,
    attention_maps,
    colorize,
    figure_size,
    main,
    mosaic_samples_figure,
    palette,
    pca_figure,
    pca_rgb,
    probe_predictions,
    segmentation_figure,
)

HEADS = 3  # the tiny preset's ViT: 3 heads, 8 px patches, 32 px images -> a 4 x 4 grid
PROBE = EvalConfig(probe_steps=10, probe_batch_size=4, img_size=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> list[tuple[str, AdaptedViT]]:
    """Two different tiny random ViTs, labelled."""
    cfg = load_config("tiny").model
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append((f"seed{seed}", AdaptedViT(create_backbone(cfg), adapter_cfg=cfg.adapter).eval()))
    return out


@pytest.fixture(scope="module")
def mosaic() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """3-class 32 px mosaic splits as (uint8 (N, 3, S, S), int64 (N, S, S))."""
    def split(name: str, n: int):
        images, labels = generate_mosaic(num_classes=3, image_size=32, n=n, split=name)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()

    return {"train": split("train", 8), "val": split("val", 4)}


def _png(path) -> np.ndarray:
    """Read a written PNG back; it must be a real picture, not a blank canvas."""
    assert path.is_file() and path.stat().st_size > 0
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.std() > 10
    return pixels


def _size(pixels: np.ndarray) -> tuple[int, int]:
    return pixels.shape[1], pixels.shape[0]


@pytest.mark.parametrize("n_models", [1, 2])
def test_attention_figure_has_a_row_per_image_and_model(models, natural_images, n_models, tmp_path):
    images = natural_images(32)[:2]
    pixels = _png(attention_figure(models[:n_models], images, tmp_path / "attention.png"))
    assert _size(pixels) == figure_size(rows=2 * n_models, cols=1 + HEADS)


def test_compare_doubles_the_rows(models, natural_images, tmp_path):
    images = natural_images(32)[:2]
    one = _png(pca_figure(models[:1], images, tmp_path / "one.png"))
    two = _png(pca_figure(models, images, tmp_path / "two.png"))
    assert _size(one) == figure_size(rows=1, cols=4) and _size(two) == figure_size(rows=2, cols=4)
    assert two.shape[1] == one.shape[1] and two.shape[0] - one.shape[0] == CELL + TITLE


def test_figures_are_deterministic(models, natural_images, mosaic, tmp_path):
    images = natural_images(32)[:3]
    a = _png(pca_figure(models, images, tmp_path / "a.png"))
    b = _png(pca_figure(models, images, tmp_path / "b.png"))
    assert np.array_equal(a, b)
    # The segmentation figure trains a probe: it draws from PROBE's seed, not from the global RNG.
    seg = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        seg.append(_png(segmentation_figure(models, mosaic["val"][0][:2], mosaic["val"][1][:2], mosaic["train"], 3,
                                            ["a", "b", "c"], PROBE, tmp_path / f"seg{global_seed}.png")))
    assert np.array_equal(*seg)


@pytest.mark.parametrize("n_models", [1, 2])
def test_segmentation_figure(models, mosaic, n_models, tmp_path):
    images, labels = mosaic["val"][0][:2], mosaic["val"][1][:2]
    path = segmentation_figure(models[:n_models], images, labels, mosaic["train"], 3, ["a", "b", "c"], PROBE,
                               tmp_path / "seg.png")
    # 3 columns are wide enough for all 3 legend entries on one line, however many classes occur.
    assert _size(_png(path)) == figure_size(rows=2 * n_models, cols=3, legend=3)


def test_segmentation_figure_without_ground_truth(models, mosaic, tmp_path):
    path = segmentation_figure(models[:1], mosaic["val"][0][:2], None, mosaic["train"], 3, ["a", "b", "c"], PROBE,
                               tmp_path / "seg.png")
    assert _size(_png(path)) == figure_size(rows=2, cols=2, legend=3)


def test_mosaic_samples_figure(mosaic, tmp_path):
    images, labels = mosaic["val"]
    pixels = _png(mosaic_samples_figure(images, labels, ["a", "b", "c"], tmp_path / "m.png"))
    assert _size(pixels) == figure_size(rows=2, cols=4, legend=3)
    # The mask row shows the palette's class colours.
    colours = {tuple(c) for c in palette(3)}
    mask_panel = pixels[2 * TITLE + CELL + 10 : 2 * TITLE + 2 * CELL - 10, 10 : CELL - 10].reshape(-1, 3)
    assert {tuple(p) for p in mask_panel} <= colours


def test_figure_size_grows_with_panels_and_legend():
    w, h = figure_size(2, 3)
    assert figure_size(2, 4)[0] - w == CELL + 4 and figure_size(3, 3)[1] - h == CELL + TITLE
    assert figure_size(2, 3, legend=3)[1] > h and figure_size(2, 3, legend=30)[1] > figure_size(2, 3, legend=3)[1]


def test_attention_maps_are_softmax_weights_on_the_grid(models, natural_images):
    maps = attention_maps(models[0][1], natural_images(32)[:2])
    assert maps.shape == (2, HEADS, 4, 4)
    total = maps.sum(dim=(2, 3))  # the global token also attends to itself, so patches get < 1 in all
    assert (maps >= 0).all() and (total > 0).all() and (total <= 1 + 1e-5).all()


def test_pca_rgb_colours_feature_clusters():
    """Patches with equal features get equal colours; the three clusters get clearly different ones."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    clusters = torch.randint(0, 3, (2, 16), generator=g)
    clusters[0, :3] = torch.tensor([0, 1, 2])
    rgb = pca_rgb(centres[clusters], (4, 4))
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    flat, ids = rgb.reshape(-1, 3), clusters.flatten()
    for c in range(3):
        assert torch.allclose(flat[ids == c], flat[ids == c][0].expand_as(flat[ids == c]), atol=1e-5)
    means = torch.stack([flat[ids == c][0] for c in range(3)])
    assert torch.cdist(means, means).add(torch.eye(3)).min() > 0.3


def test_palette_and_colorize():
    colours = palette(25)
    assert colours.shape == (25, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 25 and np.array_equal(palette(3), colours[:3])
    picture = colorize(torch.tensor([[0, 1], [255, 2]]), colours[:3])
    assert picture[0, 0].tolist() == colours[0].tolist() and picture[1, 0].tolist() == [0, 0, 0]


def test_probe_predictions_learn_the_mosaic(models, mosaic):
    """Predicting the training images themselves: well above the 1/3 chance of 3 classes."""
    images, labels = mosaic["train"]
    pred = probe_predictions(models[0][1], mosaic["train"], images, 3, EvalConfig(probe_steps=60, probe_lr=1e-2))
    assert pred.shape == labels.shape and pred.min() >= 0 and pred.max() < 3
    assert (pred == labels).float().mean() > 0.5


def test_cli_writes_every_figure(tmp_path, capsys):
    mosaic = f"data.mosaic.cache_dir={tmp_path / 'mosaic'}"
    argv = ["--weights", "none", "--compare", "none", "--config", "tiny", mosaic, "eval.probe_steps=5",
            "--num-images", "2", "--out", str(tmp_path / "viz"), "--figures", "attention", "pca", "segmentation",
            "mosaic"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("attention", "pca", "segmentation", "mosaic_samples"):
        _png(tmp_path / "viz" / f"{name}.png")
        assert f"{name}.png" in printed
    assert _size(_png(tmp_path / "viz" / "attention.png")) == figure_size(rows=4, cols=1 + HEADS)


def test_cli_with_own_images(tmp_path, natural_images):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, image in enumerate(natural_images(40)[:2]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    argv = ["--weights", "none", "--config", "tiny", f"data.mosaic.cache_dir={tmp_path / 'mosaic'}",
            "eval.probe_steps=5", "--images", str(folder), "--out", str(tmp_path / "viz"), "--figures", "pca",
            "segmentation"]
    assert main(argv) == 0
    assert _size(_png(tmp_path / "viz" / "pca.png")) == figure_size(rows=1, cols=4)
    # No ground truth for own images: image and prediction only.
    seg = Image.open(tmp_path / "viz" / "segmentation.png").size
    assert seg[0] == figure_size(rows=2, cols=2)[0]


def test_cli_bad_weights_is_a_one_line_error(tmp_path, capsys):
    argv = ["--weights", str(tmp_path / "nope.safetensors"), "--config", "tiny",
            f"data.mosaic.cache_dir={tmp_path / 'mosaic'}", "--out", str(tmp_path / "viz")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.safetensors" in err and err.count("\n") == 1


def test_cli_own_images_need_no_labelled_set(tmp_path, natural_images):
    """Attention/PCA of own images must not read the labelled set (here one that cannot be opened)."""
    path = tmp_path / "cat.png"
    Image.fromarray(natural_images(32)[1].permute(1, 2, 0).numpy()).save(path)
    argv = ["--weights", "none", "--config", "tiny", "data.seg_format=generic", "--images", str(path),
            "--out", str(tmp_path / "viz"), "--figures", "attention"]
    assert main(argv) == 0
    assert _size(_png(tmp_path / "viz" / "attention.png")) == figure_size(rows=1, cols=1 + HEADS)
    argv[argv.index("attention")] = "segmentation"
    assert main(argv) == 2  # the probe does need it: a clean error naming the missing seg_root
