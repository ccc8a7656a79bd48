"""Helpers shared by the benchmark scripts: environment, timing, memory, machine facts and tables.

Benchmarks print tables; they are never tests. Every comparison runs both sides on the
same machine in one invocation and reports medians of several repetitions after warm-up.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Quiet, offline defaults for timm, Ray and Ray Data (set before those are imported).
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"),
                     ("RAY_DATA_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402  (after the environment above)

from glare.engine.memory import current_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402, F401

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, kernels included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_cpu(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn``.

    CPU time (all threads) is much less sensitive than wall time to other processes sharing the cores,
    so on a busy CPU machine its ratios are the steadier ones.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: Sequence[float]) -> float:
    """Median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def bf16_peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s when it is a known one, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def cpu_model() -> str:
    """The processor's model name (lscpu's "Model name"), or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """1/5/15-minute load averages, as ``uptime`` shows them."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_summary(device: torch.device) -> str:
    """One paragraph of facts that a number needs next to it: date, hardware, versions, load."""
    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, python {platform.python_version()}, device {device}",
        f"load average (1/5/15 min): {load_average()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.insert(2, f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                        f"{props.multi_processor_count} SMs")
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(fmt, cells[1:])])


def verdict(ok: bool) -> str:
    """PASS or MISS for a target."""
    return "PASS" if ok else "MISS"


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device; a clear error when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available in this torch ({torch.__version__})")
    return device
