"""The reference of fastopt.init's and fastopt.weight_norm's kernels: the Philox fills of
fastopt/random.h and the weight-norm passes of fastopt/wnorm.h, as plain NumPy."""

import numpy as np

from fastopt._backends._layout import BITS, CHUNK, LANES, NORMAL, PER_GROUP, TILE, UNIFORM
from fastopt._backends._refmath import (
    HALF_PI,
    M32,
    NDTRI_LOW,
    SHIFT32,
    SQRT_HALF,
    log_reduced,
    ndtri_central,
    ndtri_tail,
    philox_rounds,
    sin_cos_reduced,
)

# -- Philox-4x32-10 and the fills of fastopt.init (kernels/include/fastopt/random.h)

def philox(groups, stream, seed):
    """The words of counter (group, 0, stream) under key `seed` (fastopt/random.h)."""
    return philox_rounds(groups & M32, groups >> SHIFT32, np.zeros_like(groups),
                         np.full_like(groups, stream), seed & 0xFFFFFFFF, seed >> 32)


def _unit53(hi, lo, plus=0.0):
    return ((hi >> np.uint64(5)).astype(np.float64) * 67108864.0
            + (lo >> np.uint64(6)).astype(np.float64) + plus) * 1.1102230246251565e-16


def _log(x):
    """fo_log: ln of positive normal doubles from +, -, *, / only (the exponent and mantissa
    from the bits)."""
    bits = x.view(np.uint64)
    e = ((bits >> np.uint64(52)).astype(np.int64) - 1022).astype(np.float64)
    m = ((bits & np.uint64(0x000FFFFFFFFFFFFF)) | np.uint64(0x3FE0000000000000)).view(np.float64)
    low = m < SQRT_HALF
    return log_reduced(np.where(low, m + m, m), np.where(low, e - 1.0, e))


def _cos_sin_2pi(u):
    t = 4.0 * u
    k = (t + 0.5).astype(np.int64)
    sa, ca = sin_cos_reduced((t - k) * HALF_PI)
    q = k & 3
    return (np.select([q == 0, q == 1, q == 2], [ca, -sa, -ca], sa),
            np.select([q == 0, q == 1, q == 2], [sa, ca, -sa], -ca))


def _ndtri_tail(p):
    return ndtri_tail(np.sqrt(-2.0 * _log(p + 1e-300)))


def _ndtri(p, q):
    """Acklam's inverse normal CDF, given p and q = 1 - p (as fo_ndtri)."""
    with np.errstate(invalid="ignore"):  # the tails are evaluated everywhere, used where due
        upper = np.where(q < NDTRI_LOW, -_ndtri_tail(q), ndtri_central(p))
        return np.where(p < NDTRI_LOW, _ndtri_tail(p), upper)


def random_fill(out, kind, reals, seed, stream, *, n_threads=1):
    """Fill the flat array `out` with Philox values (fastopt/random.h): `reals` are the
    seven r0..r6 of fo_random_args, `seed` a uint64, `stream` a uint32. Output l of group
    TILE * tile + j is element TILE * (per * tile + l) + j."""
    per = PER_GROUP[kind, out.dtype.name]
    groups = np.arange(-(-out.size // (per * TILE)) * TILE, dtype=np.uint64)
    w = philox(groups, stream, seed)
    r0, r1, r2, r3, r4, r5, r6 = reals
    if kind == BITS:
        values = np.stack(w, axis=1)
    elif kind == UNIFORM and per == 4:
        values = r0 + r1 * ((np.stack(w, axis=1) >> np.uint64(8)).astype(np.float64)
                            * 5.9604644775390625e-08)
    elif kind == UNIFORM:
        values = r0 + r1 * np.stack([_unit53(w[0], w[1]), _unit53(w[2], w[3])], axis=1)
    elif kind == NORMAL:
        if per == 4:  # float32: two pairs from 32-bit uniforms
            pairs = [((w[0] + 1.0) * 2.3283064365386963e-10, w[1] * 2.3283064365386963e-10),
                     ((w[2] + 1.0) * 2.3283064365386963e-10, w[3] * 2.3283064365386963e-10)]
        else:
            pairs = [(_unit53(w[0], w[1], 1.0), _unit53(w[2], w[3]))]
        z = []
        for u1, u2 in pairs:
            r = np.sqrt(-2.0 * _log(u1))
            c, s = _cos_sin_2pi(u2)
            z += [r * c, r * s]
        values = r0 + r1 * np.stack(z, axis=1)
    else:
        u = ([x * 2.3283064365386963e-10 for x in w] if per == 4
             else [_unit53(w[0], w[1]), _unit53(w[2], w[3])])
        t = r6 * np.stack(u, axis=1)
        x = r0 + r1 * _ndtri(r4 + t, r5 - t)
        values = np.where(x < r2, r2, np.where(x > r3, r3, x))
    tiles = values.reshape(-1, TILE, per).transpose(0, 2, 1)
    out.reshape(-1)[...] = tiles.reshape(-1)[:out.size].astype(out.dtype)


# -- weight normalization (kernels/include/fastopt/wnorm.h)

def weight_norm_sums(x, y, shape, *, n_threads=1):
    """Slice sums of x * y over the (A, B, C) view `shape`, float64, in wnorm.h's order:
    partials P[k, b] (chunk k of every row (a, b), 16 lanes, rows added in a order from
    0.0), then the partials added in k order."""
    A, B, C = shape
    prod = x.reshape(A, B, C).astype(np.float64) * y.reshape(A, B, C).astype(np.float64)
    partials = np.zeros((max(-(-C // CHUNK), 1), B))
    for k, lo in enumerate(range(0, C, CHUNK)):
        seg = prod[:, :, lo:lo + CHUNK]
        padded = np.zeros((A, B, -(-seg.shape[2] // LANES) * LANES))
        padded[..., :seg.shape[2]] = seg
        lanes = np.add.accumulate(padded.reshape(A, B, -1, LANES), axis=2)[:, :, -1, :]
        row = lanes[..., 0]
        for j in range(1, LANES):
            row = row + lanes[..., j]
        acc = np.zeros(B)
        for a in range(A):
            acc = acc + row[a]
        partials[k] = acc
    return np.add.accumulate(partials, axis=0)[-1]


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads=1):
    """out = k1[b] * v, or k1[b] * (grad_w - v * k3[b]) if grad_w is given (dtype math)."""
    A, B, C = shape
    v = v.reshape(A, B, C)
    k1 = k1[None, :, None]
    if grad_w is None:
        out.reshape(A, B, C)[...] = k1 * v
    else:
        out.reshape(A, B, C)[...] = k1 * (grad_w.reshape(A, B, C) - v * k3[None, :, None])


# the compression operations' reference lives in its own module
