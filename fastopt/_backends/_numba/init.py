"""The Numba backend's kernels for fastopt.init and fastopt.weight_norm: the Philox fills
of fastopt/random.h and the weight-norm passes of fastopt/wnorm.h, written out again in
Numba (same operations, same order; the parity tests compare them with the NumPy reference
bit for bit). """

import math

import numba
import numpy as np
from numba import njit, prange

from fastopt._backends import _slices
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
_MANTISSA, _HALF = np.uint64(0x000FFFFFFFFFFFFF), np.uint64(0x3FE0000000000000)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_U32 = 2.3283064365386963e-10  # 2^-32


@njit(inline="always", **_JIT)
def _philox(group, stream, k0, k1):
    c0, c1, c2, c3 = group & _M32, group >> _S32, np.uint64(0), stream
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        n0, n2 = (p1 >> _S32) ^ c1 ^ k0, (p0 >> _S32) ^ c3 ^ k1
        c1, c3, c0, c2 = p1 & _M32, p0 & _M32, n0, n2
        k0, k1 = (k0 + _W0) & _M32, (k1 + _W1) & _M32
    return c0, c1, c2, c3


@njit(inline="always", **_JIT)
def _unit53(hi, lo, plus):
    return (np.float64(hi >> _S5) * 67108864.0 + np.float64(lo >> _S6) + plus) \
        * 1.1102230246251565e-16


@njit(inline="always", **_JIT)
def _log(x):
    m, e = math.frexp(x)  # exact: x = m 2^e, m in [1/2, 1), as fo_log's bit fields
    e = np.float64(e)
    if m < 0.7071067811865476:
        m = m + m
        e = e - 1.0
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    poly = (0.3333333333333333 + z * (0.2 + z * (0.14285714285714285 + z * (0.1111111111111111
            + z * (0.09090909090909091 + z * (0.07692307692307693 + z * (0.06666666666666667
            + z * (0.058823529411764705 + z * (0.05263157894736842
            + z * 0.047619047619047616)))))))))
    t = s + s
    return e * 0.6931471803691238 + ((t + t * (z * poly)) + e * 1.9082149292705877e-10)


@njit(inline="always", **_JIT)
def _cos_sin_2pi(u):
    t = 4.0 * u
    k = np.int64(t + 0.5)
    a = (t - np.float64(k)) * 1.5707963267948966
    z = a * a
    sa = a + a * (z * (-0.16666666666666666 + z * (0.008333333333333333
         + z * (-0.0001984126984126984 + z * (2.7557319223985893e-06 + z * (-2.505210838544172e-08
         + z * (1.6059043836821613e-10 + z * (-7.647163731819816e-13
         + z * 2.8114572543455206e-15))))))))
    ca = 1.0 + z * (-0.5 + z * (0.041666666666666664 + z * (-0.001388888888888889
         + z * (2.48015873015873e-05 + z * (-2.755731922398589e-07 + z * (2.08767569878681e-09
         + z * (-1.1470745597729725e-11 + z * 4.779477332387385e-14)))))))
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
    t = math.sqrt(-2.0 * _log(p + 1e-300))
    return ((((((-7.784894002430293e-03 * t - 3.223964580411365e-01) * t
                 - 2.400758277161838e+00) * t - 2.549732539343734e+00) * t
               + 4.374664141464968e+00) * t + 2.938163982698783e+00)
            / ((((7.784695709041462e-03 * t + 3.224671290700398e-01) * t + 2.445134137142996e+00)
                * t + 3.754408661907416e+00) * t + 1.0))


@njit(inline="always", **_JIT)
def _trunc_normal(u, r):
    t = r[6] * u
    p, q = r[4] + t, r[5] - t
    if p < 0.02425:
        z = _ndtri_tail(p)
    elif q < 0.02425:
        z = -_ndtri_tail(q)
    else:
        h = p - 0.5
        y = h * h
        z = ((((((-3.969683028665376e+01 * y + 2.209460984245205e+02) * y - 2.759285104469687e+02)
                * y + 1.383577518672690e+02) * y - 3.066479806614716e+01) * y
              + 2.506628277459239e+00) * h
             / (((((-5.447609879822406e+01 * y + 1.615858368580409e+02) * y
                   - 1.556989798598866e+02) * y + 6.680131188771972e+01) * y
                 - 1.328068155288572e+01) * y + 1.0))
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
