"""Classification transfer on global ([CLS]-type) features: weighted k-NN and a linear classifier.

The k-NN rule follows the protocol of DINO (Caron et al., 2021): features are L2-normalised, each
test image finds its k most cosine-similar training images, and each neighbour votes for its own
class with weight exp(similarity / T). A small T lets the closest neighbours dominate; a large T
tends to an unweighted majority vote.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glare.data.sources import IMAGE_EXTENSIONS, folder_images, read_square_image
from glare.eval.linear_probe import FeatureFn, extract_features, seeded_batches

ClassSplit = tuple[Tensor, Tensor]


def _check_features(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int) -> None:
    """Readable errors for mismatched feature/label tensors."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D) with the same D, got {tuple(train_feats.shape)} "
            f"and {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (len(train_feats),) or train_labels.is_floating_point():
        raise ValueError(
            f"train_labels must be integer ({len(train_feats)},), got {train_labels.dtype} {tuple(train_labels.shape)}"
        )
    if len(train_feats) == 0:
        raise ValueError("no training features")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), got range "
            f"[{train_labels.min().item()}, {train_labels.max().item()}]"
        )


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Predict test classes by temperature-weighted votes of the k most cosine-similar training samples.

    Args:
        train_feats: (N, D) training features.
        train_labels: (N,) integer classes in [0, num_classes).
        test_feats: (M, D) features to classify.
        num_classes: number of classes C.
        k: neighbours per test sample (capped at N).
        temperature: T in the vote weight exp(cosine / T); must be > 0.
        chunk_size: test samples per similarity block, to bound memory at chunk_size x N.

    Returns:
        (M,) int64 predicted classes; ties go to the lowest class index.
    """
    _check_features(train_feats, train_labels, test_feats, num_classes)
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_feats), chunk_size):
        query = F.normalize(test_feats[start : start + chunk_size].float().to(train.device), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=train.device)
        # exp(sim / T) grows fast for small T; subtracting each row's max leaves the argmax unchanged.
        votes.scatter_add_(1, labels[idx], ((sims - sims[:, :1]) / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)


def linear_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
) -> Tensor:
    """Train a linear classifier (AdamW, cross-entropy) on centred, rescaled features and predict test classes.

    Features are centred on the training mean and divided by the training RMS norm; the
    initialisation and batch order come from ``seed`` alone, so the result is reproducible.

    Returns:
        (M,) int64 predicted classes.
    """
    _check_features(train_feats, train_labels, test_feats, num_classes)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    # One scale for all dimensions (not per-dimension z-scores, which would blow low-variance noise up to the
    # size of informative dimensions); it makes a single lr fit any feature magnitude.
    mean = train_feats.float().mean(0)
    scale = (train_feats.float() - mean).pow(2).sum(1).mean().sqrt().clamp(min=1e-6)
    x_train, x_test = (train_feats.float() - mean) / scale, (test_feats.float().to(mean.device) - mean) / scale
    labels = train_labels.long().to(x_train.device)

    generator = torch.Generator().manual_seed(seed)
    # skip_init + a seeded init: the default init would draw from (and advance) the global RNG.
    head = nn.utils.skip_init(nn.Linear, x_train.shape[1], num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    head = head.to(x_train.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for idx in seeded_batches(len(x_train), batch_size, steps, generator):
        idx = idx.to(x_train.device)
        loss = F.cross_entropy(head(x_train[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head(x_test).argmax(1).cpu()


def load_image_folder(root: str | Path, size: int) -> tuple[Tensor, Tensor, list[str]]:
    """Read ``root/<class>/<image>`` into square uint8 images (resize + centre crop).

    Classes are the sub-folders in sorted order; files without an image suffix
    (:data:`glare.data.sources.IMAGE_EXTENSIONS`) are skipped.

    Returns:
        images uint8 (N, 3, size, size), labels int64 (N,), class names.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no class folders, a class folder without images, an unreadable image, or size < 1.
    """
    root = Path(root)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/*.png|jpg)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = folder_images(root / name)
        if not files:
            raise ValueError(f"class folder {root / name} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        for path in files:
            images.append(torch.from_numpy(read_square_image(path, size)).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), classes


def evaluate_classification(
    feature_fn: FeatureFn,
    train: ClassSplit,
    test: ClassSplit,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    linear_steps: int = 200,
    linear_lr: float = 1e-2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    feature_batch_size: int = 32,
) -> dict[str, float | int]:
    """Top-1 accuracy of k-NN and of a linear classifier on frozen global features.

    Args:
        feature_fn: maps float images in [0, 1], (B, 3, S, S), to (B, D) features (e.g. the [CLS] token).
        train: uint8 images (N, 3, S, S) and int64 labels (N,).
        test: the same for the scored split.
        num_classes: number of classes C.
        k, temperature: the k-NN vote (see ``knn_classify``).
        linear_steps, linear_lr, seed: the linear classifier (see ``linear_classify``).

    Returns:
        {"knn_top1", "linear_top1"} as fractions, plus k, temperature, n_train, n_test, feature_dim.
    """
    for name, (images, labels) in (("train", train), ("test", test)):
        if labels.shape != (len(images),) or labels.is_floating_point():
            raise ValueError(
                f"{name} labels must be integer ({len(images)},), got {labels.dtype} {tuple(labels.shape)}"
            )
        if len(images) == 0:
            raise ValueError(f"{name} split is empty")
    train_feats = extract_features(feature_fn, train[0], feature_batch_size, device, ndim=2)
    test_feats = extract_features(feature_fn, test[0], feature_batch_size, device, ndim=2)
    test_labels = test[1].long().cpu()

    knn = knn_classify(train_feats, train[1], test_feats, num_classes, k, temperature)
    linear = linear_classify(train_feats, train[1], test_feats, num_classes, linear_steps, linear_lr, seed)
    return {
        "knn_top1": (knn == test_labels).float().mean().item(),
        "linear_top1": (linear == test_labels).float().mean().item(),
        "k": k,
        "temperature": temperature,
        "n_train": len(train_feats),
        "n_test": len(test_feats),
        "feature_dim": train_feats.shape[1],
    }
