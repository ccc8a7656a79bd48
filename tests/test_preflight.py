"""Bad input fails before Ray starts: exit 2, one ``error:`` line naming the key or file, nothing left behind.

Each case runs the real command line in a subprocess, with Ray's temp root pointed at a fresh folder:
a Ray start would create its session folder there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glare.config import load_config
from glare.models import AdaptedViT, create_backbone
from glare.weights.export import save_export

REPO = Path(__file__).resolve().parent.parent


def _files(tmp: Path) -> dict[str, str]:
    """The bad inputs (and one good export) the cases refer to, as {name: path}."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths = {}

    def put(name: str, data: bytes) -> None:
        (tmp / name).write_bytes(data)
        paths[name] = str(tmp / name)

    put("garbage.pth", b"this is not a checkpoint\n" * 40)
    put("random.pth", bytes(range(7, 256)) * 16)
    put("pickle_garbage.pth", b"\x80\x04garbage-after-a-pickle-magic" * 8)
    put("garbage.safetensors", (10**12).to_bytes(8, "little") + b"{}")
    # A real safetensors file cut in half: its header promises more than the file holds.
    save_file({"w": torch.zeros(64, 64)}, str(tmp / "full.safetensors"))
    put("truncated.safetensors", (tmp / "full.safetensors").read_bytes()[:100])
    # A well-formed checkpoint of another architecture (embed_dim 32 where the tiny preset has 48).
    other = load_config("tiny", ["model.timm_kwargs.embed_dim=32", "model.timm_kwargs.num_heads=2"]).model
    torch.save(create_backbone(other).state_dict(), tmp / "other_arch.pth")
    paths["other_arch.pth"] = str(tmp / "other_arch.pth")
    tiny = load_config("tiny").model
    paths["tiny_export"] = str(save_export(AdaptedViT(create_backbone(tiny), adapter_cfg=tiny.adapter),
                                           tmp / "tiny_export.safetensors", tiny))
    (tmp / "empty").mkdir()
    paths["empty"] = str(tmp / "empty")
    (tmp / "broken_images").mkdir()
    for i in range(3):
        (tmp / "broken_images" / f"{i}.png").write_bytes(b"not a png")
    paths["broken_images"] = str(tmp / "broken_images")
    put("a_file", b"x")
    return paths


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    return _files(tmp_path_factory.mktemp("bad"))


TRAIN = [sys.executable, "-m", "glare.train", "--config", "tiny"]
# (id, command after the program, what the error line must name)
CASES = [
    ("regions_vs_heads", [*TRAIN, "region.num_regions=99"], "region.num_regions"),
    ("view_size_vs_patch", [*TRAIN, "augment.view_size=36"], "augment.view_size"),
    ("global_token", [*TRAIN, "model.global_token=3"], "model.global_token"),
    ("first_block", [*TRAIN, "model.adapter.first_block=5"], "model.adapter.first_block"),
    ("unknown_arch", [*TRAIN, "model.arch=vit_nonexistent"], "model.arch"),
    ("weights_missing", [*TRAIN, "model.weights={tmp}/nope.pth"], "nope.pth"),
    ("weights_garbage_pth", [*TRAIN, "model.weights={garbage.pth}"], "garbage.pth"),
    ("weights_random_pth", [*TRAIN, "model.weights={random.pth}"], "random.pth"),
    ("weights_damaged_pickle", [*TRAIN, "model.weights={pickle_garbage.pth}"], "pickle_garbage.pth"),
    ("weights_garbage_safetensors", [*TRAIN, "model.weights={garbage.safetensors}"], "garbage.safetensors"),
    ("weights_truncated_safetensors", [*TRAIN, "model.weights={truncated.safetensors}"], "truncated.safetensors"),
    ("weights_other_arch", [*TRAIN, "model.weights={other_arch.pth}"], "other_arch.pth"),
    ("data_missing", [*TRAIN, "data.source={tmp}/no_such_folder"], "data.source"),
    ("data_empty", [*TRAIN, "data.source={empty}"], "data.source"),
    ("data_unreadable", [*TRAIN, "data.source={broken_images}"], "data.source"),
    ("storage_under_file", [*TRAIN, "train.storage_path={a_file}/runs"], "train.storage_path"),
    ("storage_under_proc", [*TRAIN, "train.storage_path=/proc/glare_runs"], "train.storage_path"),
    ("unknown_key", [*TRAIN, "train.stepz=5"], "train.stepz"),
    ("wrong_type", [*TRAIN, "train.steps=abc"], "train.steps"),
    ("eval_weights_garbage", [sys.executable, "-m", "glare.eval", "linear", "--config", "tiny",
                              "--weights", "{garbage.pth}"], "garbage.pth"),
    ("viz_weights_truncated", [sys.executable, "-m", "glare.viz", "--config", "tiny",
                               "--weights", "{truncated.safetensors}"], "truncated.safetensors"),
    ("sweep_regions_vs_heads", [sys.executable, "tune/sweep.py", "--sweep", "tiny", "--config", "tiny",
                                "region.num_regions=99"], "region.num_regions"),
    ("sweep_weights_garbage", [sys.executable, "tune/sweep.py", "--sweep", "tiny", "--config", "tiny",
                               "model.weights={garbage.pth}"], "garbage.pth"),
]


@pytest.mark.parametrize(("argv", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_before_ray_with_one_line(argv, named, bad, tmp_path):
    storage, ray_tmp = tmp_path / "runs", tmp_path / "ray"
    ray_tmp.mkdir()
    values = {**bad, "tmp": str(tmp_path)}
    for name, value in values.items():
        argv = [a.replace("{" + name + "}", value) for a in argv]
    if "glare.train" in argv and not any(a.startswith("train.storage_path=") for a in argv):
        argv.append(f"train.storage_path={storage}")
    if "tune/sweep.py" in argv:
        argv.append(f"sweep.storage_path={storage}")
    if "glare.eval" in argv or "glare.viz" in argv:
        argv += ["--out", str(storage / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    err_lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert named in err_lines[0]
    assert not storage.exists() or not any(storage.iterdir()), list(storage.iterdir())  # no run directory
    assert not any(ray_tmp.iterdir()), "a Ray session was started"
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
