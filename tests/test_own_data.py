"""Your own data: a generic labelled tree described from config, whole non-square frames, the
materialise decision, one-line errors naming file and key, and train + eval from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glare.config import ConfigError, load_config
from glare.data.pretrain import decide_materialize
from glare.data.segmentation import IGNORE_INDEX, DataError, load_arrays, open_segmentation
from glare.eval.__main__ import main as eval_main
from glare.eval.protocol import load_probe_data, open_probe_sets

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("road", "grass", "sky")
COLOURS = np.array([[90, 90, 90], [40, 160, 40], [120, 170, 250]], np.uint8)
W, H = 96, 48  # 2:1 frames


def _frame(seed: int, void_value: int = 255, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 96x48 image of three vertical class bands (noisy colours) and its mask, with a void strip on top."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(16, W - 16, 2))
    labels = np.searchsorted(cuts, np.arange(W), side="right")[None].repeat(H, 0).astype(np.uint8)
    image = np.clip(COLOURS[labels].astype(np.int16) + rng.integers(-20, 21, (H, W, 3)), 0, 255)
    mask = labels + offset
    mask[:4] = void_value
    return image.astype(np.uint8), mask.astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(root: Path, split: str, name: str, seed: int, void_value: int = 255, offset: int = 0) -> None:
    """``root/split/{images,masks}/name.png`` from :func:`_frame`."""
    image, mask = _frame(seed, void_value, offset)
    _save(image, root / split / "images" / f"{name}.png")
    _save(mask, root / split / "masks" / f"{name}.png")


def make_tree(root: Path, n_train: int = 6, n_test: int = 4, n_unlabelled: int = 12) -> Path:
    """root/{train,test}/{images,masks}, root/class_names.txt and root/unlabelled/*.png, all 96x48."""
    for i in range(n_train):
        _pair(root, "train", f"t{i}", seed=i)
    for i in range(n_test):
        _pair(root, "test", f"e{i}", seed=100 + i)
    (root / "class_names.txt").write_text("# one class a line\n" + "\n".join(CLASSES) + "\n")
    for i in range(n_unlabelled):
        _save(_frame(200 + i)[0], root / "unlabelled" / f"u{i}.png")
    return root


def _keys(root: Path, *extra: str) -> list[str]:
    return ["data.seg_format=generic", f"data.seg_root={root}", "data.seg_eval_split=test", *extra]


# ---------------------------------------------------------------------------- the classes and labels


def test_class_names_file_sets_the_classes_and_void_pixels_are_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    train, test = open_probe_sets(load_config("tiny", _keys(root)).data)
    assert train.class_names == test.class_names == list(CLASSES)
    assert (len(train), len(test)) == (6, 4)
    labels = test.labels(0)
    assert (labels[:4] == IGNORE_INDEX).all() and set(np.unique(labels[4:]).tolist()) == {0, 1, 2}


def test_names_from_config_beat_the_file_and_a_count_alone_numbers_them(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    train, _ = open_probe_sets(load_config("tiny", _keys(root, "data.seg_class_names=[a,b,c]")).data)
    assert train.class_names == ["a", "b", "c"]
    (root / "class_names.txt").unlink()
    train, _ = open_probe_sets(load_config("tiny", _keys(root, "data.seg_num_classes=4")).data)
    assert train.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_zero_as_void_and_another_ignore_value(tmp_path: Path) -> None:
    """Masks 1..3 with 0 void; then masks 0..2 with void written as 7: both load as 0..2 and 255."""
    _pair(tmp_path / "a", "train", "x", seed=0, void_value=0, offset=1)
    _pair(tmp_path / "a", "val", "y", seed=1, void_value=0, offset=1)
    ds = open_segmentation("generic", tmp_path / "a", "train", 3, zero_is_void=True)
    _pair(tmp_path / "b", "train", "x", seed=0, void_value=7)
    other = open_segmentation("generic", tmp_path / "b", "train", 3, ignore_index=7)
    assert np.array_equal(ds.labels(0), other.labels(0))
    assert (ds.labels(0)[:4] == IGNORE_INDEX).all() and ds.labels(0)[4:].max() == 2
    plain = open_segmentation("generic", tmp_path / "a", "train", 3)  # 0 is a class, 3 is out of range
    with pytest.raises(DataError, match="label values \\[3\\] outside \\[0, 3\\)"):
        plain.labels(0)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("extra, setup, needles", [
    # A mask value beyond the classes: the mask file and the keys that define the classes.
    ((), "bad_label", ("masks/t2.png", "label values [5]", "data.seg_num_classes (3)", "data.seg_ignore_index")),
    # An image without a mask: the file and the split key.
    ((), "unpaired", ("data.seg_train_split='train'", "image(s) without a mask", "lonely.png")),
    # A split that does not exist: the key and the splits there are.
    (("data.seg_eval_split=val",), None, ("data.seg_eval_split='val'", "splits found: test, train")),
    # Names and count disagree: the file and the key.
    (("data.seg_num_classes=4",), None, ("data.seg_num_classes=4", "class_names.txt names 3 classes")),
    # No classes anywhere: the keys and the files to add.
    ((), "no_names", ("data.seg_num_classes", "data.seg_class_names", "class_names.txt")),
    # A void value that is a class.
    (("data.seg_ignore_index=1",), None, ("data.seg_ignore_index=1 is a class value",)),
])
def test_reader_errors_are_one_line_naming_file_and_key(tmp_path, extra, setup, needles) -> None:
    root = make_tree(tmp_path)
    if setup == "bad_label":
        mask = np.array(Image.open(root / "train/masks/t2.png"))
        mask[10, 10] = 5
        Image.fromarray(mask).save(root / "train/masks/t2.png")
    elif setup == "unpaired":
        _pair(root, "train", "lonely", seed=9)
        (root / "train/masks/lonely.png").unlink()
    elif setup == "no_names":
        (root / "class_names.txt").unlink()
    with pytest.raises(DataError) as err:
        open_probe_sets(load_config("tiny", _keys(root, *extra)).data, check_labels=True)
    message = _one_line(err)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("override, needle", [
    ("data.seg_eval_split=train", "config key 'data.seg_eval_split': must differ from data.seg_train_split"),
    ("data.seg_num_classes=300", "config key 'data.seg_num_classes': must be in [0, 255)"),
    ("data.seg_class_names=[a,a]", "config key 'data.seg_class_names': names must be distinct"),
    ("data.materialize=sometimes", "config key 'data.materialize': must be 'auto', 'true' or 'false'"),
    ("data.seg_ignore_index=-1", "config key 'data.seg_ignore_index'"),
])
def test_config_checks_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert needle in _one_line(err)


def test_eval_cli_reports_a_bad_set_in_one_line(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "set")
    (root / "test/masks/e1.png").unlink()
    argv = ["linear", "--weights", "none", "--config", "tiny", *_keys(root), "--out", str(tmp_path / "r.json")]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.seg_eval_split='test'" in err and "e1.png" in err


# ---------------------------------------------------------------------------- whole frames


def test_whole_frame_by_default_and_square_crop_on_request(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    data = load_probe_data(load_config("tiny", _keys(root)).data, load_config("tiny").eval, multiple=8)
    assert data.train[0].shape == (6, 3, 32, 64) and data.val[1].shape == (4, 32, 64)
    assert data.num_classes == 3 and data.class_names == list(CLASSES)
    # Every class band survives: the whole frame is kept (a centre square of a 2:1 frame can lose one).
    full = open_segmentation("generic", root, "train", 3)
    for i in range(len(full)):
        assert set(data.train[1][i].unique().tolist()) == set(np.unique(full.labels(i)).tolist())
    square = load_probe_data(load_config("tiny", _keys(root, "eval.square_crop=true")).data,
                             load_config("tiny", ["eval.square_crop=true"]).eval)
    assert square.train[0].shape == (6, 3, 32, 32)


def test_frame_shape_rounds_the_long_side_and_keeps_portrait(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    ds = open_segmentation("generic", root, "train", 3)
    assert ds.frame_shape(32) == (32, 64) and ds.frame_shape(30, multiple=14) == (30, 56)
    portrait = tmp_path / "p"
    for split in ("train",):
        for kind in ("images", "masks"):
            (portrait / split / kind).mkdir(parents=True)
            Image.new("L" if kind == "masks" else "RGB", (30, 90)).save(portrait / split / kind / "a.png")
    ds = open_segmentation("generic", portrait, "train", 3)
    assert ds.frame_shape(20) == (60, 20)
    images, labels = load_arrays(ds, ds.frame_shape(20))
    assert images.shape == (1, 3, 60, 20) and labels.shape == (1, 60, 20)


def test_square_sets_give_the_same_arrays_either_way(tmp_path: Path) -> None:
    """The mosaic is square: whole-frame and centre-crop loading agree pixel for pixel (its numbers stay)."""
    from glare.data.mosaic import ensure_mosaic

    cfg = load_config("tiny", [f"data.mosaic.cache_dir={tmp_path}"])
    ds = open_segmentation("mosaic", ensure_mosaic(cfg.data.mosaic), "val")
    shape = ds.frame_shape(cfg.eval.img_size)
    assert shape == (32, 32)
    cropped, whole = load_arrays(ds, 32), load_arrays(ds, shape)
    assert torch.equal(cropped[0], whole[0]) and torch.equal(cropped[1], whole[1])


# ---------------------------------------------------------------------------- materialise or stream


def test_materialize_auto_compares_the_decoded_size_with_the_object_store() -> None:
    gb = 1e9
    # 1000 images at 256 px: 0.197 GB decoded.
    assert decide_materialize("auto", 1000, 256, 1 * gb)[0] is True
    keep, why = decide_materialize("auto", 100_000, 256, 1 * gb)  # 19.7 GB
    assert keep is False and "19.66 GB decoded exceeds 50% of the 1.00 GB object store" in why
    assert decide_materialize("auto", 5000, 256, 2 * gb)[0] is True  # 0.98 GB <= 1 GB
    assert decide_materialize("auto", 5200, 256, 2 * gb)[0] is False  # 1.02 GB > 1 GB
    assert decide_materialize("auto", None, 256, gb) == (False, "data.materialize=auto: a remote source's size "
                                                                "is not known up front")
    assert decide_materialize("auto", 10, 256, None)[0] is False
    assert decide_materialize("True", 100_000, 256, gb) == (True, "data.materialize=true")
    assert decide_materialize(False, 1, 8, gb) == (False, "data.materialize=false")
    with pytest.raises(DataError, match="data.materialize"):
        decide_materialize("maybe", 1, 8, gb)


# ---------------------------------------------------------------------------- end to end, from the shell


@pytest.mark.slow
def test_train_then_eval_on_your_own_tree_from_the_command_line(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "own")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "glare.train", "--config", "tiny", *_keys(root), f"data.source={root / 'unlabelled'}",
         "train.steps=2", "train.checkpoint_every=2", "train.log_every=1", "eval.probe_steps=10",
         f"train.storage_path={tmp_path / 'runs'}", "train.run_name=own"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "[glare] data: 12 unlabelled images, materialised (data.materialize=auto:" in train.stdout
    assert "probe set: generic, 3 classes, 6 train / 4 test images" in train.stdout
    summary = json.loads((tmp_path / "runs" / "own" / "summary.json").read_text())
    assert 0.0 <= summary["miou_before"] <= 1.0 and 0.0 <= summary["miou_after"] <= 1.0
    assert summary["probe_classes"] == 3 and summary["pretrain_images"] == 12 and summary["materialized"] is True
    assert summary["steps"] == 2

    out = tmp_path / "probe.json"
    ev = subprocess.run(
        [sys.executable, "-m", "glare.eval", "linear", "--weights", summary["export"], "--config", "tiny",
         *_keys(root), "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["num_classes"] == 3 and record["class_names"] == list(CLASSES)
    assert record["image_size"] == [32, 64] and (record["train_images"], record["eval_images"]) == (6, 4)
    assert 0.0 <= record["miou"] <= 1.0 and len(record["per_class_iou"]) == 3
    assert "road" in ev.stdout and "generic set: 6 train / 4 test images at 32x64 px, 3 classes" in ev.stdout


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_train_and_sweep_stop_on_a_bad_set_in_one_line_before_ray(command, tmp_path, capsys) -> None:
    import ray

    if str(REPO) not in sys.path:  # tune/ is a folder of the repository, not a package
        sys.path.insert(0, str(REPO))
    from glare.train import main as train_main
    from tune.sweep import main as sweep_main

    root = make_tree(tmp_path / "set")
    mask = np.array(Image.open(root / "test/masks/e3.png"))
    mask[20, 20] = 9
    Image.fromarray(mask).save(root / "test/masks/e3.png")
    args = ["--config", "tiny", *_keys(root), f"train.storage_path={tmp_path / 'runs'}"]
    status = train_main(args) if command == "train" else sweep_main(["--sweep", "tiny", *args])
    assert status == 2 and not ray.is_initialized() and not (tmp_path / "runs").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "e3.png: label values [9] outside [0, 3)" in err and "data.seg_num_classes" in err
