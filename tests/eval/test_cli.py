"""``python -m glare.eval``: linear probe and k-NN end to end on the tiny preset, error handling, mmseg forwarding."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from glare.config import load_config
from glare.eval.__main__ import main
from glare.models import AdaptedViT, create_backbone
from glare.weights.export import save_export


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds sync cost on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mosaic_override(tmp_path_factory) -> str:
    """Keep the tiny mosaic out of the user's cache."""
    return f"data.mosaic.cache_dir={tmp_path_factory.mktemp('mosaic')}"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
    """A tiny GLARE export with non-zero adapters, so it is a different model from the random init."""
    cfg = load_config("tiny").model
    return str(save_export(_tiny_model(), tmp_path_factory.mktemp("export") / "tiny.safetensors", cfg))


def _tiny_model() -> AdaptedViT:
    """The model the ``tiny_export`` fixture writes, built afresh."""
    cfg = load_config("tiny").model
    torch.manual_seed(123)
    model = AdaptedViT(create_backbone(cfg), adapter_cfg=cfg.adapter)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _linear(weights: str, out, *overrides: str) -> dict:
    assert main(["linear", "--weights", weights, "--config", "tiny", *overrides, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("which", ["none", "export"])
def test_linear_writes_a_deterministic_probe_result(which, tiny_export, mosaic_override, tmp_path, capsys):
    weights = tiny_export if which == "export" else "none"
    first = _linear(weights, tmp_path / "a.json", mosaic_override)
    table = capsys.readouterr().out
    second = _linear(weights, tmp_path / "b.json", mosaic_override)
    assert 0.0 <= first["miou"] <= 1.0
    assert second["miou"] == first["miou"] and second["per_class_iou"] == first["per_class_iou"]
    assert first["weights"] == weights and first["config"] == "tiny" and first["overrides"] == [mosaic_override]
    assert len(first["per_class_iou"]) == len(first["class_names"]) == 10  # the mosaic's default class count
    assert first["steps"] == 30 and first["feature_dim"] == 48  # tiny preset: probe_steps, embed_dim
    assert f"mIoU {100 * first['miou']:.2f}" in table and "brick" in table


def test_linear_scores_the_weights_it_is_given(tiny_export, mosaic_override, tmp_path):
    init = _linear("none", tmp_path / "init.json", mosaic_override)
    export = _linear(tiny_export, tmp_path / "export.json", mosaic_override)
    assert export["miou"] != init["miou"]
    # ... and exactly the probe of the model the export holds, run here without the CLI.
    from glare.eval.protocol import load_probe_data, run_probe

    cfg = load_config("tiny", [mosaic_override])
    model = _tiny_model()
    data = load_probe_data(cfg.data, cfg.eval, multiple=model.patch_size)
    direct = run_probe(lambda x: model.dense_features(x, last_blocks=cfg.eval.last_blocks), data, cfg.eval, "cpu")
    assert export["miou"] == pytest.approx(direct.miou, abs=1e-6)
    assert export["per_class_iou"] == pytest.approx(direct.to_dict()["per_class_iou"], abs=1e-6, nan_ok=True)


def test_linear_overrides_reach_the_probe(mosaic_override, tmp_path):
    result = _linear("none", tmp_path / "r.json", mosaic_override, "eval.last_blocks=2", "eval.probe_steps=5")
    assert result["feature_dim"] == 96 and result["steps"] == 5  # two blocks of 48 channels


def test_linear_default_output_path(mosaic_override, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["linear", "--weights", "none", "--config", "tiny", mosaic_override, "eval.probe_steps=2"]) == 0
    assert json.loads((tmp_path / "probe_result.json").read_text())["steps"] == 2


def _colour_tree(root, counts: dict[str, int], seed: int) -> None:
    """root/<colour>/*.png: noisy 24 px squares of one colour per class."""
    rng = np.random.default_rng(seed)
    rgb = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(np.asarray(rgb[name]) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_knn_classifies_an_image_folder_tree(tiny_export, tmp_path, capsys):
    _colour_tree(tmp_path / "train", {"red": 4, "blue": 4}, seed=0)
    _colour_tree(tmp_path / "test", {"red": 2, "blue": 2}, seed=1)
    out = tmp_path / "knn.json"
    argv = ["knn", "--weights", tiny_export, "--config", "tiny", "--train", str(tmp_path / "train"),
            "--test", str(tmp_path / "test"), "--size", "32", "--k", "3", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == ["blue", "red"]
    assert result["n_train"] == 8 and result["n_test"] == 4 and result["feature_dim"] == 48 and result["k"] == 3
    # Solid colours are trivially separable, even by a random ViT's [CLS] token.
    assert result["knn_top1"] == 1.0 and result["linear_top1"] == 1.0
    assert result["weights"] == tiny_export
    assert "k-NN top-1 100.00" in capsys.readouterr().out


def test_knn_rejects_mismatched_class_folders(tmp_path, capsys):
    _colour_tree(tmp_path / "train", {"red": 2, "blue": 2}, seed=0)
    _colour_tree(tmp_path / "test", {"red": 1, "green": 1}, seed=1)
    argv = ["knn", "--weights", "none", "--config", "tiny", "--train", str(tmp_path / "train"),
            "--test", str(tmp_path / "test"), "--size", "32", "--out", str(tmp_path / "k.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "green" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "needle"), [
    (["linear", "--weights", "missing/weights.safetensors", "--config", "tiny"], "missing/weights.safetensors"),
    (["linear", "--weights", "none", "--config", "no_such_preset"], "no_such_preset"),
    (["linear", "--weights", "none", "--config", "tiny", "model.no_such_key=1"], "no_such_key"),
    (["knn", "--weights", "none", "--config", "tiny", "--train", "nowhere", "--test", "nowhere"], "nowhere"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and needle in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "r.json").exists()


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("linear", "knn", "mmseg"))


def test_mmseg_forwards_every_argument(monkeypatch):
    calls = []
    fake = types.ModuleType("glare.eval.mmseg.runner")
    fake.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "glare.eval.mmseg.runner", fake)
    assert main(["mmseg", "--help", "--weights", "w.safetensors", "x=1"]) == 7
    assert calls == [["--help", "--weights", "w.safetensors", "x=1"]]


def test_mmseg_without_its_runner_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "glare.eval.mmseg.runner", None)  # makes the import fail
    assert main(["mmseg", "--anything"]) == 2
    assert capsys.readouterr().err.startswith("error: mmseg evaluation is unavailable")


def test_an_export_of_another_architecture_is_noted_once(tiny_export, mosaic_override, tmp_path, capsys):
    _linear(tiny_export, tmp_path / "same.json", mosaic_override)
    assert "note:" not in capsys.readouterr().out  # the export's arch is the config's: nothing to say
    _linear(tiny_export, tmp_path / "other.json", mosaic_override, "model.arch=vit_base_patch16_224")
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert len(notes) == 1
    assert notes[0].startswith(f"[glare] note: {tiny_export} is an export of vit_tiny_patch16_224 ")
    assert "model.arch=vit_base_patch16_224 is not used" in notes[0]
