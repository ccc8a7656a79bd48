"""``python -m glare.train`` as a user runs it: a Ctrl-C ends the run with one line saying what is kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glare.engine.driver import checkpoint_step, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_ctrl_c_names_the_checkpoint_kept_and_the_rerun_resumes_from_it(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "glare.train", "--config", "tiny", f"train.storage_path={tmp_path}",
               "train.run_name=x", "train.log_every=10", "train.checkpoint_every=10"]
    env = {**os.environ, "RAY_worker_niceness": "0"}
    run_dir, log = tmp_path / "x", tmp_path / "out.log"
    with open(log, "w") as out:
        job = subprocess.Popen([*command, "train.steps=5000"], cwd=REPO, env=env, stdout=out,
                               stderr=subprocess.STDOUT, text=True)
        # Ctrl-C once Ray has registered a checkpoint.
        deadline = time.monotonic() + 300
        while latest_checkpoint(run_dir) is None and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        job.send_signal(signal.SIGINT)
        code = job.wait(timeout=120)
    text = log.read_text()
    # Ray's own Ctrl-C handler exits 0 from inside fit(); the run must not look like a success.
    assert code == 1, text[-3000:]
    (error,) = [line for line in text.splitlines() if line.startswith("error:")]
    summary = json.loads((run_dir / "summary.json").read_text())
    kept = checkpoint_step(Path(summary["checkpoint"]))
    assert error == f"error: training stopped: {summary['stop_reason']}"
    assert "interrupted (Ctrl-C) after logging step" in error and "of 5000" in error
    assert f"the last checkpoint (step {kept}, {summary['checkpoint']}) is intact" in error
    assert error.endswith("rerun with train.run_name=x to resume")
    assert kept > 0 and kept % 10 == 0 and summary["last_good_step"] == kept
    assert summary["miou_before"] is not None and summary["miou_after"] is None and summary["export"] is None

    # The rerun the line asks for resumes from that checkpoint and finishes.
    rerun = subprocess.run([*command, f"train.steps={kept + 10}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"[glare] resumed from step {kept} " in rerun.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == kept + 10
