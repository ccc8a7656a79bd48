"""PeakMemory measures what a stretch of work allocates, and restart drops earlier peaks."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

# Run in a fresh interpreter: the test process's resident set also moves with whatever else lives in it
# (Ray's threads after an earlier test's ray.init, allocator caches), which would blur the figures.
SCRIPT = """
import json, torch
from glare.engine.memory import PeakMemory
memory = PeakMemory(torch.device("cpu"))
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so it is resident
held = memory.peak_mb()
big = torch.ones(256 * 2**20 // 4)  # a peak of 256 MiB more, then freed
peak = memory.peak_mb()
del big
memory.restart()
print(json.dumps({"held": held, "peak": peak, "after_restart": memory.peak_mb()}))
"""


def test_a_held_allocation_counts_and_a_restart_forgets_a_freed_one() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert 60 < got["held"] < 200
    assert got["peak"] > got["held"] + 240
    assert got["after_restart"] < got["held"] + 100  # only what is still held (and allocator slack) remains
