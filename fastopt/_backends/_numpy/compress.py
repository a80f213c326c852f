"""The reference of the compression kernels (pruning, quantization, distillation): plain
NumPy, the spec the compiled backends are tested against."""

import numpy as np

from fastopt._backends._layout import CE_SQUARES, EXP2_CONSTANTS, KD_BLOCK, LN2, LOG2E
from fastopt._backends._numpy.init import _log
from fastopt._backends._select import key_bits, magnitude
from fastopt._interop import array_module

# -- pruning (kernels/include/fastopt/prune.h)

def magnitude_keys(a):
    """A float array's magnitude keys: its bits without the sign, as unsigned integers."""
    bits, _ = key_bits(a.dtype)
    utype = np.uint64 if bits == 63 else np.uint32
    return a.reshape(-1).view(utype) & utype(2 ** bits - 1)


def magnitude_masks(arrays, masks, k, *, check_nan=True, n_threads=1):
    """Keep-masks (one byte per element) pruning the k smallest magnitudes of the flat
    `arrays`: a stable sort of the keys, so ties go to the earlier element (tensor by
    tensor, then index). False, masks unwritten, if check_nan and a magnitude is NaN."""
    _, inf_key = key_bits(arrays[0].dtype)
    keys = np.concatenate([magnitude_keys(a) for a in arrays])
    if check_nan and keys.size and keys.max() > inf_key:
        return False
    keep = np.ones(keys.size, np.uint8)
    keep[np.argsort(keys, kind="stable")[:k]] = 0
    start = 0
    for m in masks:
        m[...] = keep[start:start + m.size]
        start += m.size
    return True


def nm_masks(x, keep, n, m, C, *, n_threads=1):
    """N:M keep-masks: `x` flat, C-contiguous, as groups of m rows of C elements (group u's
    row i at (u * m + i) * C; C = 1 when the grouped dim is the last); of each group's m
    elements at one column, the n of largest magnitude are kept (1 in `keep`, flat, uint8),
    ties ranked by row: an element's rank counts the group's keys below it and the equal
    keys of earlier rows. Returns the largest magnitude (NaN if one is NaN). Array
    code of `x`'s own module (NumPy, or CuPy for the CuPy backend), one pass per row of
    the group."""
    xp = array_module(x)
    bits, _ = key_bits(x.dtype)
    keys = (x.view(xp.uint64 if bits == 63 else xp.uint32) & (2 ** bits - 1)).reshape(-1, m, C)
    rows = xp.arange(m).reshape(1, m, 1)
    rank = xp.zeros(keys.shape, xp.int32)
    for j in range(m):
        kj = keys[:, j:j + 1, :]
        rank += (kj < keys) | ((kj == keys) & (j < rows))
    keep[...] = (rank >= m - n).reshape(-1)
    return magnitude(int(keys.max()), x.dtype)


# -- quantization (kernels/include/fastopt/quant.h)

def fma_f32(a, b, c):
    """fma(a, b, c) of float32 arrays, rounded once to float32: a * b is exact in float64;
    the sum's rounding error (TwoSum) settles the one case where rounding the float64 sum
    to float32 could differ, a sum landing exactly halfway between two floats."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c = np.broadcast_to(np.asarray(c, np.float64), p.shape)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    r = s.astype(np.float32)
    with np.errstate(invalid="ignore"):
        toward = np.where(s > r, np.float32(np.inf), np.float32(-np.inf))
        other = np.nextafter(r, toward)
        tie = (err != 0) & (s != r) & ((r.astype(np.float64) + other) / 2 == s)
        # the exact sum is s + err: past the midpoint toward `other` when err points there
        return np.where(tie & ((err > 0) == (other > r)), other, r)


def _clamp(v, qmin, qmax):
    v = np.where(v > qmin, v, qmin)  # NaN -> qmin, as the kernels
    return np.where(v < qmax, v, qmax)


def quant_loop(op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed, *,
               n_threads=1):
    """The quantization loops of quant_loops.h on flat arrays viewed as (A, B, C), with
    per-slice parameters; returns the NaN count of the float input."""
    def per_slice(a, dtype):
        return np.asarray(a, dtype).reshape(1, B, 1)

    if op == "dequantize":
        codes = x.reshape(-1, B, C).view(np.int8 if is_signed else np.uint8).astype(np.int64)
        y = (codes - per_slice(zp, np.int64)).astype(np.float64) * per_slice(scale, np.float64)
        out.reshape(-1, B, C)[...] = y.astype(out.dtype)
        return 0
    t = x.dtype.type
    x3 = x.reshape(-1, B, C)
    inv_, zp_ = per_slice(inv, x.dtype), per_slice(zp, x.dtype)
    lo, hi = t(qmin), t(qmax)
    with np.errstate(invalid="ignore"):
        if op == "quantize":
            v = fma_f32(x3, inv_, zp_) if fused else x3 * inv_ + zp_
            q = _clamp(np.rint(v), lo, hi)
            out.reshape(-1, B, C)[...] = q.astype(np.int16).astype(np.uint8)
        else:
            q = np.rint(x3 * inv_) + zp_
            if op == "fake_quantize":
                out.reshape(-1, B, C)[...] = (_clamp(q, lo, hi) - zp_) * per_slice(scale, x.dtype)
            else:
                out.reshape(-1, B, C)[...] = np.where((q >= lo) & (q <= hi),
                                                      gy.reshape(-1, B, C), t(0))
    return int(np.isnan(x).sum())


# -- knowledge distillation (kernels/include/fastopt/distill.h)

@np.errstate(invalid="ignore", over="ignore")
def exp2_neg(u):
    """fo_exp2_neg_<f32|f64>: 2^u for u <= 0 from +, -, *, fma (float32) and the exponent's
    bits: k = u rounded (by adding and subtracting the rounding constant), f = u - k,
    2^f by the polynomial, 2^k added to its exponent field; 0 below the dtype's lowest
    input, -inf included."""
    t = u.dtype.type
    magic, lowest, *coefficients = EXP2_CONSTANTS[u.dtype.name]
    r = u + t(magic)
    f = u - (r - t(magic))
    p = np.full_like(u, coefficients[-1])
    for c in coefficients[-2::-1]:
        p = fma_f32(p, f, t(c)) if u.dtype == np.float32 else t(c) + f * p
    utype, shift = (np.uint32, 23) if u.dtype == np.float32 else (np.uint64, 52)
    bits = p.view(utype) + (r.view(utype) << utype(shift))
    return np.where(u < t(lowest), utype(0), bits).view(u.dtype)




# elements per block of a row's sums (FO_KD_BLOCK): 32 per lane


def _lane_sums(terms, lanes=16):
    """Row sums of (B, C) terms in the CPU loops' order (fastopt/distill.h): per block of
    KD_BLOCK elements, element i into lane i % lanes in the terms' dtype, in index order;
    each block's lanes then added to float64 lanes, block by block; those lanes added in
    order. (Zero padding changes nothing: no partial sum is -0.)"""
    B, C = terms.shape
    n_blocks = -(-C // KD_BLOCK)
    padded = np.zeros((B, n_blocks * KD_BLOCK), terms.dtype)
    padded[:, :C] = terms
    blocks = padded.reshape(B, n_blocks, KD_BLOCK // lanes, lanes)
    partial = np.add.accumulate(blocks, axis=2)[:, :, -1, :]
    per_lane = np.add.accumulate(partial.astype(np.float64), axis=1)[:, -1, :]
    total = per_lane[:, 0]
    for j in range(1, lanes):
        total = total + per_lane[:, j]
    return total


@np.errstate(invalid="ignore", over="ignore")
def kd_rows(s, t, g, labels, temperature, wk, wc, *, n_threads=1):
    """Per row: the weighted gradient into g, and (KL_b, CE_b) as a (B, 2) float64 array
    (fastopt/distill.h); labels None for no cross entropy. A NaN or inf logit makes its
    row's values non-finite (silently, as in the kernels), which is how kd_loss finds it."""
    f = s.dtype.type
    temp, wk, wc = f(temperature), f(wk), f(wc)
    cs, cl = f(LOG2E / float(temp)), f(LOG2E)
    ms, mt = s.max(axis=1, keepdims=True), t.max(axis=1, keepdims=True)
    ds = s - ms
    us, ut = ds * cs, (t - mt) * cs
    es, et = exp2_neg(us), exp2_neg(ut)
    Ss, St, A = _lane_sums(es), _lane_sums(et), _lane_sums(et * (ut - us))
    rows = np.zeros((s.shape[0], 2))
    rows[:, 0] = LN2 * (A / St) + _log(Ss) - _log(St)
    a, b = wk * (1.0 / Ss).astype(s.dtype)[:, None], wk * (1.0 / St).astype(s.dtype)[:, None]
    grad = es * a - et * b
    if labels is not None:
        squares = CE_SQUARES.get(float(temp))
        ec = es if squares else exp2_neg(ds * cl)
        for _ in range(squares or 0):
            ec = ec * ec
        Sc = _lane_sums(ec)
        grad = grad + ec * (wc * (1.0 / Sc).astype(s.dtype)[:, None])
        at = (np.arange(s.shape[0]), labels)
        grad[at] = grad[at] - wc
        rows[:, 1] = (ms[:, 0].astype(np.float64) + _log(Sc)) - s[at].astype(np.float64)
    g[...] = grad
    return rows
