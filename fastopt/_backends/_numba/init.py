"""The Numba backend's kernels for fastopt.init and fastopt.weight_norm: the Philox fills
of fastopt/random.h and the weight-norm passes of fastopt/wnorm.h. Philox and the
polynomials are the NumPy reference's own (fastopt._backends._refmath, compiled here); the
loops are written for Numba (same operations, same order; the parity tests compare them with
the reference bit for bit)."""

import math
import types

import numba
import numpy as np
from numba import njit, prange

from fastopt._backends import _refmath, _slices
from fastopt._backends._layout import (
    BITS,
    CHUNK,
    LANES,
    MIN_PER_THREAD,
    NORMAL,
    PER_GROUP,
    TILE,
    UNIFORM,
)

_JIT = dict(cache=True, error_model="numpy")
_M32 = np.uint64(0xFFFFFFFF)
_S5, _S6, _S8, _S32, _S52 = (np.uint64(k) for k in (5, 6, 8, 32, 52))
_U32 = 2.3283064365386963e-10  # 2^-32




def _compile_refmath():
    """The functions of _refmath compiled by Numba, their calls to one another bound to the
    compiled versions (each is rebuilt from its code over a namespace that holds them).
    They are left to LLVM to inline: inlining them into Numba's IR at every call site made
    the fill kernel's compile 4x longer (9 -> 36 s for float32 normals) and ran no faster."""
    namespace = dict(vars(_refmath))
    for name in ("horner", "philox_rounds", "log_reduced", "sin_cos_reduced",
                 "ndtri_central", "ndtri_tail"):
        fn = getattr(_refmath, name)
        namespace[name] = njit(**_JIT)(
            types.FunctionType(fn.__code__, namespace, name))
    return namespace


_SHARED = _compile_refmath()
_philox_rounds, _log_reduced = _SHARED["philox_rounds"], _SHARED["log_reduced"]
_sin_cos_reduced = _SHARED["sin_cos_reduced"]
_ndtri_central, _ndtri_tail_of = _SHARED["ndtri_central"], _SHARED["ndtri_tail"]


@njit(inline="always", **_JIT)
def _philox(group, stream, k0, k1):
    return _philox_rounds(group & _M32, group >> _S32, np.uint64(0), stream, k0, k1)


@njit(inline="always", **_JIT)
def _unit53(hi, lo, plus):
    return (np.float64(hi >> _S5) * 67108864.0 + np.float64(lo >> _S6) + plus) \
        * 1.1102230246251565e-16


@njit(inline="always", **_JIT)
def _log(x):
    m, e = math.frexp(x)  # exact: x = m 2^e, m in [1/2, 1), as fo_log's bit fields
    e = np.float64(e)
    if m < _refmath.SQRT_HALF:
        m = m + m
        e = e - 1.0
    return _log_reduced(m, e)


@njit(inline="always", **_JIT)
def _cos_sin_2pi(u):
    t = 4.0 * u
    k = np.int64(t + 0.5)
    sa, ca = _sin_cos_reduced((t - np.float64(k)) * _refmath.HALF_PI)
    q = k & 3
    if q == 0:
        return ca, sa
    if q == 1:
        return -sa, ca
    if q == 2:
        return -ca, -sa
    return sa, -ca


@njit(inline="always", **_JIT)
def _normal_pair(u1, u2):
    radius = math.sqrt(-2.0 * _log(u1))
    c, s = _cos_sin_2pi(u2)
    return radius * c, radius * s


@njit(inline="always", **_JIT)
def _ndtri_tail(p):
    return _ndtri_tail_of(math.sqrt(-2.0 * _log(p + 1e-300)))


@njit(inline="always", **_JIT)
def _trunc_normal(u, r):
    t = r[6] * u
    p, q = r[4] + t, r[5] - t
    if p < _refmath.NDTRI_LOW:
        z = _ndtri_tail(p)
    elif q < _refmath.NDTRI_LOW:
        z = -_ndtri_tail(q)
    else:
        z = _ndtri_central(p)
    x = r[0] + r[1] * z
    return r[2] if x < r[2] else (r[3] if x > r[3] else x)


@njit(inline="always", **_JIT)
def _store(out, i, x):
    if i < out.size:
        out[i] = x


@njit(parallel=True, **_JIT)
def _fill(out, kind, per, r, k0, k1, stream):
    """Tile by tile (TILE groups, per outputs each): output l of group j of a tile is its
    element TILE * l + j."""
    size = TILE * per
    for tile in prange((out.size + size - 1) // size):
        for j in range(TILE):
            w0, w1, w2, w3 = _philox(np.uint64(TILE * tile + j), stream, k0, k1)
            i = size * tile + j
            if kind == BITS:
                _store(out, i, w0)
                _store(out, i + TILE, w1)
                _store(out, i + 2 * TILE, w2)
                _store(out, i + 3 * TILE, w3)
            elif kind == UNIFORM and per == 4:
                _store(out, i, r[0] + r[1] * (np.float64(w0 >> _S8) * 5.9604644775390625e-08))
                u1 = np.float64(w1 >> _S8) * 5.9604644775390625e-08
                _store(out, i + TILE, r[0] + r[1] * u1)
                _store(out, i + 2 * TILE,
                       r[0] + r[1] * (np.float64(w2 >> _S8) * 5.9604644775390625e-08))
                _store(out, i + 3 * TILE,
                       r[0] + r[1] * (np.float64(w3 >> _S8) * 5.9604644775390625e-08))
            elif kind == UNIFORM:
                _store(out, i, r[0] + r[1] * _unit53(w0, w1, 0.0))
                _store(out, i + TILE, r[0] + r[1] * _unit53(w2, w3, 0.0))
            elif kind == NORMAL and per == 4:
                z0, z1 = _normal_pair((np.float64(w0) + 1.0) * _U32, np.float64(w1) * _U32)
                z2, z3 = _normal_pair((np.float64(w2) + 1.0) * _U32, np.float64(w3) * _U32)
                _store(out, i, r[0] + r[1] * z0)
                _store(out, i + TILE, r[0] + r[1] * z1)
                _store(out, i + 2 * TILE, r[0] + r[1] * z2)
                _store(out, i + 3 * TILE, r[0] + r[1] * z3)
            elif kind == NORMAL:
                z0, z1 = _normal_pair(_unit53(w0, w1, 1.0), _unit53(w2, w3, 0.0))
                _store(out, i, r[0] + r[1] * z0)
                _store(out, i + TILE, r[0] + r[1] * z1)
            elif per == 4:
                _store(out, i, _trunc_normal(np.float64(w0) * _U32, r))
                _store(out, i + TILE, _trunc_normal(np.float64(w1) * _U32, r))
                _store(out, i + 2 * TILE, _trunc_normal(np.float64(w2) * _U32, r))
                _store(out, i + 3 * TILE, _trunc_normal(np.float64(w3) * _U32, r))
            else:
                _store(out, i, _trunc_normal(_unit53(w0, w1, 0.0), r))
                _store(out, i + TILE, _trunc_normal(_unit53(w2, w3, 0.0), r))


def random_fill(out, kind, reals, seed, stream, *, n_threads):
    flat = out.reshape(-1)
    _threads(n_threads, flat.size)
    _fill(flat, kind, PER_GROUP[kind, out.dtype.name], np.asarray(reals, np.float64),
          np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32), np.uint64(stream))


# -- weight normalization (fastopt/wnorm.h)


@njit(parallel=True, **_JIT)
def _slice_dot(x, y, A, B, C, items):
    K = max((C + CHUNK - 1) // CHUNK, 1)
    P = np.zeros((K, B), np.float64)
    for it in prange(items.shape[0]):
        b0, b1, k = items[it, 0], items[it, 1], items[it, 2]
        c0 = k * CHUNK
        length = min(C - c0, CHUNK)
        full = length - length % LANES
        lane = np.empty(LANES, np.float64)
        for a in range(A):
            for b in range(b0, b1):
                base = (a * B + b) * C + c0
                if C == 1:
                    P[k, b] += np.float64(x[base]) * np.float64(y[base])
                    continue
                lane[:] = 0.0
                for i in range(0, full, LANES):
                    for j in range(LANES):
                        lane[j] += np.float64(x[base + i + j]) * np.float64(y[base + i + j])
                for j in range(length - full):
                    lane[j] += np.float64(x[base + full + j]) * np.float64(y[base + full + j])
                s = lane[0]
                for j in range(1, LANES):
                    s += lane[j]
                P[k, b] += s
    return P


@njit(parallel=True, **_JIT)
def _wnorm_apply(out, v, gw, k1, k3, B, C, grad):
    n = v.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            b = (i // C) % B
            if grad:
                out[i] = k1[b] * (gw[i] - v[i] * k3[b])
            else:
                out[i] = k1[b] * v[i]


def weight_norm_sums(x, y, shape, *, n_threads):
    A, B, C = shape
    _threads(n_threads, x.size)
    return _slices.total(_slice_dot(x.reshape(-1), y.reshape(-1), A, B, C,
                                    _slices.items(A, B, C)))


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads):
    _threads(n_threads, v.size)
    grad = grad_w is not None
    _wnorm_apply(out.reshape(-1), v.reshape(-1), (grad_w if grad else v).reshape(-1), k1,
                 k3 if grad else k1, shape[1], shape[2], grad)


def _threads(n_threads, size):
    """Set and return the thread count for `size` elements (small calls use fewer)."""
    n = max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS, size // MIN_PER_THREAD))
    numba.set_num_threads(n)
    return n
