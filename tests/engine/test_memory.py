"""PeakMemory measures what a stretch of work allocates, and restart drops earlier peaks."""

import sys

import pytest
import torch

from glare.engine.memory import PeakMemory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def test_a_held_allocation_counts_and_a_restart_forgets_a_freed_one() -> None:
    memory = PeakMemory(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so it is resident
    held = memory.peak_mb()
    assert 60 < held < 200
    big = torch.ones(256 * 2**20 // 4)  # a peak of 256 MiB more, then freed
    assert memory.peak_mb() > held + 240
    del big
    memory.restart()
    assert memory.peak_mb() < held + 100  # only what is still held (and allocator slack) remains
    del block
