"""Classification transfer: weighted k-NN, linear classifier, the image-folder reader, the end-to-end call."""

import numpy as np
import pytest
import torch
from PIL import Image

from glare.eval.knn import evaluate_classification, knn_classify, linear_classify, load_image_folder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds sync cost, which explodes on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clusters(n_per_class: int, num_classes: int = 4, dim: int = 16, noise: float = 0.2, seed: int = 0):
    """Gaussian clusters around orthogonal centres (separable), with their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = torch.eye(dim)[labels] * 3 + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_separable_clusters_are_classified_perfectly():
    train, train_labels = clusters(25, seed=0)
    test, test_labels = clusters(10, seed=1)
    knn = knn_classify(train, train_labels, test, num_classes=4, k=20, temperature=0.07)
    linear = linear_classify(train, train_labels, test, num_classes=4, steps=100, lr=1e-2, seed=0)
    assert knn.dtype == torch.int64 and knn.shape == (40,)
    assert torch.equal(knn, test_labels)
    assert torch.equal(linear, test_labels)


def test_knn_uses_cosine_similarity_not_distance():
    train = torch.tensor([[1.0, 0.0], [5.0, 3.0]])
    test = torch.tensor([[10.0, 1.0]])  # nearer to class 1 in L2 (5.4 vs 9.1), but at a smaller angle to class 0
    assert torch.cdist(test, train).argmin().item() == 1
    assert knn_classify(train, torch.tensor([0, 1]), test, num_classes=2, k=1).tolist() == [0]


# One class-0 neighbour very close to the query, three class-1 neighbours a little further away.
ANGLES = torch.tensor([0.05, 0.5, 0.55, 0.6, 3.0])
NEIGHBOURS = torch.stack([ANGLES.cos(), ANGLES.sin()], 1)
NEIGHBOUR_LABELS = torch.tensor([0, 1, 1, 1, 0])
QUERY = torch.tensor([[1.0, 0.0]])


def test_k_decides_between_nearest_and_majority():
    def predict(k: int) -> int:
        return knn_classify(NEIGHBOURS, NEIGHBOUR_LABELS, QUERY, num_classes=2, k=k, temperature=1.0).item()

    assert predict(1) == 0  # the single nearest neighbour is class 0
    assert predict(4) == 1  # three of the four nearest are class 1 and, at T = 1, their weights are similar
    assert predict(100) == 1  # k larger than the training set is capped at N


def test_temperature_trades_proximity_for_votes():
    def predict(temperature: float) -> int:
        return knn_classify(NEIGHBOURS, NEIGHBOUR_LABELS, QUERY, 2, k=4, temperature=temperature).item()

    # Relative to the nearest (class 0, weight 1), the class-1 weights are exp(-0.121/T), exp(-0.146/T) and
    # exp(-0.173/T); their sum passes 1 near T = 0.135, where the vote flips from proximity to majority.
    assert predict(0.01) == 0
    assert predict(0.07) == 0
    assert predict(0.2) == 1
    assert predict(10.0) == 1


def test_tiny_temperature_does_not_overflow():
    feats, labels = clusters(5, seed=0)
    preds = knn_classify(feats, labels, feats, num_classes=4, k=5, temperature=1e-4)
    assert torch.equal(preds, labels)


def test_linear_classify_is_deterministic_and_leaves_global_rng():
    feats, labels = clusters(10, noise=2.0, seed=2)  # overlapping clusters: the seed can matter
    state = torch.random.get_rng_state()
    a = linear_classify(feats, labels, feats, 4, steps=30, lr=1e-2, seed=7)
    b = linear_classify(feats, labels, feats, 4, steps=30, lr=1e-2, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda f, y: knn_classify(f, y, f[:, :3], 4), "same D"),
        (lambda f, y: knn_classify(f, y[:5], f, 4), "train_labels must be integer"),
        (lambda f, y: knn_classify(f, y, f, 3), r"lie in \[0, 3\)"),
        (lambda f, y: knn_classify(f, y, f, 4, k=0), "k must be >= 1"),
        (lambda f, y: knn_classify(f, y, f, 4, temperature=0.0), "temperature > 0"),
        (lambda f, y: linear_classify(f, y, f, 4, steps=0), "steps and batch_size"),
    ],
)
def test_bad_input_is_named(call, match):
    feats, labels = clusters(3)
    with pytest.raises(ValueError, match=match):
        call(feats, labels)


COLOURS = {"blue": (20, 20, 220), "green": (20, 200, 20), "red": (220, 20, 20)}


def write_tree(root, per_class: int = 3) -> None:
    """root/<colour>/<i>.png|jpg, each a noisy image of that colour, of varying size and aspect."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 4 * i, 28 - 2 * i
            pixels = np.clip(np.array(rgb) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    (root / "red" / "notes.txt").write_text("not an image")


def test_image_folder_reader(tmp_path):
    write_tree(tmp_path)
    images, labels, names = load_image_folder(tmp_path, size=16)
    assert names == ["blue", "green", "red"]
    assert images.shape == (9, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mean_colour = images.float().mean((2, 3))
    assert mean_colour.argmax(1).tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]  # blue, green, red channels dominate


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_image_folder(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path, 16)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.md").write_text("")
    with pytest.raises(ValueError, match="cats holds no"):
        load_image_folder(tmp_path, 16)
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, 16)


def test_evaluate_classification_end_to_end(tmp_path):
    write_tree(tmp_path / "train", per_class=4)
    write_tree(tmp_path / "test", per_class=2)
    train_images, train_labels, _ = load_image_folder(tmp_path / "train", 16)
    test_images, test_labels, _ = load_image_folder(tmp_path / "test", 16)

    def mean_colour(x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) - 0.3  # centred a little, so cosine similarity separates the colours

    scores = evaluate_classification(
        mean_colour,
        (train_images, train_labels),
        (test_images, test_labels),
        num_classes=3,
        k=3,
        temperature=0.1,
        linear_steps=60,
    )
    assert scores["knn_top1"] == 1.0 and scores["linear_top1"] == 1.0
    assert (scores["n_train"], scores["n_test"], scores["feature_dim"], scores["k"]) == (12, 6, 3, 3)

    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 3)  # carries no information: every test image gets the same answer

    blind = evaluate_classification(
        constant, (train_images, train_labels), (test_images, test_labels), 3, k=3, linear_steps=20
    )
    assert blind["knn_top1"] == pytest.approx(1 / 3) and blind["linear_top1"] == pytest.approx(1 / 3)

    with pytest.raises(ValueError, match="2-d tensor"):
        evaluate_classification(lambda x: x, (train_images, train_labels), (test_images, test_labels), 3)
