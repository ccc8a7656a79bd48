"""Memory of this process: resident set on the CPU, allocated bytes on CUDA.

Hand-written over /proc because neither torch nor psutil resets a process's peak RSS; Linux does,
through ``/proc/self/clear_refs``. Off Linux the CPU figures are NaN.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; NaN off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (since start or :func:`reset_peak_rss`), in MiB.

    VmHWM, not ``getrusage``'s ru_maxrss: Linux carries ru_maxrss across fork and exec, so a subprocess
    would report at least its parent's peak.
    """
    return _proc_status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Set the peak RSS to the current RSS (Linux >= 4.0; a no-op where /proc/self/clear_refs is missing)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class PeakMemory:
    """The peak memory of a stretch of work, above a baseline taken when this object is made.

    On CUDA: ``torch.cuda.max_memory_allocated`` (the baseline is what was allocated then); on the CPU:
    the peak resident set above the resident set then. Make it before the model is built so that the
    model's weights, the teacher's copy and the optimiser's state all count; call :meth:`restart` to
    drop peaks of earlier work (e.g. an evaluation) from the figure.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.base_mb = torch.cuda.memory_allocated(device) / 2**20 if self.cuda else current_rss_mb()

    def restart(self) -> None:
        """Forget the peak so far: from here on, only what is used from now counts (the baseline stays)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak_mb(self) -> float:
        """The peak since the last :meth:`restart` (or since start), in MiB above the baseline."""
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else peak_rss_mb()
        return peak - self.base_mb
