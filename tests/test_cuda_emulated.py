"""The CUDA kernels for pruning, quantization, distillation, Adafactor's factors pass and the
optimizer steps on storage formats run on the host (cuda_host_emulation.cpp: a thread per
CUDA thread, a barrier for __syncthreads) and equal the NumPy reference bit for bit (the
factors pass and the format steps: the Cython backend's, which the parity and format tests
hold to it). This runs in CI, which has no GPU; test_cuda.py's GPU tests run the same
kernels on the device."""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import format_cases
import numpy as np
import pytest
from cases import RULE_OF, kernel_hyper
from conftest import kd_case, run_factors

from fastopt import _rules
from fastopt._backends import _cupy, _formats, _layout, _select, _twopass
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
        """The launch table (operand addresses per tensor, then the chunks) and the number
        of chunks; an operand list None gives each tensor the address 0 (none)."""
        chunks = [(t, lo, min(_select.CHUNK, a.size - lo)) for t, a in enumerate(operands[0])
                  for lo in range(0, a.size, _select.CHUNK)]
        addresses = [0 if op is None else op[t].ctypes.data
                     for t in range(len(operands[0])) for op in operands]
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


# -- storage formats (optim.cu's fo_cuda_fmt_<NAME>): the Cython backend's format chunks
# (kernels/cpu/format_loops.h), which test_formats_cython holds to the NumPy reference

FMT_SLOTS = 8  # FO_CUDA_FMT_SLOTS


def _run_fmt(lib, kernel, prob, record, factors=None):
    """A format kernel over format_cases.Problem `prob` (with a cautious step's `factors`):
    its table, Emulated's (operand addresses per tensor: the kernel's, the factor, the
    shadow, the mask, each state operand's block scales; then the chunks), then the struct,
    the format codes, stochastic, the step, the 8-bit maps' address and the keys. Blocks of
    FO_Q8_BLOCK threads with 8-bit state, else of 32."""
    ops, formats = prob.operands, prob.formats
    n_state = len(ops) - 3 - formats.shadow
    scales = iter(formats.scales)
    q8 = [code in (_formats.Q8S, _formats.Q8U) for code in formats.storage[3:3 + n_state]]
    table, grid = Emulated._table(list(ops[:3 + n_state]) + ([factors] if factors else []) + [
        ops[-1] if formats.shadow else None, prob.masks] + [
        next(scales) if quantized else None for quantized in q8])
    args = _rules.pack(record).view(np.int64)
    codes = list(formats.storage[:3 + n_state]) + [0] * (FMT_SLOTS - 3 - n_state)
    if formats.shadow:
        codes[-1] = formats.storage[-1]
    maps = np.concatenate([_formats.QMAPS[_formats.Q8S], _formats.QMAPS[_formats.Q8U]]
                          ).astype(np.float32)
    full = np.concatenate([table, args, np.array(
        codes + [formats.stochastic, formats.step, maps.ctypes.data if any(q8) else 0],
        np.int64), formats.keys.astype(np.int64).reshape(-1)])
    getattr(lib, f"run_fmt_{kernel}")(ctypes.c_long(grid),
                                      ctypes.c_long(_formats.BLOCK if any(q8) else 32),
                                      _p(full), ctypes.c_longlong(len(ops[0])),
                                      ctypes.c_longlong(table.size),
                                      ctypes.c_longlong(table.size + args.size))


class FmtConfig(NamedTuple):  # what format_cases.problem reads of a configuration
    param: str            # the parameter's storage (the shadow's, with master weights)
    grad: str             # "param" (the parameter's format) or a format
    state: str
    master: bool          # float32 params (the master copy) and a shadow in `param`
    stochastic: bool
    in_place: bool
    masks: bool


FMT_CONFIGS = [
    FmtConfig("bfloat16", "param", "bfloat16", False, True, True, True),
    FmtConfig("bfloat16", "float32", "float32", False, False, False, False),
    FmtConfig("float16", "param", "float16", False, True, False, True),
    FmtConfig("float32", "param", "bfloat16", False, False, True, False),
    FmtConfig("bfloat16", "param", "bfloat16", True, True, True, True),
    FmtConfig("float16", "float32", "bfloat16", True, False, False, True),
]
# 8-bit state, on kernels of 1 to 4 state arrays of either map (the 8-bit code is the same
# for every rule, and the emulation's barriers make it slow here: 256 threads a block)
Q8_CONFIGS = [
    FmtConfig("bfloat16", "param", "int8", False, True, True, True),
    FmtConfig("float32", "param", "int8,bfloat16", False, False, False, False),
    FmtConfig("bfloat16", "float32", "int8", True, True, True, False),
]
Q8_KERNELS = ("adadelta", "adam", "adan", "ademamix", "lion", "prodigy_update",
              "rmsprop_centered_momentum")
Q8_SIZES = (1, 7, 9, 256, 257, 1023)  # 8-bit blocks whole and partial
# with Q8_CONFIGS[0], also a tensor past a chunk (each 256-thread block is costly here)
Q8_PAST_CHUNK = ("adam", "adan")
FMT_CASES = [(kernel, config) for config in FMT_CONFIGS for kernel in sorted(RULE_OF)] + [
    (kernel, config) for config in Q8_CONFIGS for kernel in Q8_KERNELS]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf quantized (setup)
@pytest.mark.parametrize("kernel, config", FMT_CASES,
                         ids=[f"{k}-{'-'.join(map(str, c))}" for k, c in FMT_CASES])
def test_format_kernels(lib, kernel, config):
    """Every elementwise kernel on bfloat16, float16 and float32 operands and 8-bit state
    (stochastic and nearest rounding, master weights with their shadow, in place and out of
    place, masks)
    over 2 steps of normal and special values: the bits of the Cython backend's format
    chunks, parameters, state and shadow (with special values, any NaN for a NaN)."""
    from fastopt._backends._cython import optim as cython_optim
    q8 = format_cases.Q8 in config.state
    # 8-bit state: blocks whole, partial and past a chunk, a few special values (a NaN makes
    # its whole block NaN: most blocks would hold one at 0.2)
    sizes = (1, 7, 9, 1023, 20000) if not q8 else Q8_SIZES + (
        (16640,) if config == Q8_CONFIGS[0] and kernel in Q8_PAST_CHUNK else ())
    for special in (0.0, 0.002 if q8 else 0.2):
        prob = format_cases.problem(kernel, config, sizes, seed=sorted(RULE_OF).index(kernel),
                                    in_place=config.in_place, masks=config.masks,
                                    special=special)
        # (operands, 8-bit block scales) of the Cython chunks and of the CUDA kernel
        runs = [(format_cases.copy(prob.operands), format_cases.copy(prob.formats.scales))
                for _ in range(2)]
        rng = np.random.default_rng(5)
        for step in (1, 2):
            rec = format_cases.record(kernel, kernel_hyper(kernel, step))
            grads = [format_cases.values(rng, n, prob.operands[2][0].dtype, special=special)
                     for n in sizes]
            runs = [(ops[:2] + ([g.copy() for g in grads],) + ops[3:], scales)
                    for ops, scales in runs]
            (cy_ops, cy_scales), (cu_ops, cu_scales) = runs
            cython_optim.elementwise(
                kernel, cy_ops, rec, 1, masks=prob.masks,
                formats=prob.formats._replace(step=step, scales=cy_scales))
            _run_fmt(lib, kernel, prob._replace(
                operands=cu_ops, formats=prob.formats._replace(step=step, scales=cu_scales)),
                rec)
            # a NaN's sign and payload follow the compiler's operand order (and a GPU's NaN
            # is canonical): NaN where the CPU has NaN, the other bits equal
            format_cases.assert_same(cu_ops + cu_scales, cy_ops + cy_scales,
                                     f"{kernel} {config} step {step}", nan_sign=not special)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf quantized (setup)
@pytest.mark.parametrize("config", [FMT_CONFIGS[0], FMT_CONFIGS[4], Q8_CONFIGS[0]],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("kernel", sorted(_rules.CAUTIOUS_KERNELS))
def test_cautious_format_kernels(lib, kernel, config):
    """The cautious steps on storage formats (their tensor's factor one more operand), 8-bit
    state too: the bits of the XLA handler's format chunks (the Cython backend runs these
    through its scratch path), which test_jax holds to the array API."""
    pytest.importorskip("jax")
    from fastopt import _jax_ffi
    base = kernel.removesuffix("_cautious")
    q8 = format_cases.Q8 in config.state
    sizes = Q8_SIZES if q8 else (1, 9, 1023, 20000)
    prob = format_cases.problem(base, config, sizes, seed=3, in_place=True,
                                masks=config.masks, special=0.002 if q8 else 0.0)
    factors = [np.array([1.25 + t], np.float32) for t in range(len(sizes))]
    ops = format_cases.copy(prob.operands)
    n_state = len(ops) - 3 - prob.formats.shadow
    formats = prob.formats._replace(step=4)
    rec = format_cases.record(base, kernel_hyper(base, 4))
    new = _jax_ffi.elementwise(
        kernel, _rules.pack(rec), ops[0], ops[2],
        [[ops[3 + k][t] for k in range(n_state)] + [factors[t]] for t in range(len(sizes))],
        1, masks=prob.masks, formats=(formats.stochastic, formats.keys, formats.step),
        shadow=ops[-1] if formats.shadow else None,
        scales=[[a[t] for a in formats.scales] for t in range(len(sizes))] if q8 else None)
    # the handler's results: new params, their state lists (and the new shadows), then each
    # tensor's new block scales, put in the order of formats.scales
    if q8:
        new = list(new[:-1]) + [[s[k] for s in new[-1]] for k in range(len(formats.scales))]
    want = [new[0]] + [[s[k] for s in new[1]] for k in range(n_state)] + list(new[2:])
    want = [[np.asarray(x) for x in xs] for xs in want]  # before the kernel writes ops
    _run_fmt(lib, kernel, prob._replace(operands=ops, formats=formats), rec, factors)
    got = [ops[1]] + [ops[3 + k] for k in range(n_state)] + (
        [ops[-1]] if formats.shadow else []) + list(formats.scales)
    # with special values: NaN where the handler has NaN (a NaN's sign and payload follow
    # the compiler's operand order), the other bits equal
    format_cases.assert_same(got, want, f"{kernel} {config}", nan_sign=not q8)
