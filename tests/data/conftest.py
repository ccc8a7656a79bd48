"""Fixtures for the data-layer tests: one small Ray cluster per test module that needs it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# Set before ray.data is imported by the test modules: quiet, offline, no token file.
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A 2-CPU local Ray cluster with a small object store, shut down after the module."""
    import ray

    if ray.is_initialized():  # someone else's cluster: use it, leave it running
        yield
        return
    # A short temp dir: Ray's socket paths must stay under the 107-character limit.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
