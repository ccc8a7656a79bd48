"""Rehearse a cluster run on one machine: a local Ray head whose autoscaler starts fake worker nodes.

Ray's ``fake_multinode`` node provider (what ``ray.cluster_utils.AutoscalingCluster`` drives in
Ray's own tests) launches each "node" as a separate raylet on this machine, so the autoscaler,
placement groups, node loss and Ray Train's restarts behave as they do on a real cluster.

    python cluster/rehearse.py --workers 2 --cpus 1 -- \\
        python -m glare.train --config tiny ray.num_workers=2 ray.placement_strategy=STRICT_SPREAD

We start the head ourselves rather than with ``AutoscalingCluster.start``: that one runs
``ray stop --force`` (killing every Ray instance on the machine) and needs a YAML its wheel does
not ship. This cluster has its own port and temp dir, and :meth:`FakeCluster.stop` ends only the
processes of that temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
WORKER_TYPE = "ray.worker.cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaler_config(head_cpus: float, workers: int, worker_cpus: float, idle_timeout_s: float,
                      gcs_address: str, object_store_mb: int = 200) -> dict[str, Any]:
    """The cluster-launcher config of a fake cluster: one head, up to ``workers`` nodes of one type."""
    return {
        "cluster_name": "glare-rehearsal",
        "max_workers": workers,
        "upscaling_speed": float(workers),  # launch every node a request needs at once
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": worker_cpus, "object_store_memory": object_store_mb * 1024**2},
                          "node_config": {},
                          "min_workers": 0, "max_workers": workers},
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeCluster:
    """A local autoscaling Ray cluster; use as a context manager, connect with ``address``."""

    def __init__(self, workers: int = 2, worker_cpus: float = 1, head_cpus: float = 1,
                 idle_timeout_s: float = 10, object_store_mb: int = 200) -> None:
        self.workers, self.worker_cpus, self.head_cpus = workers, worker_cpus, head_cpus
        self.idle_timeout_s, self.object_store_mb = idle_timeout_s, object_store_mb
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short: Ray's socket paths live under it and must stay below ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="grc-", dir="/tmp"))

    def start(self) -> FakeCluster:
        """Start the head and its autoscaler (no worker node yet: they come on demand)."""
        config_path = self.temp_dir / "autoscaler.json"
        config_path.write_text(json.dumps(autoscaler_config(
            self.head_cpus, self.workers, self.worker_cpus, self.idle_timeout_s, self.address, self.object_store_mb)))
        # Token auth off unless the caller chose it: the rehearsal listens on this machine only, and
        # the drivers it serves (a plain ``ray.init``) start without a token.
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
               # The nodes' workers import the checkout's modules (a sweep's trials unpickle tune.space).
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        ray_cli = Path(sys.executable).parent / "ray"
        subprocess.run(
            [str(ray_cli), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={self.head_cpus}", f"--object-store-memory={self.object_store_mb * 1024**2}",
             f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config_path}",
             "--include-dashboard=false", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, text=True)
        return self

    def processes(self) -> list[psutil.Process]:
        """This cluster's Ray processes (those whose command line names its temp dir or port)."""
        marks = (str(self.temp_dir), f":{self.port}")
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(m in arg for arg in p.info["cmdline"] or () for m in marks):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def kill_node(self, node_id: str) -> None:
        """Lose a worker node at once, as a reclaimed spot instance would: SIGKILL its raylet and workers."""
        raylets = [p for p in self.processes() if f"--node_id={node_id}" in p.cmdline()]
        if not raylets:
            raise ValueError(f"no raylet of node {node_id} in this cluster")
        for raylet in raylets:
            for p in [*raylet.children(recursive=True), raylet]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

    def stop(self) -> None:
        """End every process of this cluster (and their children), then remove its temp dir."""
        procs = self.processes()
        for p in list(procs):
            try:
                procs += p.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a command (``-- CMD ...``) against a fresh fake cluster, with ``RAY_ADDRESS`` set to it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="most worker nodes the autoscaler may start")
    parser.add_argument("--cpus", type=float, default=1, help="CPUs of each worker node")
    parser.add_argument("--head-cpus", type=float, default=1, help="CPUs of the head (drivers, Ray Data)")
    parser.add_argument("--idle-timeout", type=float, default=10, help="seconds before an idle node goes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with FakeCluster(args.workers, args.cpus, args.head_cpus, args.idle_timeout) as cluster:
        print(f"[rehearse] fake cluster at {cluster.address} (head {args.head_cpus} CPU, up to "
              f"{args.workers} nodes of {args.cpus} CPU)", flush=True)
        t0 = time.time()
        env = {**os.environ, "RAY_ADDRESS": cluster.address,
               "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        code = subprocess.call(command, env=env)
        print(f"[rehearse] command exited {code} after {time.time() - t0:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
