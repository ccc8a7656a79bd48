"""GLARE on an autoscaling multi-node Ray cluster, simulated on this machine (cluster/rehearse.py).

Each test starts a fake cluster: a head that holds no CPU for training and a worker node type of
1 CPU. The autoscaler launches real raylets for the nodes, so Ray Train's placement, DDP over gloo
between "nodes", node loss and Ray Tune's trial placement run as they would on a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))

from rehearse import FakeCluster  # noqa: E402

pytestmark = pytest.mark.slow

TWO_NODES = ["--config", "tiny", "ray.num_workers=2", "ray.cpus_per_worker=1",
             "ray.placement_strategy=STRICT_SPREAD"]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive_nodes(cluster: FakeCluster) -> dict[str, dict[str, float]]:
    """Node id -> resources of every live node, asked from a short-lived driver."""
    script = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
              "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", script], env=cluster_env(cluster), capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


def training_nodes(cluster: FakeCluster) -> set[str]:
    """The nodes the live Ray Train workers run on (a node may also hold only Ray Data's blocks): those
    whose raylet has a ``RayTrainWorker`` process among its children."""
    nodes = set()
    for raylet in cluster.processes():
        try:
            node = next((a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id=")), None)
            if node and any("RayTrainWorker" in " ".join(p.cmdline()) for p in raylet.children(recursive=True)):
                nodes.add(node)
        except psutil.Error:  # a process that ended meanwhile
            continue
    return nodes


def cluster_env(cluster: FakeCluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def train(cluster: FakeCluster, storage: Path, *overrides: str) -> subprocess.Popen:
    """``python -m glare.train`` as a user starts it on the cluster (stdout and stderr to storage/out.log)."""
    storage.mkdir(parents=True, exist_ok=True)
    log = open(storage.parent / f"{storage.name}.log", "w")  # noqa: SIM115 (the process holds it)
    # --verbose: the workers' lines (e.g. "resumed from step N") reach the log.
    command = [sys.executable, "-m", "glare.train", "--verbose", *TWO_NODES, f"train.storage_path={storage}",
               "train.run_name=run", *overrides]
    return subprocess.Popen(command, cwd=REPO, env=cluster_env(cluster), stdout=log, stderr=subprocess.STDOUT,
                            text=True)


def output(storage: Path) -> str:
    return (storage.parent / f"{storage.name}.log").read_text()


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "step" in r and "event" not in r]


def registered_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint Ray Train has registered (what a restart resumes from), from the
    snapshot its controller writes to storage after each registration; None before the first."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return None
    return latest["metrics"]["step"] if latest else None


def test_two_workers_scale_up_two_nodes_and_the_nodes_go_when_idle(tmp_path: Path) -> None:
    with FakeCluster(workers=2, worker_cpus=1, head_cpus=0, idle_timeout_s=10) as cluster:
        (head,) = alive_nodes(cluster)  # no worker node until a job asks for one
        storage = tmp_path / "runs"
        job = train(cluster, storage, "train.steps=4")
        assert job.wait(timeout=600) == 0, output(storage)[-3000:]

        assert [p.name for p in storage.iterdir()] == ["run"]  # one run directory on the shared path
        run_dir = storage / "run"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["stop_reason"] == ""
        assert 0 < summary["miou_before"] < 1 and 0 < summary["miou_after"] < 1
        assert Path(summary["checkpoint"]).parent == run_dir and Path(summary["export"]).is_file()
        # DDP across two nodes: each rank on its own node, neither on the head.
        nodes = summary["worker_nodes"]
        assert len(nodes) == 2 and len(set(nodes)) == 2 and head not in nodes

        # The autoscaler removes the idle nodes within its timeout (plus a few update intervals).
        wait_for(lambda: list(alive_nodes(cluster)) == [head], 10 + 30, "the idle worker nodes to go")


@pytest.mark.parametrize(("max_nodes", "replaced"), [(3, True), (2, False)], ids=["replaced", "no-capacity"])
def test_a_lost_node(tmp_path: Path, max_nodes: int, replaced: bool) -> None:
    """A node dies after a checkpoint: with room for a new node the run resumes from the newest checkpoint
    Ray had registered, not from scratch; with none it stops after ``ray.capacity_wait_s``, checkpoint kept.

    (The fake provider keeps a killed node on its books, so ``max_nodes=2`` leaves no room for a new one.)
    """
    every = 5
    with FakeCluster(workers=max_nodes, worker_cpus=1, head_cpus=0, idle_timeout_s=30) as cluster:
        storage = tmp_path / "runs"
        run_dir = storage / "run"
        job = train(cluster, storage, "train.steps=30", f"train.checkpoint_every={every}", "train.log_every=1",
                    "ray.max_failures=1", f"ray.capacity_wait_s={90 if replaced else 15}")
        # Kill a training node once Ray has registered a checkpoint and a step past it is logged. (A
        # checkpoint_* folder alone is not enough: Ray restores only the checkpoints its controller has
        # registered, and on loaded cores a node can die between the upload and the registration.)
        registered = wait_for(lambda: (step := registered_step(run_dir)) is not None
                              and max(logged_steps(run_dir), default=0) > step and step,
                              420, "a registered checkpoint and a step past it")
        nodes = training_nodes(cluster)
        assert len(nodes) == 2, f"the 2 training workers were found on {len(nodes)} node(s)"
        victim = min(nodes)  # a node a training worker runs on
        killed_at = max(logged_steps(run_dir))
        cluster.kill_node(victim)
        code = job.wait(timeout=600)
        log, summary = output(storage), json.loads((run_dir / "summary.json").read_text())

    assert Path(summary["checkpoint"]).is_dir()
    if replaced:
        assert code == 0, log[-3000:]
        assert summary["steps"] == 30 and victim not in summary["worker_nodes"]
        # From the run's record: the workers' lines on a newly started node can reach the driver's log
        # after the driver has ended (what a CI run once saw).
        resumed = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if r.get("event") == "resume"]
        assert len(resumed) == 1 and resumed[0] % every == 0, f"resumed from {resumed}, not from step {registered}"
        # From the newest checkpoint Ray had when the node died (+1: a step that ended as the kill landed).
        assert registered <= resumed[0] <= killed_at + 1
        print(f"node lost after step {killed_at}, resumed from step {resumed[0]}")  # shown with -s
    else:
        assert code == 1, log[-3000:]
        assert summary["miou_after"] is None and summary["export"] is None
        error = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "no capacity for 2 worker(s)" in error[0] and "ray.capacity_wait_s=15" in error[0]
        assert "train.run_name=run to resume" in error[0] and summary["checkpoint"] in error[0]


def test_a_sweep_runs_its_trials_on_two_autoscaled_nodes_and_releases_them(tmp_path: Path) -> None:
    """Two concurrent one-worker trials (1 CPU each) on nodes of 1 CPU: each trial on its own node. When
    the sweep ends every placement group is removed and the cluster asks for nothing more."""
    with FakeCluster(workers=2, worker_cpus=1, head_cpus=1, idle_timeout_s=30) as cluster:
        run = subprocess.run(
            [sys.executable, "tune/sweep.py", "--sweep", "tiny", f"sweep.storage_path={tmp_path}",
             "sweep.num_samples=2", "sweep.resources.max_concurrent=2", "sweep.scheduler.enabled=false",
             "ray.cpus_per_worker=1", "train.steps=4"],
            cwd=REPO, env=cluster_env(cluster), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        script = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                  "print(json.dumps([g['state'] for g in ray.util.placement_group_table().values()]))")
        states = json.loads(subprocess.run([sys.executable, "-c", script], env=cluster_env(cluster),
                                           capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address={cluster.address}"],
                                env=cluster_env(cluster), capture_output=True, text=True, check=True).stdout

    exp = tmp_path / "glare-sweep-tiny"
    ends = [next(r for r in map(json.loads, (t / "train" / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "end") for t in sorted(exp.glob("trial_*"))]
    assert len(ends) == 2 and all(e["step"] == 4 for e in ends)
    (node_a,), (node_b,) = (e["worker_nodes"] for e in ends)
    assert node_a != node_b  # 1-CPU nodes hold one 1-CPU trial each
    assert states and set(states) == {"REMOVED"}  # no leaked placement group (cf. Ray issue 54305)
    assert "(no resource demands)" in status, status
