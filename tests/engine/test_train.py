"""The Ray Train trainer end to end: run directory, resume, worker faults, non-finite steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from glare.config import load_config
from glare.engine.checkpoint import load_checkpoint
from glare.models import GlareModel, create_backbone
from glare.models.pretrained import load_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # Ray Train's controller registers a reported checkpoint when it next polls the workers
    # (every 2 s by default); poll often so a worker killed soon after a report still has it.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    # Logical CPUs beyond the 2 real ones: two 0.5-CPU train workers, the controller and
    # Ray Data's tasks must never wait on each other (the deadlock of dependencies.md).
    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, log_to_driver=False, _temp_dir=temp_dir)
    yield temp_dir
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cfg(tmp_path: Path, *overrides: str):
    return load_config("tiny", [f"train.storage_path={tmp_path}", f"data.mosaic.cache_dir={tmp_path / 'mosaic'}",
                                *overrides])


def _logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["step"] for r in records if "loss" in r and r.get("event") != "end"]


def test_two_workers_end_to_end(ray_local, tmp_path, capsys):
    from glare.engine.driver import run

    cfg = _cfg(tmp_path, "ray.num_workers=2", "train.run_name=e2e")
    summary = run(cfg)
    run_dir = tmp_path / "e2e"
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps({k: v for k, v in summary.items() if k != "report"}))
    # The report, its curves and its before/after pictures; per-class IoU of both evaluations in the summary.
    assert summary["report"] == str(run_dir / "report.md")
    assert all((run_dir / f"{name}.png").stat().st_size > 0 for name in ("curves", "attention", "pca", "segmentation"))
    assert len(summary["per_class_iou_before"]) == len(summary["per_class_iou_after"]) == len(summary["class_names"])
    assert f"**{100 * summary['miou_before']:.2f} → {100 * summary['miou_after']:.2f}**" in \
        (run_dir / "report.md").read_text()
    assert summary["pretrain_images"] == 24 and summary["labelled_images"] == {"train": 16, "val": 8, "classes": 10}
    # The console: the run directory, one data line, the evaluations and one line per logged step, nothing else.
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[glare] data: 24 unlabelled images, materialised (data.materialize=auto")
    assert lines[0].endswith("; probe set: mosaic, 10 classes, 16 train / 8 val images")
    assert lines[1:3] == [f"[glare] run directory: {run_dir}",
                          f"[glare] mIoU before: {100 * summary['miou_before']:.2f}"]
    assert [line.split()[2] for line in lines if line.startswith("[glare] step ")] == ["2/6", "4/6", "6/6"]
    assert lines[-1] == f"[glare] mIoU after: {100 * summary['miou_after']:.2f}" and len(lines) == 8
    assert summary["steps"] == 6 and summary["images_seen"] == 6 * 4 * 2
    assert 0.0 <= summary["miou_before"] <= 1.0 and 0.0 <= summary["miou_after"] <= 1.0
    assert summary["skipped_images"] == 0 and summary["nonfinite_steps"] == 0 and summary["stop_reason"] == ""
    assert 0 < summary["trainable_params"] < summary["backbone_params"] + 200_000
    assert summary["train_peak_mb"] > 0 and summary["train_cpu_s"] > 0  # memory held and CPU time spent in steps
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    assert load_config(run_dir / "config.yaml") == cfg
    assert _logged_steps(run_dir) == [2, 4, 6]
    assert any((run_dir / "tensorboard").iterdir())

    # The export is the trained student: rebuild it from the final checkpoint and compare.
    state = load_checkpoint(summary["checkpoint"])
    torch.manual_seed(cfg.train.seed)  # the frozen random-init backbone is rebuilt from the seed, as workers do
    model = GlareModel(cfg, create_backbone(cfg.model))
    model.student.load_state_dict(state["model"]["student"])
    exported = load_pretrained(summary["export"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.features(x)
        assert torch.allclose(exported.forward_features(x), torch.cat([expected.prefix, expected.patches], 1),
                              atol=1e-5)
    assert state["loop"]["step"] == 6
    assert any(v.abs().sum() > 0 for k, v in state["model"]["student"].items() if k.endswith("up.weight"))


def test_same_name_resumes_fresh_name_starts_over(ray_local, tmp_path):
    from glare.engine.driver import checkpoint_step, latest_checkpoint, run

    first = run(_cfg(tmp_path, "train.run_name=r", "train.steps=3", "train.log_every=1"))
    registered = latest_checkpoint(tmp_path / "r")
    assert str(registered) == first["checkpoint"] and checkpoint_step(registered) == 3
    # A newer checkpoint folder Ray never registered (a node lost between its upload and its
    # registration) is not what a rerun resumes from, so it is not what the driver names either.
    shutil.copytree(registered, tmp_path / "r" / "checkpoint_2999-12-31_23-59-59.000000")
    assert latest_checkpoint(tmp_path / "r") == registered
    summary = run(_cfg(tmp_path, "train.run_name=r", "train.steps=6", "train.log_every=1"))
    assert summary["steps"] == 6 and summary["images_seen"] == 6 * 4
    assert _logged_steps(tmp_path / "r") == [1, 2, 3, 4, 5, 6]  # steps 1-3 were not redone
    # The heads were bootstrapped once, by the first run; the resume took them from the checkpoint.
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if r.get("event") == "head_bootstrap"] == ["head_bootstrap"]
    fresh = run(_cfg(tmp_path, "train.run_name=r2", "train.steps=2", "train.log_every=1"))
    assert fresh["steps"] == 2 and _logged_steps(tmp_path / "r2") == [1, 2]


def _train_worker_pids(ray_temp_dir: str) -> list[int]:
    """This test's Ray Train workers: those whose open files lie in its Ray instance's temp dir.

    Matching the process name alone would also kill the workers of any other Ray instance on the
    machine (another test run, a user's training job).
    """
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" not in (proc / "cmdline").read_bytes():
                    continue
                if any(os.readlink(fd).startswith(ray_temp_dir + os.sep) for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_killed_worker_restarts_from_last_checkpoint(ray_local, tmp_path):
    from glare.engine.driver import run

    # An interval long enough in time (30 steps of 0.05-0.3 s) for the kill to land mid-interval and
    # well after the controller has registered the interval's checkpoint, on an idle or a busy machine.
    interval = 30
    cfg = _cfg(tmp_path, "train.run_name=kill", "train.steps=90", f"train.checkpoint_every={interval}",
               "train.log_every=1", "ray.max_failures=1", "augment.view_size=64", "data.base_size=72")
    run_dir = tmp_path / "kill"
    killed: list[int] = []

    def killer() -> None:
        deadline, seen_at = time.time() + 240, {}  # checkpoint step -> when its step was first logged
        while time.time() < deadline and not killed:
            try:
                steps = _logged_steps(run_dir)
            except (FileNotFoundError, json.JSONDecodeError):
                steps = []
            last_ckpt = steps[-1] // interval * interval if steps else 0
            if last_ckpt:
                seen_at.setdefault(last_ckpt, time.time())
            # Mid-interval (at a checkpoint step nothing would be redone), and long enough after
            # that checkpoint for the controller's next poll to have registered it.
            mid = last_ckpt > 0 and 2 <= steps[-1] % interval <= interval - 2
            if mid and time.time() - seen_at[last_ckpt] > 0.6:
                for pid in _train_worker_pids(ray_local):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run(cfg)
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert summary["steps"] == 90 and summary["stop_reason"] == ""
    # The restarted worker redid the steps after its checkpoint and cut the log back to it: each step once.
    assert _logged_steps(run_dir) == list(range(1, 91))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "end" for r in records) == 1
    # The restart is on the record, at the checkpoint's step, just before the steps it redid.
    (resume,) = [r for r in records if r.get("event") == "resume"]
    at = records.index(resume)
    assert resume["step"] in (interval, 2 * interval)
    assert all(r.get("step", 0) <= resume["step"] for r in records[:at])
    redone = [r["step"] for r in records[at + 1:] if "loss" in r and "event" not in r]
    assert redone == list(range(resume["step"] + 1, 91))


def _trainable_norm(state: dict) -> float:
    return float(torch.linalg.vector_norm(torch.stack([v.float().norm() for v in state["model"]["student"].values()])))


def test_exploded_update_stops_the_resumed_run_and_keeps_the_last_good_checkpoint(ray_local, tmp_path):
    from glare.engine.driver import run

    run_dir = tmp_path / "nan"
    first = run(_cfg(tmp_path, "train.run_name=nan", "train.steps=3", "train.log_every=1"))
    good = load_checkpoint(first["checkpoint"])
    assert good["loop"]["step"] == 3 and first["last_good_step"] == 3
    # Resumed with an absurd learning rate: the first update blows the weights up (1e13 and more, or inf).
    summary = run(_cfg(tmp_path, "train.run_name=nan", "train.steps=30", "train.checkpoint_every=1",
                       "train.log_every=1", "optim.lr=1e38", "optim.warmup_steps=0"))
    assert "the update of step 4 multiplied the trainable weights' norm" in summary["stop_reason"]
    assert "the last good checkpoint (step 3) is intact" in summary["stop_reason"]
    assert summary["last_good_step"] == 3 and summary["steps"] == 3
    # Nothing was evaluated or exported after the stop, and the summary says so.
    assert summary["miou_after"] is None and summary["export"] is None
    assert summary["miou_before"] == first["miou_before"]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps({k: v for k, v in summary.items() if k != "report"}))
    kept = load_checkpoint(summary["checkpoint"])
    assert kept["loop"]["step"] == 3
    assert _trainable_norm(kept) == pytest.approx(_trainable_norm(good), rel=1e-6)  # a checkpoint to train from
    # The resume cut the log back to step 3; the first run's closing record is gone, the second's is there.
    assert _logged_steps(run_dir) == [1, 2, 3]
    ends = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"event": "end"' in line]
    assert len(ends) == 1 and ends[0]["stop_reason"] == summary["stop_reason"]
