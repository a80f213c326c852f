"""Shared fixtures. Caches that would land in $HOME go to a temporary folder instead,
removed when the test process exits."""

import atexit
import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="fastopt-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(_CACHE, "cupy"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The references that run on torch use MKL's BLAS (prodigyopt's torch.dot), whose float32
# summation order depends on the CPU: on an Intel Xeon with AVX-512 Prodigy's d came out
# 5.6e-6 of the scale away from the same run on an AMD EPYC. MKL's conditional numerical
# reproducibility makes it the same on every x86 CPU (read when MKL starts: before torch).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastopt import _backends, _rules, _scalars  # noqa: E402

CPU_BACKENDS = ("numpy", "cython", "numba")


def run_factors(backend, shape, work, dtype, seed, n_threads=1):
    """Adafactor's factors pass of `backend` (a Compiled module, or the CUDA emulation) over
    slices `shape` ((B, R, C) rows) and `work` (_twopass.factor_work's), on gradients with
    an outlier (clipped) and factors drawn from `seed`: the new rows + columns + row means."""
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(b * r * c).astype(dtype) for b, r, c in shape]
    grads[0][min(17, grads[0].size - 1)] = 1e30
    scalars, _ = _scalars.adafactor_scalars(np.dtype(dtype), step=4, lr=0.01,
                                            beta2_decay=-0.8, eps1=None, weight_decay=0.0,
                                            maximize=True, grad_scale=0.7, grad_clip=3.0)
    rows = [rng.uniform(0.5, 1, b * r).astype(dtype) for b, r, c in shape]
    cols = [rng.uniform(0.5, 1, b * c).astype(dtype) for b, r, c in shape]
    rmeans = [np.zeros(b, dtype) for b, r, c in shape]
    backend.factors(grads, rows, cols, rmeans, shape, *work,
                    _rules.ADAFACTOR_ARGS.record(np.dtype(dtype), scalars), n_threads)
    return rows + cols + rmeans


def kd_case(dtype, rows, with_labels, seed):
    """Student and teacher logits (rows x 1531, spread 20) and labels or None, for the
    distillation kernels' bit-identity tests."""
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((rows, 1531)) * 20).astype(dtype)
    t = (rng.standard_normal((rows, 1531)) * 20).astype(dtype)
    return s, t, rng.integers(0, 1531, rows) if with_labels else None


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


# The frameworks a test compares with, each asked for by the tests that need it (so that
# the others run where it is not installed): a test taking `torch` skips without torch.

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def scipy_stats():
    return pytest.importorskip("scipy.stats")
