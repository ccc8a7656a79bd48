"""The fast linear segmentation probe on frozen features: GLARE's tuning objective (method.md §5).

The backbone is frozen, so its features are computed once for the train and val images and cached;
a head (BatchNorm2d + 1x1 Conv2d) is then trained for a fixed number of AdamW steps with
cross-entropy on logits upsampled bilinearly to the label resolution, and scored by mIoU on the
val split at label resolution. Nothing is tuned on val: no early stopping, BatchNorm statistics
come from the train split only. Same inputs and seed give the same number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glare.eval.metrics import confusion_matrix, metrics_from_confusion

FeatureFn = Callable[[Tensor], Tensor]
Split = tuple[Tensor, Tensor]


@dataclass
class ProbeResult:
    """Scores of one probe run; IoU values are fractions, NaN for classes absent from val and predictions."""

    miou: float
    aacc: float
    macc: float
    per_class_iou: list[float]
    class_names: list[str]
    steps: int
    feature_dim: int
    seconds: float  # the whole call, feature extraction included
    feature_seconds: float  # the part spent in feature_fn
    train_loss: float  # mean cross-entropy over the last (up to) 10 steps
    confusion: Tensor = field(repr=False)  # (C, C) int64, rows = val targets, columns = predictions

    def table(self) -> str:
        """A per-class IoU table (in %) with the summary scores, for printing."""
        width = max(5, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>6}", f"{'-' * width}  {'-' * 6}"]
        for name, iou in zip(self.class_names, self.per_class_iou, strict=True):
            lines.append(f"{name:<{width}}  {'n/a' if math.isnan(iou) else f'{100 * iou:.2f}':>6}")
        lines.append(
            f"mIoU {100 * self.miou:.2f}  aAcc {100 * self.aacc:.2f}  mAcc {100 * self.macc:.2f}  "
            f"({self.steps} steps, {self.feature_dim}-dim features, {self.seconds:.1f} s)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready summary: NaN becomes None; the confusion matrix is left out to keep reports small."""

        def clean(value):
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return {f.name: clean(getattr(self, f.name)) for f in fields(self) if f.name != "confusion"}


@contextmanager
def _eval_mode(feature_fn: FeatureFn) -> Iterator[None]:
    """Put an nn.Module feature function in eval mode for the duration, then restore its mode."""
    module = feature_fn if isinstance(feature_fn, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


@torch.no_grad()
def extract_features(
    feature_fn: FeatureFn, images: Tensor, batch_size: int = 32, device: str | torch.device = "cpu", ndim: int = 4
) -> Tensor:
    """Run a frozen feature function over uint8 images in chunks, without gradients.

    Args:
        feature_fn: maps float images in [0, 1], (B, 3, H, W), to features with batch dimension B.
            An nn.Module is switched to eval mode while it runs.
        images: uint8 (N, 3, H, W).
        batch_size: images per call of feature_fn.
        device: where images are sent and features are kept.
        ndim: the number of dimensions the features must have (4: (B, C, h, w), 2: (B, D)).

    Returns:
        float32 features (N, ...) on ``device``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    chunks = []
    with _eval_mode(feature_fn):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).float().div_(255)
            feats = feature_fn(batch)
            if not isinstance(feats, Tensor) or feats.ndim != ndim or feats.shape[0] != len(batch):
                shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise ValueError(f"feature_fn must return a {ndim}-d tensor with {len(batch)} rows, got {shape}")
            if not torch.isfinite(feats).all():
                raise ValueError("feature_fn returned non-finite values (NaN or inf)")
            chunks.append(feats.detach().float().to(device))
    return torch.cat(chunks)


def _check_split(name: str, split: Split, num_classes: int, ignore_index: int) -> None:
    """Readable errors for a malformed (images, labels) pair, before any time is spent on features."""
    if not (isinstance(split, Sequence) and len(split) == 2):
        raise ValueError(f"{name} must be a pair (images, labels)")
    images, labels = split
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.ndim != 3 or len(labels) != len(images):
        raise ValueError(
            f"{name} labels must be int64 (N, H, W) with N={len(images)}, got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(images) == 0:
        raise ValueError(f"{name} split is empty")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"{name} labels hold values outside [0, {num_classes}) other than ignore_index={ignore_index}: "
            f"{labels[bad].unique()[:10].tolist()}"
        )


def _interpolation_matrix(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in) weights of 1-d linear interpolation, exactly as F.interpolate computes them.

    Bilinear upsampling is separable, so ``A_h @ x @ A_w.T`` equals ``F.interpolate(x, mode="bilinear")``.
    The matmul form is used because its backward is deterministic on CUDA (F.interpolate's uses atomics)
    and it is also a little faster on the CPU.
    """
    eye = torch.eye(size_in).unsqueeze(0)
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T.contiguous()


class _Upsample(nn.Module):
    """Bilinear resize of (B, K, h, w) logits to the label resolution (H, W)."""

    def __init__(self, feature_hw: tuple[int, int], label_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _interpolation_matrix(feature_hw[0], label_hw[0]))
        self.register_buffer("cols", _interpolation_matrix(feature_hw[1], label_hw[1]))

    def forward(self, logits: Tensor) -> Tensor:
        return self.rows @ logits @ self.cols.T


def _make_head(feature_dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """BatchNorm2d + 1x1 Conv2d; the conv is initialised from ``generator`` so the global RNG is untouched."""
    # skip_init: the default init would draw from the global RNG (and be overwritten anyway).
    conv = nn.utils.skip_init(nn.Conv2d, feature_dim, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01, generator=generator)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.BatchNorm2d(feature_dim), conv)


def seeded_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` batches drawn without replacement from successive seeded shuffles of range(n)."""
    batch_size = min(batch_size, n)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


@contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """Ask cuDNN for deterministic kernels (the conv weight gradient) for the duration, then restore."""
    previous = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous


def train_head(
    feats: Tensor,
    labels: Tensor,
    num_classes: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    ignore_index: int = 255,
    weight_decay: float = 1e-2,
) -> tuple[nn.Module, float]:
    """Train BatchNorm + 1x1 conv on cached features (N, C, h, w) against labels (N, H, W).

    Returns:
        The head followed by the upsampling to (H, W), in eval mode, and the mean loss of the last 10 steps.
    """
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(
        _make_head(feats.shape[1], num_classes, generator), _Upsample(feats.shape[-2:], labels.shape[-2:])
    ).to(feats.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    head.train()
    for idx in seeded_batches(len(feats), batch_size, steps, generator):
        idx = idx.to(feats.device)
        target = labels[idx]
        # Sum over valid pixels / their count: a batch with no labelled pixel gives loss 0, not NaN.
        valid = (target != ignore_index).sum().clamp(min=1)
        loss = F.cross_entropy(head(feats[idx]), target, ignore_index=ignore_index, reduction="sum") / valid
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return head.eval(), torch.stack(losses[-10:]).mean().item()


@torch.no_grad()
def predict_confusion(
    head: nn.Module, feats: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255, batch_size: int = 16
) -> Tensor:
    """Confusion matrix (C, C) of the head's argmax predictions at label resolution."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(feats), batch_size):
        pred = head(feats[start : start + batch_size]).argmax(1)
        cm += confusion_matrix(pred, labels[start : start + batch_size], num_classes, ignore_index)
    return cm


def linear_probe(
    feature_fn: FeatureFn,
    train: Split,
    val: Split,
    num_classes: int,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
    feature_batch_size: int = 32,
    weight_decay: float = 1e-2,
) -> ProbeResult:
    """Fit a linear segmentation head on frozen features and report val mIoU at label resolution.

    Args:
        feature_fn: maps float images in [0, 1], (B, 3, H, W), to frozen features (B, C, h, w); the caller
            picks the blocks (e.g. concatenates the last n). An nn.Module is put in eval mode while it runs.
        train: uint8 images (N, 3, H, W) and int64 labels (N, H, W), any size (non-square too).
        val: the same for the split that is scored.
        num_classes: number of classes C; labels are in [0, C) or ``ignore_index``.
        steps: AdamW steps on the head.
        lr: AdamW learning rate.
        batch_size: images per step.
        seed: fixes the head initialisation and the batch order.
        ignore_index: label value with no loss and no score.
        device: where features are cached and the head trains.
        class_names: C names for the table; defaults to "0".."C-1".
        feature_batch_size: images per call of feature_fn.
        weight_decay: AdamW weight decay.
    """
    if num_classes < 1 or steps < 1 or batch_size < 1 or feature_batch_size < 1:
        raise ValueError(
            "num_classes, steps, batch_size and feature_batch_size must be >= 1, got "
            f"{num_classes}, {steps}, {batch_size}, {feature_batch_size}"
        )
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries for num_classes={num_classes}")
    _check_split("train", train, num_classes, ignore_index)
    _check_split("val", val, num_classes, ignore_index)

    start = time.perf_counter()
    train_feats = extract_features(feature_fn, train[0], feature_batch_size, device)
    val_feats = extract_features(feature_fn, val[0], feature_batch_size, device)
    if train_feats.shape[1:] != val_feats.shape[1:]:
        raise ValueError(f"train and val feature shapes differ: {train_feats.shape[1:]} vs {val_feats.shape[1:]}")
    feature_seconds = time.perf_counter() - start

    with _deterministic_cudnn():
        head, train_loss = train_head(
            train_feats, train[1].to(device), num_classes, steps, lr, batch_size, seed, ignore_index, weight_decay
        )
        cm = predict_confusion(head, val_feats, val[1].to(device), num_classes, ignore_index, batch_size)
    scores = metrics_from_confusion(cm)
    return ProbeResult(
        miou=scores.miou,
        aacc=scores.aacc,
        macc=scores.macc,
        per_class_iou=scores.per_class_iou,
        class_names=names,
        steps=steps,
        feature_dim=train_feats.shape[1],
        seconds=time.perf_counter() - start,
        feature_seconds=feature_seconds,
        train_loss=train_loss,
        confusion=cm,
    )


def probe_confusions(
    feature_fn: FeatureFn,
    train: Split,
    val: Split,
    num_classes: int,
    seeds: Sequence[int],
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    weight_decay: float = 1e-2,
) -> Tensor:
    """Per-image confusion matrices of one linear head per seed, on features extracted once.

    The same protocol as :func:`linear_probe` (a head of seed s here is the head ``linear_probe(seed=s)``
    trains); kept per image and per seed so that two models can be compared image by image
    (:func:`glare.eval.metrics.paired_miou_difference`) with the probe's own randomness averaged out.

    Returns:
        int64 (len(seeds), N_val, C, C), rows targets.
    """
    _check_split("train", train, num_classes, ignore_index)
    _check_split("val", val, num_classes, ignore_index)
    train_feats = extract_features(feature_fn, train[0], device=device)
    val_feats = extract_features(feature_fn, val[0], device=device)
    labels = val[1].to(device)
    out = []
    with _deterministic_cudnn():
        for seed in seeds:
            head, _ = train_head(train_feats, train[1].to(device), num_classes, steps, lr, batch_size, seed,
                                 ignore_index, weight_decay)
            out.append(torch.stack([predict_confusion(head, val_feats[i:i + 1], labels[i:i + 1], num_classes,
                                                      ignore_index) for i in range(len(val_feats))]))
    return torch.stack(out)
