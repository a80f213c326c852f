"""The CUDA kernels for pruning, quantization, distillation and Adafactor's factors pass run
on the host (cuda_host_emulation.cpp: a thread per CUDA thread, a barrier for
__syncthreads) and equal the NumPy reference bit for bit (the factors pass: the Cython
backend's, which the parity tests hold to it). This runs in CI, which has no GPU;
test_cuda.py's GPU tests run the same kernels on the device."""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import kd_case, run_factors

from fastopt._backends import _cupy, _layout, _select, _twopass
from fastopt._backends._cupy import optim as cupy_optim
from fastopt._backends._layout import CE_SQUARES
from fastopt._backends._numpy import compress as ref

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        if os.environ.get("CI"):
            pytest.fail("g++ is missing in CI")
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("emulation") / "emulation.so"
    proc = subprocess.run([gxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared",
                           f"-I{HERE.parent / 'kernels' / 'include'}",
                           str(HERE / "cuda_host_emulation.cpp"), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(out))


def _p(a):
    return ctypes.c_void_p(a.ctypes.data)


def _sfx(dtype):
    return "f64" if dtype == np.float64 else "f32"


def _real(dtype):
    return ctypes.c_double if dtype == np.float64 else ctypes.c_float


def _key(dtype):
    return ctypes.c_uint64 if dtype == np.float64 else ctypes.c_uint32


def _run(lib, name, dtype, grid, block, *args):
    getattr(lib, f"run_{name}_{_sfx(dtype)}")(ctypes.c_long(grid), ctypes.c_long(block), *args)


class Emulated:
    """The CuPy backend's select passes, quant_loop, kd_rows and factors (same launches and
    arguments), on host arrays."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _table(operands):
        chunks = [(t, lo, min(_select.CHUNK, a.size - lo)) for t, a in enumerate(operands[0])
                  for lo in range(0, a.size, _select.CHUNK)]
        addresses = [op[t].ctypes.data for t in range(len(operands[0])) for op in operands]
        return np.array(addresses + list(np.ravel(chunks)), np.int64), len(chunks)

    def _prune(self, kernel, operands, *args):
        table, n_chunks = self._table(operands)
        _run(self.lib, f"prune_{kernel}", operands[0][0].dtype, n_chunks, _layout.PRUNE_THREADS,
             _p(table),
             ctypes.c_longlong(len(operands[0])), *args)

    def prune_hist(self, arrays, shift, pmask, prefix, n_threads):
        key = _key(arrays[0].dtype)
        counts = np.zeros(2 ** _select.DIGIT_BITS, np.uint64)
        maxkey = np.zeros(1, np.uint64 if key is ctypes.c_uint64 else np.uint32)
        self._prune("hist", (arrays,), ctypes.c_int(shift), key(pmask), key(prefix),
                    _p(counts), _p(maxkey))
        return counts.astype(np.int64), int(maxkey[0])

    def prune_ties(self, arrays, thr, n_threads):
        out = np.zeros(_select.n_chunks(arrays), np.int64)
        self._prune("ties", (arrays,), _key(arrays[0].dtype)(thr), _p(out))
        return out

    def prune_mask(self, arrays, masks, thr, tie_modes, n_threads):
        self._prune("mask", (arrays, masks), _key(arrays[0].dtype)(thr),
                    _p(np.asarray(tie_modes, np.int64)))

    def quant_loop(self, op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed,
                   *, n_threads):
        x, out = x.reshape(-1), out.reshape(-1)
        grid, block = _cupy.grid(out.size)[0], _cupy.THREADS
        i64 = ctypes.c_longlong
        if op == "dequantize":
            _run(self.lib, "dequant", out.dtype, grid, block, _p(x), _p(out), i64(out.size),
                 i64(B), i64(C), _p(np.asarray(zp, np.int32)), _p(np.asarray(scale, np.float64)),
                 ctypes.c_int(is_signed))
            return 0
        real = _real(x.dtype)
        params = [np.ascontiguousarray(v, x.dtype) for v in
                  (inv, zp, inv if scale is None else scale)]
        nan = np.zeros(1, np.uint64)
        kind = {"quantize": 0, "fake_quantize": 2, "fake_quantize_grad": 3}[op]
        _run(self.lib, "quant", x.dtype, grid, block, ctypes.c_int(kind), _p(x), _p(out),
             _p(x if gy is None else gy.reshape(-1)), i64(x.size), i64(B), i64(C),
             *map(_p, params), real(qmin), real(qmax), ctypes.c_int(fused), _p(nan))
        return int(nan[0])

    def kd_rows(self, s, t, g, labels, temperature, wk, wc, *, n_threads):
        """Launched as the CuPy backend does: KD_ROWS rows per block. The gradient and the
        per-row results are written into buffers with KD_ROWS more rows than B, and the
        threads of the last block past row B - 1 must leave those untouched."""
        real = _real(s.dtype)
        temp = s.dtype.type(temperature)
        B, C = s.shape
        rows = np.full((B + _layout.KD_ROWS, 2), 7.0)
        grad = np.full((B + _layout.KD_ROWS, C), 7, g.dtype)
        _run(self.lib, "kd_rows", s.dtype, -(-B // _layout.KD_ROWS),
             _layout.KD_ROWS * _layout.LANES, _p(s), _p(t), _p(grad), ctypes.c_longlong(B),
             ctypes.c_longlong(C),
             None if labels is None else _p(np.asarray(labels, np.int64)), real(temp),
             real(wk), real(wc), ctypes.c_int(CE_SQUARES.get(float(temp), 0)), _p(rows))
        assert (rows[B:] == 7).all() and (grad[B:] == 7).all()
        g[...] = grad[:B]
        return rows[:B]

    def factors(self, grads, rows, cols, rmeans, shape, bands, blocks, slices, record,
                n_threads):
        parts = [np.empty(b * r * -(-c // _layout.COLS)) for b, r, c in shape]
        addresses = np.array([[a.ctypes.data for a in arrays]
                              for arrays in zip(grads, rows, cols, rmeans, parts)], np.int64)
        table, launches = cupy_optim.factor_launches(addresses, shape, slices, record)
        for kernel, grid, block, arguments in launches:
            getattr(self.lib, f"run_{kernel}_{_sfx(grads[0].dtype)}")(
                ctypes.c_long(grid[0]), ctypes.c_long(grid[1]), ctypes.c_long(block[0]),
                _p(table), *map(ctypes.c_longlong, arguments))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_kernels(lib, dtype):
    rng = np.random.default_rng(5)
    # rounded values: thousands of ties at the threshold, split across chunks and tensors
    ws = [np.round(rng.standard_normal(n) * 4).astype(dtype) for n in (1, 16384 * 3 + 5, 70001)]
    ws.append(rng.standard_normal(300 * 257).astype(dtype))
    total = sum(w.size for w in ws)
    for k in (0, 1, int(0.3 * total), total // 2, total - 1, total, 12345):
        got = [np.full(w.size, 7, np.uint8) for w in ws]
        want = [np.zeros(w.size, np.uint8) for w in ws]
        assert _select.magnitude_masks(Emulated(lib), ws, got, k, n_threads=1)
        ref.magnitude_masks(ws, want, k)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=f"k={k}")
    ws[2][7] = np.nan
    assert not _select.magnitude_masks(Emulated(lib), ws, got, 5, n_threads=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, C", [(1, 37 * 103), (37, 103), (103, 1)])
def test_quant_kernels(lib, dtype, B, C):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(B * C) * 3).astype(dtype)
    x[5] = np.nan
    gy = rng.standard_normal(x.shape).astype(dtype)
    inv = rng.uniform(10, 100, B).astype(dtype)
    zp, scale = rng.integers(0, 4, B).astype(dtype), (1 / inv).astype(dtype)
    for op, fused in [("quantize", 0), ("quantize", 1), ("fake_quantize", 0),
                      ("fake_quantize_grad", 0)]:
        got = np.zeros(x.shape, np.uint8 if op == "quantize" else dtype)
        want = got.copy()
        args = (B, C, inv, zp, None if op == "quantize" else scale, -128, 127, fused, True)
        assert Emulated(lib).quant_loop(op, x, got, gy, *args, n_threads=1) == 1
        assert ref.quant_loop(op, x, want, gy, *args) == 1
        np.testing.assert_array_equal(got, want, err_msg=op)
    codes = rng.integers(0, 256, x.size).astype(np.uint8)
    for signed in (False, True):
        got, want = np.zeros(x.size, dtype), np.zeros(x.size, dtype)
        args = (None, B, C, None, rng.integers(-3, 4, B), rng.uniform(0.01, 0.1, B), 0, 0,
                False, signed)
        Emulated(lib).quant_loop("dequantize", codes, got, *args, n_threads=1)
        ref.quant_loop("dequantize", codes, want, *args)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# the cross entropy's exponentials: computed (3, 0.5), shared (1), squared (2, 4, 8)
@pytest.mark.parametrize("T", [3.0, 0.5, 1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_kd_kernel(lib, dtype, T, with_labels):
    s, t, labels = kd_case(dtype, 9, with_labels, seed=7)
    got, want = np.zeros_like(s), np.zeros_like(s)
    rows = Emulated(lib).kd_rows(s, t, got, labels, T, 0.3, 0.05, n_threads=1)
    np.testing.assert_array_equal(rows, ref.kd_rows(s, t, want, labels, T, 0.3, 0.05))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_factors_kernels(lib, dtype):
    """Adafactor's factors pass: the rows, columns (over several bands of FO_BAND rows, a
    partial last band, several column blocks) and row means equal the Cython backend's,
    which the parity tests hold to the NumPy reference bit for bit."""
    from fastopt._backends._cython import optim as cython_optim
    shape = np.array([(1, 150, 1100), (2, 3, 700), (1, 64, 5), (1, 1, 9)], np.int64)
    work = _twopass.factor_work(shape)
    got, want = (run_factors(backend, shape, work, dtype, 8)
                 for backend in (Emulated(lib), cython_optim))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
