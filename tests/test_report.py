"""glare.report from a synthetic run directory, and glare.console's progress from a metrics.jsonl."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from PIL import Image

from glare.config import load_config, to_yaml
from glare.console import RunProgress
from glare.report import config_diff, main, read_metrics, write_report

CLASSES = ["road", "tree", "sky"]


def _step(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "glob": loss / 2, "loc2": loss / 2, "teacher_entropy_glob": 0.5,
            "teacher_entropy_loc2": 0.4, "lr": 1e-3 / step, "images_per_s": 10.0 * step}


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny", ["train.steps=4", "loss.reg=0", "loss.loc1=0"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    probe = {"event": "probe", "class_names": CLASSES, "labelled_images": {"train": 16, "val": 8, "classes": 3}}
    records = [
        {**probe, "step": 0, "miou": 0.40, "per_class_iou": [0.5, 0.3, None]},
        _step(2, 9.0),
        _step(2, 8.0),  # step 2 redone after a restart: the later record counts
        {"step": 2, "miou": 0.42},
        _step(4, 6.0),
        {"step": 4, "miou": 0.45},
        {**probe, "step": 4, "miou": 0.45, "per_class_iou": [0.55, 0.2, None]},
        {"event": "end", "step": 4, "miou": 0.45, "miou_before": 0.40, "images_seen": 16, "stop_reason": ""},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    summary = {"miou_before": 0.40, "miou_after": 0.45, "steps": 4, "images_seen": 16, "trainable_params": 250,
               "backbone_params": 1000, "images_per_s": 12.5, "skipped_images": 1,
               "skipped_files": [{"path": "bad.jpg", "reason": "cannot decode"}], "nonfinite_steps": 0,
               "stop_reason": "", "wall_s": 30.0, "train_s": 2.0, "pretrain_images": 24, "materialized": True,
               "labelled_images": {"train": 16, "val": 8, "classes": 3}, "class_names": CLASSES,
               "per_class_iou_before": [0.5, 0.3, None], "per_class_iou_after": [0.55, 0.2, None]}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_metrics_are_read_per_step_with_evaluations_and_probes(tmp_path):
    records = read_metrics(_run_dir(tmp_path) / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records.train] == [(2, 8.0), (4, 6.0)]
    assert records.evals == [(0, 0.40), (2, 0.42), (4, 0.45)]
    assert [p["step"] for p in records.probes] == [0, 4] and records.end["miou"] == 0.45


def test_config_diff_names_the_nearest_preset_and_the_changed_keys(tmp_path):
    base, diff = config_diff(load_config("tiny", ["train.steps=4", "loss.reg=0"]))
    assert base == "preset `tiny`"
    assert diff == [("loss.reg", 1.0, 0.0), ("train.steps", 6, 4)]
    assert config_diff(load_config(None))[1] == []


def test_report_from_a_run_directory(tmp_path):
    run = _run_dir(tmp_path)
    path = write_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert "**40.00 → 45.00** (+5.00 points) after 4 steps" in text
    # The per-class table: before, after and the difference in points; an unscored class stays n/a.
    assert "| road | 50.00 | 55.00 | +5.00 |" in text
    assert "| tree | 30.00 | 20.00 | -10.00 |" in text
    assert "| sky | n/a | n/a | n/a |" in text
    # What ran: the changes against the tiny preset, data sizes, skipped files, parameters.
    assert "Config: preset `tiny` with these changes:" in text
    assert "| `train.steps` | `6` | `4` |" in text and "| `loss.loc1` | `1.0` | `0.0` |" in text
    assert "| unlabelled images | 24 (`mosaic`, materialised) |" in text
    assert "`mosaic`: 16 train / 8 val images, 3 classes" in text
    assert "- skipped `bad.jpg`: cannot decode" in text
    assert "| trainable parameters | 250 (25.0 % of the backbone's 1,000) |" in text
    assert "| throughput | 12.5 images/s |" in text
    # The curves exist as a PNG; without an export the pictures are explained, not drawn.
    with Image.open(run / "curves.png") as im:
        assert im.size == (1000, 700)
    assert "No export (export/backbone.safetensors) yet" in text
    assert not (run / "attention.png").exists()


def test_report_without_a_summary_uses_the_closing_record(tmp_path):
    run = _run_dir(tmp_path)
    (run / "summary.json").unlink()
    text = write_report(run, pictures=False).read_text()
    assert "**40.00 → 45.00**" in text and "| tree | 30.00 | 20.00 | -10.00 |" in text


def test_cli_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is not a run directory: no config.yaml"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress_records(path: Path) -> None:
    probe = {"event": "probe", "labelled_images": {"train": 16, "val": 8, "classes": 3}}
    lines = [{**probe, "step": 0, "miou": 0.4}, {"event": "head_bootstrap", "step": 0, "tokens": {"head": 48}},
             *(_step(s, 10.0 - s) for s in range(1, 21)), {"event": "warning", "step": 12, "message": "step 12: hot"},
             {"step": 10, "miou": 0.43}, {**probe, "step": 10, "miou": 0.43}, {**probe, "step": 20, "miou": 0.5}]
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))


def test_progress_prints_plain_lines_when_not_a_terminal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    with RunProgress(path, total=20, log_every=1, stream=out, poll_s=0.05):
        _progress_records(path)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["[glare] mIoU before: 40.00",
                         "[glare] heads bootstrapped from the init's tokens: head on 48 tokens"]
    steps = [line for line in lines if line.startswith("[glare] step ") and "mIoU" not in line]
    # 20 logged steps -> a line every 2nd (about 10 in all), each with the loss, entropies and speed.
    assert [s.split()[2] for s in steps] == [f"{n}/20" for n in range(2, 21, 2)]
    assert "loss -10.000 · entropy/ln K glob 0.50 loc2 0.40 · 200.0 img/s" in steps[-1]
    assert "[glare] warning: step 12: hot" in lines
    assert lines[-2:] == ["[glare] step 10 mIoU: 43.00", "[glare] mIoU after: 50.00"]


def test_progress_bar_on_a_terminal_skips_a_resumed_runs_old_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_step(5, 3.0)) + "\n")  # the run being resumed logged step 5
    out = _Terminal()
    with RunProgress(path, total=20, log_every=1, stream=out, poll_s=0.05) as progress:
        with open(path, "a") as f:
            f.write(json.dumps(_step(6, 2.0)) + "\n")
    assert progress.bar.n == 6 and progress.start == 5
    text = out.getvalue()
    assert "6/20" in text and "loss 2.000" in text and "\r" in text  # a redrawn bar, not lines
    assert "5/20" in text.split("6/20")[0] and "loss 3.000" not in text


def test_progress_follows_a_log_the_restarted_worker_rewrote(tmp_path):
    """A worker restarted mid-run cuts metrics.jsonl back to its checkpoint in a new file that ends with a
    ``resume`` record: the console says so and goes on from there, without repeating or garbling lines."""
    path = tmp_path / "metrics.jsonl"
    old = [json.dumps(_step(s, 10.0 - s)) + "\n" for s in range(1, 9)]
    out = io.StringIO()
    with RunProgress(path, total=10, log_every=1, stream=out, poll_s=0.05) as progress:
        with open(path, "a") as f:
            f.write("".join(old))
        deadline = time.monotonic() + 10
        while progress.records_seen < 8 and time.monotonic() < deadline:  # the follower has read them
            time.sleep(0.02)
        rewritten = tmp_path / "metrics.jsonl.tmp"
        resume = {"event": "resume", "step": 5, "epoch": 0, "batch": 5}
        rewritten.write_text("".join(old[:5]) + json.dumps(resume) + "\n")
        rewritten.replace(path)  # shorter than what was read: a follower by offset alone would miss it
        with open(path, "a") as f:
            f.write("".join(json.dumps(_step(s, 1.0)) + "\n" for s in range(6, 11)))
    lines = out.getvalue().splitlines()
    assert lines.count("[glare] resumed from step 5 (epoch 0, batch 5)") == 1
    after = lines[lines.index("[glare] resumed from step 5 (epoch 0, batch 5)") + 1:]
    assert after and all("loss 1.000" in line for line in after)  # only the resumed run's steps
    assert after[-1].split()[2] == "10/10"


def test_progress_of_a_resumed_run_starts_at_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_step(s, 3.0)) + "\n" for s in range(1, 8)))  # the killed run reached 7
    out = _Terminal()
    with RunProgress(path, total=20, log_every=1, stream=out, poll_s=0.05) as progress:
        tmp = tmp_path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_step(s, 3.0)) + "\n" for s in range(1, 6))
                       + json.dumps({"event": "resume", "step": 5, "epoch": 0, "batch": 5}) + "\n")
        tmp.replace(path)
        with open(path, "a") as f:
            f.write(json.dumps(_step(6, 2.0)) + "\n")
    assert progress.start == 5 and progress.bar.n == 6
    assert "resumed from step 5" in out.getvalue() and "loss 2.000" in out.getvalue()
