"""Pictures of what a (GLARE-adapted) ViT sees: attention maps, feature PCA, linear-probe segmentations.

``python -m glare.viz --weights W [--compare W2] [--config PRESET] [key=value ...] [--images PATH ...]
[--out DIR] [--size N]`` writes, per model (one set of rows each, so ``--compare`` shows the
initialisation and the adapted model one above the other):

- ``attention.png``: the last block's global-token -> patch attention of every head (cf. the paper's Fig. 2/4);
- ``pca.png``: the first three principal components of the patch features as RGB, the PCA fitted jointly
  over the shown images (cf. Fig. 5);
- ``segmentation.png``: image, ground truth and the prediction of a linear probe trained on the labelled
  train split (BatchNorm + 1x1 conv, :mod:`glare.eval.linear_probe`);
- ``mosaic_samples.png`` (``--figures mosaic``): labelled images and their masks.

Every figure function takes models and tensors and returns the path it wrote; panel sizes are fixed in
pixels (:func:`figure_size`), and the same inputs and seed give the same picture.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor, nn

from glare.config import ConfigError, EvalConfig, GlareConfig, load_config
from glare.data.sources import IMAGE_EXTENSIONS, folder_images, read_square_image
from glare.eval.linear_probe import extract_features, train_head

# Panel geometry in pixels (figures are drawn at DPI, so inches = pixels / DPI).
DPI = 100
CELL = 128  # one square image panel
PAD = 4  # gap around panels
TITLE = 16  # strip above each row of panels for titles
LEGEND_ROW = 14  # one line of the class legend
LEGEND_COL = 120  # width given to one legend entry
IGNORE_INDEX = 255
FIGURES = ("attention", "pca", "segmentation", "mosaic")
MOSAIC_SAMPLES = 4

NamedModels = Sequence[tuple[str, nn.Module]]


# ----------------------------------------------------------------------------- layout


def _legend_rows(entries: int, width: int) -> int:
    """Lines a legend of ``entries`` class swatches needs in a figure ``width`` pixels wide."""
    if entries == 0:
        return 0
    per_row = max(1, width // LEGEND_COL)
    return -(-entries // per_row)


def figure_size(rows: int, cols: int, legend: int = 0, cell: int = CELL) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``rows`` x ``cols`` panels and a ``legend``-entry class legend."""
    width = cols * cell + (cols + 1) * PAD
    footer = _legend_rows(legend, width) * LEGEND_ROW + (PAD if legend else 0)
    return width, rows * (cell + TITLE) + PAD + footer


def _panel_figure(rows: int, cols: int, legend: int = 0, cell: int = CELL) -> tuple[Figure, list[list[Axes]]]:
    """A figure of square, axis-free panels placed at exact pixel positions (no tight-bbox resizing)."""
    width, height = figure_size(rows, cols, legend, cell)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = []
    for r in range(rows):
        row = []
        top = r * (cell + TITLE) + TITLE  # pixels from the figure's top to the panel's top
        for c in range(cols):
            left = PAD + c * (cell + PAD)
            ax = fig.add_axes((left / width, 1 - (top + cell) / height, cell / width, cell / height))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG at its exact pixel size, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


def _title(ax: Axes, text: str) -> None:
    ax.set_title(text, fontsize=7, pad=2)


def _show_image(ax: Axes, image: Tensor) -> None:
    """Draw a uint8 (3, H, W) image."""
    ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="bilinear")


# ----------------------------------------------------------------------------- colours


def palette(num_classes: int) -> np.ndarray:
    """A fixed (num_classes, 3) uint8 class palette: tab20 (strong hues first), then seeded random colours."""
    tab = (np.asarray(colormaps["tab20"].colors) * 255).round().astype(np.uint8)
    tab = np.concatenate([tab[0::2], tab[1::2]])  # the 10 saturated colours before their light variants
    extra = np.random.default_rng(0).integers(0, 256, (max(0, num_classes - len(tab)), 3), dtype=np.uint8)
    return np.concatenate([tab, extra])[:num_classes]


def colorize(labels: Tensor, colours: np.ndarray) -> np.ndarray:
    """(H, W) class indices as an (H, W, 3) uint8 picture; the ignore index and unknown classes are black."""
    lab = labels.cpu().numpy().astype(np.int64)
    known = (lab >= 0) & (lab < len(colours))
    out = np.zeros((*lab.shape, 3), np.uint8)
    out[known] = colours[lab[known]]
    return out


def _legend(fig: Figure, present: Sequence[int], class_names: Sequence[str], colours: np.ndarray) -> None:
    """Class swatches along the bottom strip that :func:`figure_size` reserved for them."""
    if not present:
        return
    width = fig.get_figwidth() * DPI
    per_row = max(1, int(width) // LEGEND_COL)
    handles = [Patch(color=colours[c] / 255, label=class_names[c]) for c in present]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 0), ncol=per_row, frameon=False, fontsize=7,
               handlelength=1.2, handleheight=0.8, borderaxespad=0.2, labelspacing=0.2, columnspacing=0.8)


def _present(*maps: Tensor, num_classes: int) -> list[int]:
    """Sorted classes that occur in any of the label maps."""
    values = torch.cat([m.flatten().cpu() for m in maps]).unique()
    return [int(v) for v in values if 0 <= v < num_classes]


# ----------------------------------------------------------------------------- model outputs


def _as_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) to float in [0, 1] (float input is passed through)."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def attention_maps(model: nn.Module, images: Tensor, global_token: int = 0) -> Tensor:
    """The last block's attention from prefix token ``global_token`` to each patch: (B, heads, rows, cols)."""
    f = model.features(_as_float(images).to(_device(model)), attention=True, global_token=global_token)
    return f.cls_attn.reshape(*f.cls_attn.shape[:2], *f.grid).float().cpu()


def pca_rgb(patches: Tensor, grid: tuple[int, int], quantile: float = 0.01) -> Tensor:
    """Map patch features (B, N, D) to RGB (B, rows, cols, 3) in [0, 1] by their first 3 principal components.

    The PCA is fitted jointly over all B images, so one colour means one direction in feature space
    across the whole figure. Each component is stretched between its ``quantile`` and ``1 - quantile``
    values (robust to a few outlier tokens) and its sign is fixed so that its largest loading is
    positive (SVD leaves it arbitrary).
    """
    b, n, d = patches.shape
    x = patches.reshape(b * n, d).double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:3]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    proj = x @ (comps * sign).T
    if proj.shape[1] < 3:  # fewer than 3 feature dimensions or samples: pad with zero components
        proj = F.pad(proj, (0, 3 - proj.shape[1]))
    lo, hi = torch.quantile(proj, quantile, dim=0), torch.quantile(proj, 1 - quantile, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    return rgb.reshape(b, *grid, 3).float()


def probe_predictions(model: nn.Module, train: tuple[Tensor, Tensor], images: Tensor, num_classes: int,
                      ev: EvalConfig) -> Tensor:
    """Train the linear probe's head (BatchNorm + 1x1 conv) on ``train`` and predict ``images``.

    ``images`` are resized to the train images' size so that the head's upsampling fits; the
    predictions come at the train labels' resolution, (B, H, W) int64.
    """
    device = _device(model)
    feature_fn = partial(model.dense_features, last_blocks=ev.last_blocks)
    size = tuple(train[0].shape[-2:])
    shown = images if tuple(images.shape[-2:]) == size else _resize_uint8(images, size)
    train_feats = extract_features(feature_fn, train[0], ev.probe_batch_size, device)
    head, _ = train_head(train_feats, train[1].to(device), num_classes, ev.probe_steps, ev.probe_lr,
                         ev.probe_batch_size, ev.seed)
    with torch.no_grad():
        return head(extract_features(feature_fn, shown, ev.probe_batch_size, device)).argmax(1).cpu()


def _resize_uint8(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (antialiased) resize of uint8 images, staying uint8."""
    out = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- figures


def attention_figure(models: NamedModels, images: Tensor, path: str | Path, global_token: int = 0) -> Path:
    """Image + one heat map per head of the last block's global-token attention.

    One row per (image, model), the models of one image on adjacent rows; columns are the
    image and the heads (of the model with the most heads). Each map has its own colour scale.
    """
    maps = [attention_maps(model, images, global_token) for _, model in models]
    cols = 1 + max(m.shape[1] for m in maps)
    fig, axes = _panel_figure(len(images) * len(models), cols)
    for i, image in enumerate(images):
        for j, ((name, _), attn) in enumerate(zip(models, maps)):
            row = axes[i * len(models) + j]
            _show_image(row[0], image)
            _title(row[0], f"{name} · image {i + 1}")
            for h in range(attn.shape[1]):
                row[1 + h].imshow(attn[i, h].numpy(), cmap="inferno", interpolation="nearest")
                _title(row[1 + h], f"head {h + 1}")
    return _save(fig, path)


def pca_figure(models: NamedModels, images: Tensor, path: str | Path) -> Path:
    """Each image beside the RGB of its patch features' first 3 principal components; one row per model."""
    fig, axes = _panel_figure(len(models), 2 * len(images))
    for row, (name, model) in zip(axes, models):
        with torch.no_grad():
            f = model.features(_as_float(images).to(_device(model)))
        rgb = pca_rgb(f.patches.float().cpu(), f.grid)
        for i, image in enumerate(images):
            _show_image(row[2 * i], image)
            _title(row[2 * i], f"{name} · image {i + 1}")
            row[2 * i + 1].imshow(rgb[i].numpy(), interpolation="nearest")
            _title(row[2 * i + 1], "PCA 1-3 → RGB")
    return _save(fig, path)


def segmentation_figure(models: NamedModels, images: Tensor, labels: Tensor | None, train: tuple[Tensor, Tensor],
                        num_classes: int, class_names: Sequence[str], ev: EvalConfig, path: str | Path) -> Path:
    """Image, ground truth (when ``labels`` is given) and each model's linear-probe prediction.

    The probe is trained on ``train`` (uint8 images, int64 labels) exactly as the evaluation does
    (``ev``: steps, lr, batch size, seed, last blocks). One row per (image, model).
    """
    preds = [probe_predictions(model, train, images, num_classes, ev) for _, model in models]
    colours = palette(num_classes)
    shown = [labels] if labels is not None else []
    present = _present(*shown, *preds, num_classes=num_classes)
    cols = 3 if labels is not None else 2
    fig, axes = _panel_figure(len(images) * len(models), cols, legend=len(present))
    for i, image in enumerate(images):
        for j, ((name, _), pred) in enumerate(zip(models, preds)):
            row = axes[i * len(models) + j]
            _show_image(row[0], image)
            _title(row[0], f"image {i + 1}")
            if labels is not None:
                row[1].imshow(colorize(labels[i], colours), interpolation="nearest")
                _title(row[1], "ground truth")
            row[-1].imshow(colorize(pred[i], colours), interpolation="nearest")
            _title(row[-1], f"{name} · linear probe")
    _legend(fig, present, class_names, colours)
    return _save(fig, path)


def mosaic_samples_figure(images: Tensor, labels: Tensor, class_names: Sequence[str], path: str | Path) -> Path:
    """Labelled images (top row) above their colour-coded masks (bottom row), with a class legend."""
    colours = palette(len(class_names))
    present = _present(labels, num_classes=len(class_names))
    fig, axes = _panel_figure(2, len(images), legend=len(present))
    for i, (image, lab) in enumerate(zip(images, labels)):
        _show_image(axes[0][i], image)
        _title(axes[0][i], f"image {i + 1}")
        axes[1][i].imshow(colorize(lab, colours), interpolation="nearest")
        _title(axes[1][i], "mask")
    _legend(fig, present, class_names, colours)
    return _save(fig, path)


# ----------------------------------------------------------------------------- command line


def load_images(paths: Sequence[str | Path], size: int) -> Tensor:
    """Image files (or every image in given folders, sorted) as uint8 (N, 3, size, size): resize + centre crop."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += folder_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    if not files:
        raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    return torch.stack([torch.from_numpy(read_square_image(f, size)).permute(2, 0, 1) for f in files])


def model_name(weights: str) -> str:
    """A short row label for a weights argument: the init's name or the file's stem."""
    return Path(weights).stem if Path(weights).suffix else weights


def load_models(weights: Sequence[str], cfg: GlareConfig, device: str) -> list[tuple[str, nn.Module]]:
    """Build one AdaptedViT per weights argument; random inits are seeded with ``eval.seed``."""
    from glare.models.pretrained import load_encoder
    from glare.weights.export import arch_notice

    models = []
    for w in weights:
        if notice := arch_notice(w, cfg.model):
            print(notice, flush=True)
        torch.manual_seed(cfg.eval.seed)  # "none" (random init) draws from the global RNG
        models.append((model_name(w), load_encoder(w, cfg.model, device=device).eval()))
    return models


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m glare.viz",
        description="Attention maps, feature PCA and linear-probe segmentations of one or two ViTs as PNGs.",
    )
    parser.add_argument("--weights", required=True,
                        help="GLARE export (.safetensors) or an init: imgfocus, none, timm, a checkpoint path")
    parser.add_argument("--compare", help="second weights, drawn in rows below the first (e.g. the init)")
    parser.add_argument("--config", default="default",
                        help="YAML preset (path or name in configs/; 'none': built-in defaults). Default: default")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config dot-overrides")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="image files or folders (default: the labelled set's val split)")
    parser.add_argument("--num-images", type=int, default=3, help="how many images to show (default: 3)")
    parser.add_argument("--size", type=int, help="image size fed to the models (default: eval.img_size)")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES[:3]),
                        help="which PNGs to write (default: attention pca segmentation)")
    parser.add_argument("--out", default="viz", help="output folder (default: ./viz)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    """Load config, models and images and write the requested figures; returns the paths written."""
    from glare.eval.protocol import load_probe_data

    cfg = load_config(None if args.config == "none" else args.config, args.overrides)
    size = args.size or cfg.eval.img_size
    if size < 8 or args.num_images < 1:
        raise ValueError(f"--size must be >= 8 and --num-images >= 1, got {size} and {args.num_images}")
    weights = [args.weights] + ([args.compare] if args.compare else [])
    models = load_models(weights, cfg, args.device)  # first: a bad weights file fails before any data is read
    # The labelled set is read only when a figure needs it (own images + attention/PCA do not).
    needs_data = not args.images or {"segmentation", "mosaic"} & set(args.figures)
    data = load_probe_data(cfg.data, cfg.eval) if needs_data else None
    if args.images:
        images, labels = load_images(args.images, size)[: args.num_images], None
    else:
        images, labels = data.val[0][: args.num_images], data.val[1][: args.num_images]
        h, w = images.shape[-2:]
        if size != min(h, w):  # short side to --size, the frame's aspect kept (non-square sets)
            images = _resize_uint8(images, (round(h * size / min(h, w)), round(w * size / min(h, w))))
    out = Path(args.out)
    written = []
    if "attention" in args.figures:
        written.append(attention_figure(models, images, out / "attention.png", cfg.model.global_token))
    if "pca" in args.figures:
        written.append(pca_figure(models, images, out / "pca.png"))
    if "segmentation" in args.figures:
        written.append(segmentation_figure(models, images, labels, data.train, data.num_classes, data.class_names,
                                           cfg.eval, out / "segmentation.png"))
    if "mosaic" in args.figures:
        written.append(mosaic_samples_figure(data.val[0][:MOSAIC_SAMPLES], data.val[1][:MOSAIC_SAMPLES],
                                             data.class_names, out / "mosaic_samples.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m glare.viz``; user errors print one ``error:`` line and return 2."""
    args = parse_args(argv)
    try:
        written = run(args)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
