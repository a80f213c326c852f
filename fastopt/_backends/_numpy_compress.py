"""The NumPy reference of the compression kernels (pruning, quantization, distillation),
re-exported by fastopt._backends._numpy: plain NumPy, the spec the compiled backends are
tested against."""

import numpy as np

from fastopt._backends._select import key_bits


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
