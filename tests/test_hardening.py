"""Inputs that would be read wrong: refused with a TypeError naming the argument, before
anything is written."""

import numpy as np
import pytest
from conftest import CPU_BACKENDS, require_backend

import fastopt


def _big(a):
    return a.astype(a.dtype.newbyteorder(">"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["param", "grad", "both"])
def test_optimizer_refuses_non_native_byte_order(backend, dtype, which):
    require_backend(backend)
    w = np.linspace(-1, 1, 9).astype(dtype)
    g = np.full(9, 6.0, dtype)
    p = _big(w) if which in ("param", "both") else w
    grad = _big(g) if which in ("grad", "both") else g
    before = p.copy()
    opt = fastopt.Adam([p], lr=0.1, backend=backend, max_grad_norm=1.0)
    name = r"params\[0\]" if which in ("param", "both") else r"grads\[0\]"
    with pytest.raises(TypeError, match=rf"{name}: byte order of dtype '>f[48]'"):
        opt.step([grad])
    np.testing.assert_array_equal(p, before)
    assert opt.state == {} or all(not s for s in opt.state.values())


@pytest.mark.parametrize("call, name", [
    (lambda x: fastopt.clip_grad_norm_([x], 1.0), r"grads\[0\]"),
    (lambda x: fastopt.clip_grad_value_([x], 1.0), r"grads\[0\]"),
    (lambda x: fastopt.prune.magnitude_mask(x, 0.5), "w"),
    (lambda x: fastopt.init.uniform_(x, seed=0), "tensor"),
    (lambda x: fastopt.quant.quantize(x, 0.1, 0, "int8"), "x"),
    (lambda x: fastopt.quant.qparams(x, "int8"), "x"),
    (lambda x: fastopt.weight_norm(x.reshape(3, 4), np.ones((3, 1), x.dtype)), "v"),
    (lambda x: fastopt.distill.kd_loss(x.reshape(3, 4), np.zeros((3, 4), np.float32)),
     "student_logits"),
], ids=["clip_grad_norm_", "clip_grad_value_", "magnitude_mask", "uniform_", "quantize",
        "qparams", "weight_norm", "kd_loss"])
def test_public_functions_refuse_non_native_byte_order(call, name):
    x = _big(np.linspace(-3, 3, 12).astype(np.float32))
    before = x.copy()
    with pytest.raises(TypeError, match=rf"{name}: byte order of dtype '>f4' is not this"):
        call(x)
    np.testing.assert_array_equal(x, before)


def test_values_that_are_only_read_may_have_any_byte_order():
    """Quantization parameters are values, read with their dtype: converted, not refused."""
    q = np.array([1, 2, 3, 4], np.int8)
    got = fastopt.quant.dequantize(q, np.array([0.5], ">f8"), np.array([1], ">i8"))
    np.testing.assert_array_equal(got, fastopt.quant.dequantize(q, 0.5, 1))


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (2**31, ValueError), (-3, ValueError),
                                      (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_thread_counts_are_checked_up_front(bad, exc):
    w = np.zeros(3, np.float32)
    with pytest.raises(exc, match="n_threads must be an integer >= 1"):
        fastopt.Adam([w], n_threads=bad)
    with pytest.raises(exc, match="n must be an integer >= 1"):
        fastopt.set_num_threads(bad)
    opt = fastopt.Adam([w], n_threads=np.int64(2))  # NumPy integers are integers
    assert opt.n_threads == 2 and type(opt.n_threads) is int


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 10**400, 2**60, -1, 1.5, True,
                                 "3", [3]])
def test_loaded_step_counts_are_finite_integers(bad):
    w = np.zeros(3)
    opt = fastopt.Adam([w])
    opt.step([np.ones(3)])
    saved = opt.state_dict()
    saved["state"][0] = dict(saved["state"][0], step=bad)
    fresh = fastopt.Adam([np.zeros(3)])
    with pytest.raises(ValueError, match=r"\['step'\]: expected an integer >= 0 \(at most "):
        fresh.load_state_dict(saved)
    assert fresh.state == {}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concurrent_steps_of_one_optimizer_serialize(backend):
    """Two threads stepping one optimizer: the same as the steps one after the other."""
    import threading
    require_backend(backend)
    rng = np.random.default_rng(3)
    start = [rng.standard_normal(n).astype(np.float32) for n in (70001, 5)]
    grads = [np.full_like(w, 0.5) for w in start]

    def run(threads):
        params = [w.copy() for w in start]
        opt = fastopt.Adam(params, lr=1e-2, backend=backend)
        barrier = threading.Barrier(threads)

        def work():
            barrier.wait()
            for _ in range(40 // threads):
                opt.step(grads)
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        return params, opt.state

    (got, got_state), (want, want_state) = run(2), run(1)
    assert got_state[0]["step"] == want_state[0]["step"] == 40
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_optimizer_copies_get_their_own_lock():
    import copy
    w = np.zeros(3)
    opt = fastopt.Adam([w], lr=0.1)
    twin = copy.deepcopy(opt)
    twin.step([np.ones(3)])
    assert twin.state[0]["step"] == 1 and opt.state == {}


def test_numba_backend_leaves_openmp_unnested():
    """Numba's OpenMP layer turns nesting on in the libgomp that a fastopt extension loaded
    first and torch then shares (torch's per-tensor steps went 20-40x slower); loading the
    backend turns it off again."""
    import subprocess
    import sys
    require_backend("numba")
    code = ("import ctypes\n"
            "from fastopt._cpu import _stream\n"  # loads the system libgomp first
            "from fastopt import _backends, _config\n"
            "assert _backends.available('numba')\n"
            "levels = [ctypes.CDLL(p).omp_get_max_active_levels()\n"
            "          for p in _config.openmp_runtimes() if 'libgomp' in p]\n"
            "print(levels)\n"
            "assert levels and all(level == 1 for level in levels), levels\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_NESTED", "OMP_MAX_ACTIVE_LEVELS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
