"""experiments/study.py: the variant table, the study settings, the natural set, the tables, and a tiny study."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glare.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _import_study():
    spec = importlib.util.spec_from_file_location("study", REPO / "experiments" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


study = _import_study()


# ----------------------------------------------------------------------------- configuration


def test_each_variant_is_the_preset_plus_its_overrides(tmp_path: Path) -> None:
    preset, settings, items = study.load_study("study_mosaic", ["loss.reg=0.5", "study.full_lr=0.001"], tmp_path)
    assert items == ["loss.reg=0.5"] and settings.full_lr == 0.001 and settings.natural == "labelme"
    cfgs = {v: study.variant_config(preset, items, v, 2, settings, tmp_path) for v in study.VARIANTS}
    for cfg in cfgs.values():
        assert (cfg.train.seed, cfg.eval.seed, cfg.train.storage_path) == (2, 2, str(tmp_path.resolve()))
        assert cfg.model.weights == "imgfocus" and cfg.augment.view_size == 112 and cfg.train.steps == 60
    assert cfgs["dino"].train.run_name == "dino-s2"
    weights = {v: (c.loss.glob, c.loss.reg, c.loss.loc1, c.loss.loc2) for v, c in cfgs.items()}
    assert weights["glare"] == (1.0, 0.5, 1.0, 1.0)  # the user's override holds where no variant sets the key
    assert weights["dino"] == (1.0, 0.0, 0.0, 0.0)
    assert weights["no_reg"] == (1.0, 0.0, 1.0, 1.0)  # ... and the variant's wins where it does
    assert weights["no_loc1"] == (1.0, 0.5, 0.0, 1.0) and weights["no_loc2"] == (1.0, 0.5, 1.0, 0.0)
    assert cfgs["geometric"].region.correspondence == "geometric"
    assert (cfgs["first6"].model.adapter.first_block, cfgs["first8"].model.adapter.first_block) == (6, 8)
    assert cfgs["glare"].model.adapter.first_block == 0
    assert cfgs["glare"].region.correspondence == "cross_attention"
    assert cfgs["full"].model.tune == "full" and cfgs["full"].optim.lr == 0.001
    assert all(c.model.tune == "adapters" and c.optim.lr == 0.005 for v, c in cfgs.items() if v != "full")
    # Without a study section the study runs the main job, and full fine-tuning at DINO's rate.
    _, defaults, _ = study.load_study(study.DEFAULT_PRESET, [], tmp_path / "default")
    assert study.DEFAULT_PRESET == "default" and defaults.full_lr == 0.0005 and defaults.probe_seeds == 5
    assert "study" not in preset.read_text() and load_config(preset).train.steps == 60


def test_bad_input_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(study.StudyError, match="unknown variant.*nope.*known: init, dino"):
        study.check_variants(["dino", "nope"])
    assert study.check_variants(["full", "init", "dino"]) == ["init", "dino", "full"]
    with pytest.raises(study.StudyError, match="study key 'bogus'"):
        study.load_study("tiny", ["study.bogus=1"], tmp_path)
    with pytest.raises(study.StudyError, match="study key 'img_size': must be >= 8"):
        study.load_study("tiny", ["study.img_size=4"], tmp_path)
    with pytest.raises(study.StudyError, match="study key 'natural': must be one of labelme, none, ade20k"):
        study.load_study("tiny", ["study.natural=imagenet"], tmp_path)
    with pytest.raises(study.StudyError, match="study key 'drift'"):
        study.load_study("tiny", ["study.drift=maybe"], tmp_path)
    with pytest.raises(study.ConfigError, match="not of the form key=value"):
        study.load_study("tiny", ["train.steps"], tmp_path)
    preset, settings, items = study.load_study("tiny", [], tmp_path)
    cfg = study.variant_config(preset, items, "dino", 0, settings, tmp_path)
    run_dir = tmp_path / "dino-s0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(study.to_yaml(cfg))
    study.check_run_config(run_dir, cfg)  # the same config: fine
    moved = study.variant_config(preset, items, "dino", 0, settings, tmp_path / "elsewhere")
    study.check_run_config(run_dir, moved)  # a moved study directory stays resumable
    other = study.variant_config(preset, ["train.steps=5"], "dino", 0, settings, tmp_path)
    with pytest.raises(study.StudyError, match="made with another config"):
        study.check_run_config(run_dir, other)


# ----------------------------------------------------------------------------- the natural set


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_natural_set_unifies_classes_and_splits_quadrants(tmp_path: Path) -> None:
    from glare.data.segmentation import load_arrays, open_segmentation

    voc_names = ["_background_", "aeroplane", "bottle", "person"]
    voc_labels = np.array([[0, 0, 2, 2], [0, 0, 2, -1], [3, 3, 0, 0], [3, 3, 0, 0]])
    video_names = ["_background_", "car", "track"]
    video_labels = np.array([[1, 1, 0, 0, 2, 2]] * 2 + [[2, 2, 0, 0, 1, 1]] * 2)
    items = [("a", _photo(4, 4, 0), voc_labels, voc_names), ("b", _photo(4, 6, 1), video_labels, video_names)]
    root = tmp_path / "set"
    classes = study.build_natural_set(items, root)
    # The union of the classes present, background first; "track" is labelme's truck; absent aeroplane dropped.
    assert classes == ["background", "bottle", "car", "person", "truck"]
    assert json.loads((root / "classes.json").read_text())["classes"] == classes
    split = {s: open_segmentation("generic", root, s, num_classes=5) for s in ("train", "val")}
    assert [p[0].name for p in split["train"].pairs] == ["a_0.png", "a_1.png", "b_0.png", "b_1.png"]
    masks = {s: [ds.load(i)[1] for i in range(len(ds))] for s, ds in split.items()}
    # Train: top-left and bottom-right quadrants; val: top-right and bottom-left; -1 -> ignore (255).
    np.testing.assert_array_equal(masks["train"][0], np.zeros((2, 2)))
    np.testing.assert_array_equal(masks["train"][1], np.zeros((2, 2)))
    np.testing.assert_array_equal(masks["val"][0], [[1, 1], [1, 255]])
    np.testing.assert_array_equal(masks["val"][1], [[3, 3], [3, 3]])
    np.testing.assert_array_equal(masks["train"][2], [[2, 2, 0]] * 2)  # car
    np.testing.assert_array_equal(masks["val"][3], [[4, 4, 0]] * 2)  # truck
    image = split["val"].load(0)[0]
    np.testing.assert_array_equal(image, items[0][1][:2, 2:])
    images, labels = load_arrays(split["val"], 8)
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
    with pytest.raises(study.StudyError, match="differ"):
        study.build_natural_set([("c", _photo(4, 4, 0), np.zeros((3, 4), int), voc_names)], tmp_path / "bad")
    assert not list(tmp_path.glob("bad*"))  # a failed build leaves nothing behind


def _fake_labelme(path: Path) -> None:
    """A tarball with labelme's example layout (tiny photos), so the reader is tested without the network."""
    top = f"labelme-{study.LABELME_VERSION}/examples"

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(_photo(8, 10, seed)).save(buf, format="JPEG")
        return buf.getvalue()

    def npy(labels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, labels.astype(np.int32))
        return buf.getvalue()

    with tarfile.open(path, "w:gz") as tar:
        voc = f"{top}/semantic_segmentation/data_dataset_voc"
        add(tar, f"{voc}/class_names.txt", b"_background_\naeroplane\nbicycle\nbird\nboat\nbottle\nbus\n")
        add(tar, f"{voc}/JPEGImages/2011_000001.jpg", jpeg(0))
        add(tar, f"{voc}/SegmentationClassNpy/2011_000001.npy", npy(np.full((8, 10), 6)))
        video = f"{top}/video_annotation/data_dataset_voc"
        add(tar, f"{video}/class_names.txt", b"_background_\ncar\ntrack\n")
        for i in range(2):
            add(tar, f"{video}/JPEGImages/0000010{i}.jpg", jpeg(1 + i))
            add(tar, f"{video}/SegmentationClass/0000010{i}.npy", npy(np.full((8, 10), 2)))


def test_natural_set_from_a_cached_labelme_sdist(tmp_path: Path) -> None:
    pytest.importorskip("imgviz")
    _fake_labelme(tmp_path / f"labelme-{study.LABELME_VERSION}.tar.gz")
    settings = study.StudyConfig(cache_dir=str(tmp_path), img_size=16)
    data = study.natural_probe_data(settings, load_config("tiny"))
    # 3 labelme photos + imgviz's VOC photo (bottle, chair, diningtable, person), 2 quadrants each per split.
    assert data.class_names == ["background", "bottle", "bus", "chair", "diningtable", "person", "truck"]
    assert data.train[0].shape == (8, 3, 16, 16) and data.val[1].shape == (8, 16, 16)
    # Files sort as imgviz_voc_*, video_*, voc_*: the video frames are all truck, the labelme VOC photo all bus.
    assert data.val[1][2:6].unique().tolist() == [6] and data.val[1][6:].unique().tolist() == [2]
    assert study.ensure_natural_set(settings) == tmp_path / "voc9"  # cached: not rebuilt
    assert study.natural_probe_data(study.StudyConfig(natural="none"), load_config("tiny")) is None


def test_drift_is_one_for_the_init_and_drops_when_features_change() -> None:
    cfg = load_config("tiny")
    photos = study.drift_photos(32)
    assert photos.shape == (8, 3, 32, 32) and photos.dtype == torch.uint8
    ctx = study.StudyContext(study=study.StudyConfig(natural="none"), natural=None, photos=photos)
    ref = study.make_reference(cfg, ctx)
    assert ref.natural_cms is None and ref.natural_miou is None
    assert study.patch_drift(ref.photos, study.init_encoder(cfg), photos, cfg) == pytest.approx(1.0, abs=1e-6)
    changed = study.init_encoder(cfg)
    with torch.no_grad():
        for p in changed.adapters.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert study.patch_drift(ref.photos, changed, photos, cfg) < 0.999
    other_seed = study.init_encoder(load_config("tiny", ["train.seed=1"]))  # another random init
    assert study.patch_drift(ref.photos, other_seed, photos, cfg) < 0.9


# ----------------------------------------------------------------------------- tables


def _row(variant: str, seed: int, **values) -> dict:
    base = {"variant": variant, "seed": seed, "miou_before": 0.5, "miou_after": 0.5, "delta": 0.0,
            "natural_miou": None, "forgetting": None, "forgetting_low": None, "forgetting_high": None,
            "drift_photos": None, "drift_natural": None, "wall_s": None, "train_s": None, "step_s": None,
            "train_peak_mb": None, "trainable_params": 0, "stop_reason": ""}
    return {**base, **values}


def test_cost_ratios_and_the_mean_std_table() -> None:
    rows = study.with_derived([
        _row("init", 0, natural_miou=0.30, forgetting=0.0), _row("init", 1, natural_miou=0.32, forgetting=0.0),
        _row("glare", 0, step_s=2.0, train_peak_mb=1000.0), _row("glare", 1, step_s=4.0, train_peak_mb=1000.0),
        _row("dino", 0, miou_after=0.6, delta=0.1, natural_miou=0.25, forgetting=0.05, forgetting_low=0.01,
             forgetting_high=0.09, wall_s=100.0, step_s=1.0, train_peak_mb=500.0, trainable_params=10),
        _row("dino", 1, miou_after=0.7, delta=0.2, natural_miou=0.32, forgetting=0.0, forgetting_low=-0.03,
             forgetting_high=0.03, wall_s=120.0, step_s=3.0, train_peak_mb=700.0, trainable_params=10),
    ])
    dino = [r for r in rows if r["variant"] == "dino"]
    assert [r["step_ratio"] for r in dino] == [0.5, 0.75] and [r["memory_ratio"] for r in dino] == [0.5, 0.7]
    assert [r["forgetting_ci"] for r in dino] == pytest.approx([0.04, 0.03])
    assert rows[0]["step_ratio"] is None and rows[2]["step_ratio"] == 1.0
    table = study.results_table(rows).splitlines()
    assert table[0].startswith("| variant | seeds | mIoU after (%) | Δ vs init (pts) | Δ per seed | natural probe")
    assert len(table) == 5 and table[2].startswith("| init | 2 | 50.00 ± 0.00 | +0.00 ± 0.00 | s0 +0.00 / s1 +0.00 | "
                                                   "31.00 ± 1.41 | +0.00 ± 0.00 | — |")
    cells = table[3].split(" | ")
    assert cells[:8] == ["| dino", "2", "65.00 ± 7.07", "+15.00 ± 7.07", "s0 +10.00 / s1 +20.00", "28.50 ± 4.95",
                         "+2.50 ± 3.54", "3.50 ± 0.71"]
    assert cells[8:13] == ["—", "—", "110 ± 14", "—", "0.62 ± 0.18"] and cells[13] == "0.60 ± 0.14"
    assert table[3].endswith("| 10 |") and table[4].startswith("| glare | 2 |")
    assert study.mean_std([0.25]) == "0.25" and study.mean_std([None]) == "—"


# ----------------------------------------------------------------------------- a tiny study end to end


@pytest.fixture(scope="module")
def ray_local():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, log_to_driver=False, _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_tiny_study_end_to_end_and_rerun_skips_finished_runs(ray_local, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    argv = ["--config", "tiny", "--seeds", "0", "--variants", "full", "init", "--out", str(out),
            f"data.mosaic.cache_dir={tmp_path / 'mosaic'}", "train.steps=4",
            "study.natural=mosaic", "study.img_size=48", "study.full_lr=0.01"]
    assert study.main(argv) == 0
    rows = {r["variant"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert list(rows) == ["init", "full"]  # table order, whatever the order asked
    init, full = rows["init"], rows["full"]
    # The init's mIoU is the run's own mIoU before training (same seed, same init), not a separate probe.
    assert init["miou_after"] == init["miou_before"] == full["miou_before"] and init["wall_s"] is None
    assert init["drift_photos"] == init["drift_natural"] == 1.0 and init["forgetting"] == 0.0
    assert full["delta"] == pytest.approx(full["miou_after"] - full["miou_before"])
    # Forgetting: paired on the same images and probe seeds, inside its own bootstrap interval.
    assert full["forgetting"] == pytest.approx(init["natural_miou"] - full["natural_miou"])
    assert full["forgetting_low"] <= full["forgetting"] <= full["forgetting_high"] and init["forgetting_low"] == 0.0
    summary = json.loads((out / "full-s0" / "summary.json").read_text())
    assert full["step_s"] == pytest.approx(summary["train_cpu_s"] / 4)
    assert full["step_s"] > 0 and full["train_peak_mb"] > 0
    assert full["step_ratio"] is None  # no glare run to compare with
    assert full["natural_miou"] != full["miou_after"]  # the natural probe runs at study.img_size, not eval's
    assert 0.0 < full["drift_photos"] < 1.0 and 0.0 < full["drift_natural"] < 1.0
    assert full["wall_s"] > full["train_s"] > 0 and full["stop_reason"] == ""
    assert (out / "full-s0" / "export" / "backbone.safetensors").is_file()
    cfg = load_config(out / "full-s0" / "config.yaml")
    assert (cfg.model.tune, cfg.optim.lr, cfg.loss.reg, cfg.train.seed) == ("full", 0.01, 1.0, 0)
    # The whole 2-block backbone trains: more than its 48-wide embedding's worth of blocks.
    assert full["trainable_params"] > 2 * 12 * 48 * 48 and init["trainable_params"] == 0
    text = (out / "results.md").read_text()
    assert f"--out {out}" in text and text in capsys.readouterr().out
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")][1:] == \
        ["| init", "| full"]

    before = _files(out)
    assert study.main(argv) == 0  # everything finished: reused, nothing retrained or rewritten
    after = _files(out)
    skip = {"results.jsonl", "results.md", "preset.yaml"}
    assert {k: v for k, v in after.items() if k not in skip} == {k: v for k, v in before.items() if k not in skip}
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == list(rows.values())

    changed = [*argv, "train.steps=3"]  # a different config must not silently reuse the runs
    assert study.main(changed) == 2
    assert "made with another config" in capsys.readouterr().err
