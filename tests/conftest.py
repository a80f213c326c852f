"""Shared fixtures. Caches that would land in $HOME go to a temporary folder instead."""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="fastopt-test-cache-")
os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(_CACHE, "cupy"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastopt import _backends  # noqa: E402

CPU_BACKENDS = ("numpy", "cython", "numba")


def require_backend(name):
    """Skip unless the backend works here; CI installs every CPU backend, so only the GPU
    one is ever skipped there (test_ci_has_every_cpu_backend checks that)."""
    module, reason = _backends.load(name)
    if module is None:
        pytest.skip(f"backend {name} unavailable: {reason}")


def pytest_collection_modifyitems(config, items):
    if _backends.available("cupy"):
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (fastopt[cuda])")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
