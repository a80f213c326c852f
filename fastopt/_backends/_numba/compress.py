"""The Numba backend's kernels for fastopt.prune, fastopt.quant and fastopt.distill: the
counting passes of the magnitude select (fastopt/prune.h), one parallel call per tensor,
the select itself being fastopt._backends._select's, shared with the Cython backend; the
quantization loops of fastopt/quant.h and the distillation rows of fastopt/distill.h, the
same operations in the same order as the C loops (the tests compare them with the NumPy
reference bit for bit)."""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastopt._backends._layout import (
    CE_SQUARES,
    CHUNK,
    DIGIT_BITS,
    EXP2_CONSTANTS,
    KD_BLOCK,
    LN2,
    LOG2E,
)
from fastopt._backends._numba.init import _log, _threads
from fastopt._backends._select import key_bits, magnitude

_JIT = dict(cache=True, error_model="numpy")
BINS = 2 ** DIGIT_BITS
TABLES = 2  # interleaved histograms per block of the counting passes, as FO_HIST_TABLES
# The parallel loops index slices of their chunk from 0: an index Numba cannot prove
# non-negative (range(lo, hi)) gets negative-index handling that keeps LLVM from
# vectorizing (the mask pass: 11.7 ms over 4096x4096 float32 keys, 2.3 ms sliced).


def _keys(a):
    """The float array's bits as unsigned integers (the sign is cleared in the kernels)."""
    return a.view(np.uint64 if a.dtype.itemsize == 8 else np.uint32)


def _scalar(value, keys):
    return keys.dtype.type(value)


@njit(parallel=True, **_JIT)
def _hist(keys, absmask, shift, dmask, pmask, prefix, n_blocks):
    n = keys.size
    # as prune_loops.h: uint32 counts (n_blocks keeps a block at most 2**32 keys) in
    # TABLES interleaved tables per block, counters that break the chains of increments to
    # one bin and whose hot bins still fit L1 (int64 ones would not); then the sink
    hist = np.zeros((n_blocks, TABLES + 1, dmask + 1), np.uint32)
    maxkey = np.zeros(n_blocks, keys.dtype)
    for b in prange(n_blocks):
        mx = keys.dtype.type(0)
        kb = keys[b * n // n_blocks:(b + 1) * n // n_blocks]
        if pmask == 0:  # key by key: LLVM makes the max a predicted branch, not GCC's chain
            # of selects that has prune_loops.h take it per block
            for i in range(kb.size):
                k = kb[i] & absmask
                hist[b, i % TABLES, (k >> shift) & dmask] += 1
                mx = max(mx, k)
        else:  # test blocks of 64 at once (a loop that vectorizes), then count every key of
            # a block with a match, those off the prefix into the sink (row TABLES, one
            # counter per position in the block, never read): a branch per key mispredicts
            # where the threshold's bin is crowded (the zeros of pruned weights). The max
            # key is the first pass's only
            for i0 in range(0, kb.size, 64):
                block = kb[i0:i0 + 64]
                hit = 0
                for i in range(block.size):
                    hit |= (block[i] & absmask & pmask) == prefix
                if hit:
                    for i in range(block.size):
                        k = block[i] & absmask
                        match = (k & pmask) == prefix
                        hist[b, i % TABLES if match else TABLES,
                             np.intp((k >> shift) & dmask) if match else i] += 1
        maxkey[b] = mx
    total = np.zeros(dmask + 1, np.int64)
    for b in range(n_blocks):
        for t in range(TABLES):
            total += hist[b, t]
    return total, maxkey.max()


@njit(parallel=True, **_JIT)
def _ties(keys, absmask, thr):
    n_chunks = (keys.size + CHUNK - 1) // CHUNK
    out = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        count = 0
        kc = keys[c * CHUNK:(c + 1) * CHUNK]
        for i in range(kc.size):
            count += (kc[i] & absmask) == thr
        out[c] = count
    return out


@njit(parallel=True, **_JIT)
def _mask(keys, absmask, thr, modes, mask):
    for c in prange(modes.size):
        ties = modes[c]
        kc, mc = keys[c * CHUNK:(c + 1) * CHUNK], mask[c * CHUNK:(c + 1) * CHUNK]
        if ties < 0:  # a loop per mode: the common two vectorize
            for i in range(kc.size):
                mc[i] = (kc[i] & absmask) > thr
        elif ties == 0:
            for i in range(kc.size):
                mc[i] = (kc[i] & absmask) >= thr
        else:
            for i in range(kc.size):
                k = kc[i] & absmask
                tie = k == thr
                mc[i] = k > thr or (tie and ties <= 0)
                ties -= tie


def _absmask(keys):
    return _scalar(2 ** key_bits(np.float64 if keys.dtype.itemsize == 8 else np.float32)[0] - 1,
                   keys)


def prune_hist(arrays, shift, pmask, prefix, n_threads):
    total, maxkey = np.zeros(BINS, np.int64), 0
    for a in arrays:
        keys = _keys(a)
        s = lambda v: _scalar(v, keys)  # noqa: E731
        n_blocks = max(_threads(n_threads, a.size), -(-a.size // 2 ** 32))
        counts, mx = _hist(keys, _absmask(keys), s(shift), s(BINS - 1), s(pmask), s(prefix),
                           n_blocks)
        total += counts
        maxkey = max(maxkey, int(mx))
    return total, maxkey


def prune_ties(arrays, thr, n_threads):
    out = []
    for a in arrays:
        keys = _keys(a)
        _threads(n_threads, a.size)
        out.append(_ties(keys, _absmask(keys), _scalar(thr, keys)))
    return np.concatenate(out)


def prune_mask(arrays, masks, thr, tie_modes, n_threads):
    start = 0
    for a, m in zip(arrays, masks):
        keys = _keys(a)
        n_chunks = -(-a.size // CHUNK)
        _threads(n_threads, a.size)
        _mask(keys, _absmask(keys), _scalar(thr, keys), tie_modes[start:start + n_chunks], m)
        start += n_chunks


@njit(parallel=True, **_JIT)
def _nm(keys, absmask, keep, n, m, C):
    groups = keys.size // (m * C)
    for u in prange(groups):
        at = u * m * C
        for c in range(C):
            for i in range(m):
                ki = keys[at + i * C + c] & absmask
                r = 0
                for j in range(m):
                    kj = keys[at + j * C + c] & absmask
                    r += (kj < ki) | ((kj == ki) & (j < i))
                keep[at + i * C + c] = r >= m - n


@njit(parallel=True, **_JIT)
def _nm_max(keys, absmask):
    top = keys.dtype.type(0)
    for i in prange(keys.size):
        top = max(top, keys[i] & absmask)
    return top


def nm_masks(x, keep, n, m, C, *, n_threads):
    """N:M keep-masks, as fastopt._backends._numpy.compress.nm_masks: each group's rank by
    m compares per element, the groups in parallel; then the largest magnitude."""
    keys = _keys(x)
    _threads(n_threads, x.size)
    _nm(keys, _absmask(keys), keep, n, m, C)
    return magnitude(int(_nm_max(keys, _absmask(keys))), x.dtype)


# -- quantization (fastopt/quant.h)

@intrinsic
def _fma(typingctx, a, b, c):
    """fma(a, b, c) rounded once (LLVM's fma: the instruction, or libm's where there is none)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


@intrinsic
def _exp2_bits(typingctx, p, r, keep):
    """fo_exp2_neg's last step: the float whose bits are p's plus r's shifted to the
    exponent field (p 2^k, with k in r's low bits), or 0 where keep is False; bit moves
    the C kernels make with memcpy, which Numba cannot spell on scalars."""
    width, shift = (32, 23) if p.bitwidth == 32 else (64, 52)

    def codegen(context, builder, signature, args):
        ity = ir.IntType(width)
        pb, rb = builder.bitcast(args[0], ity), builder.bitcast(args[1], ity)
        bits = builder.add(pb, builder.shl(rb, ir.Constant(ity, shift)))
        bits = builder.select(args[2], bits, ir.Constant(ity, 0))
        return builder.bitcast(bits, context.get_value_type(p))
    return p(p, p, types.boolean), codegen


@njit(inline="always", **_JIT)
def _qclamp(v, lim):
    v = v if v > lim[0] else lim[0]  # NaN -> qmin
    return v if v < lim[1] else lim[1]


@njit(inline="always", **_JIT)
def _slice_run(i, end, B, C):
    """The run from element i (before `end`) that shares one slice (C > 1) or steps through
    consecutive ones (C = 1): its first slice and where it stops."""
    row = i // C
    b = row % B
    return b, (min(i + B - b, end) if C == 1 else min((row + 1) * C, end))


@njit(inline="always", **_JIT)
def _quant_one(kind, x, out, gy, i, b, inv, zp, scale, lim, fused):
    """Element i of slice b (kind as _quant's; x, out, gy: the run's slices); 1 if x[i]
    is NaN, else 0."""
    v = x[i]
    if kind == 0:
        q = _qclamp(np.rint(_fma(v, inv[b], zp[b]) if fused else v * inv[b] + zp[b]), lim)
        out[i] = np.uint8(np.int64(q) & 255)
    else:
        q = np.rint(v * inv[b]) + zp[b]
        if kind == 2:
            out[i] = (_qclamp(q, lim) - zp[b]) * scale[b]
        else:
            out[i] = gy[i] if q >= lim[0] and q <= lim[1] else 0.0
    return v != v


@njit(parallel=True, **_JIT)
def _quant(kind, x, out, gy, B, C, inv, zp, scale, lim, fused):
    """kind 0 quantize (out: the codes' bytes), 2 fake quantize, 3 its gradient (gy); per
    slice b = (i // C) % B, walked in runs that share a slice (C > 1) or step through the
    slices (C = 1), as FO_SLICE_WALK: no division per element. Returns x's NaN count."""
    n_chunks = (x.size + CHUNK - 1) // CHUNK
    nan = 0
    for c in prange(n_chunks):
        i, end = c * CHUNK, min((c + 1) * CHUNK, x.size)
        while i < end:
            b, stop = _slice_run(i, end, B, C)
            xs, outs, gys = x[i:stop], out[i:stop], gy[i:stop]
            if C == 1:
                for k in range(xs.size):
                    nan += _quant_one(kind, xs, outs, gys, k, b + k, inv, zp, scale, lim,
                                      fused)
            else:
                for k in range(xs.size):
                    nan += _quant_one(kind, xs, outs, gys, k, b, inv, zp, scale, lim, fused)
            i = stop
    return nan


@njit(parallel=True, **_JIT)
def _dequant(codes, out, B, C, zp, scale):
    n_chunks = (out.size + CHUNK - 1) // CHUNK
    for c in prange(n_chunks):
        i, end = c * CHUNK, min((c + 1) * CHUNK, out.size)
        while i < end:
            b, stop = _slice_run(i, end, B, C)
            cs, outs = codes[i:stop], out[i:stop]
            if C == 1:
                for k in range(cs.size):
                    outs[k] = np.float64(np.int64(cs[k]) - zp[b + k]) * scale[b + k]
            else:
                for k in range(cs.size):
                    outs[k] = np.float64(np.int64(cs[k]) - zp[b]) * scale[b]
            i = stop


_QUANT_KINDS = {"quantize": 0, "fake_quantize": 2, "fake_quantize_grad": 3}


def quant_loop(op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed, *,
               n_threads):
    """The loops of kernels/cpu/_quant.pyx (same arguments)."""
    x, out = x.reshape(-1), out.reshape(-1)
    _threads(n_threads, x.size)
    if op == "dequantize":
        _dequant(x.view(np.int8 if is_signed else np.uint8), out, B, C,
                 np.asarray(zp, np.int64), np.asarray(scale, np.float64))
        return 0
    dtype = x.dtype
    return int(_quant(_QUANT_KINDS[op], x, out.view(np.uint8) if op == "quantize" else out,
                      x if gy is None else gy.reshape(-1), B, C, np.asarray(inv, dtype),
                      np.asarray(zp, dtype), np.asarray(x[:0] if scale is None else scale,
                                                        dtype),
                      np.array((qmin, qmax), dtype), fused))


# -- knowledge distillation (fastopt/distill.h)

@njit(inline="always", **_JIT)
def _exp2_neg(u, c, fused):
    """fo_exp2_neg_<f32|f64> of u (typed like the logits); c: the dtype's EXP2_CONSTANTS as
    a tuple of that type (constants to LLVM: from an array, which stores might alias, they
    would be reloaded, as gathers, for every element), fused: float32's fma evaluation.
    Computed for every u, then 0 chosen below c[1]: no branch, so the loops vectorize."""
    r = u + c[0]
    f = u - (r - c[0])
    p = c[len(c) - 1]
    for i in range(len(c) - 2, 1, -1):
        p = _fma(p, f, c[i]) if fused else c[i] + f * p
    return _exp2_bits(p, r, not u < c[1])


@njit(inline="always", **_JIT)
def _kd_row(s, t, g, y, ce, squares, c, cs, cl, wk, wc, fused, work, terms, part, lanes):
    """One row (fo_cpu_kd_row; s, t, g: its logits and gradient): the gradient into g,
    returns (KL_b, CE_b); cs = L / T and cl = L in the logits' dtype; work (3, C) and
    terms (C) in the logits' dtype, part (4, 16) of that dtype and lanes (4, 16) float64
    are the caller's scratch. As the C loops: the maxima, the exponentials into work (and
    et (ut - us) into terms), their sums (per block of KD_BLOCK, element i into
    lane i mod 16 in the logits' dtype, each block then added to float64 lanes), then the
    gradient."""
    C = s.size
    ms, mt = s[0], t[0]
    for i in range(1, C):
        ms = s[i] if s[i] > ms else ms
        mt = t[i] if t[i] > mt else mt
    es, et, ec = work[0], work[1], work[2]
    for i in range(C):
        us, ut = (s[i] - ms) * cs, (t[i] - mt) * cs
        es[i] = _exp2_neg(us, c, fused)
        et[i] = _exp2_neg(ut, c, fused)
        terms[i] = et[i] * (ut - us)
    # ec: es squared `squares` times, a loop per squaring (a trip count inside the
    # element loop would keep it scalar), or its own exponentials
    if ce and squares:
        for i in range(C):
            ec[i] = es[i] * es[i]
        for _ in range(squares - 1):
            for i in range(C):
                ec[i] = ec[i] * ec[i]
    elif ce:
        for i in range(C):
            ec[i] = _exp2_neg((s[i] - ms) * cl, c, fused)
    lanes[:] = 0.0
    for b0 in range(0, C, KD_BLOCK):
        part[:] = 0
        end = min(b0 + KD_BLOCK, C)
        for i0 in range(b0, end, 16):
            for j in range(min(16, end - i0)):
                i = i0 + j
                part[0, j] += es[i]
                part[1, j] += et[i]
                part[2, j] += terms[i]
                if ce:
                    part[3, j] += ec[i]
        for q in range(4):
            for j in range(16):
                lanes[q, j] += np.float64(part[q, j])
    Ss, St, A, Sc = lanes[0, 0], lanes[1, 0], lanes[2, 0], lanes[3, 0]
    for j in range(1, 16):
        Ss += lanes[0, j]
        St += lanes[1, j]
        A += lanes[2, j]
        Sc += lanes[3, j]
    a, b = wk * s.dtype.type(1.0 / Ss), wk * s.dtype.type(1.0 / St)
    kl = LN2 * (A / St) + _log(Ss) - _log(St)
    if not ce:
        for i in range(C):
            g[i] = es[i] * a - et[i] * b
        return kl, 0.0
    cc = wc * s.dtype.type(1.0 / Sc)
    for i in range(C):
        g[i] = (es[i] * a - et[i] * b) + ec[i] * cc
    g[y] = g[y] - wc
    return kl, (np.float64(ms) + _log(Sc)) - np.float64(s[y])


@njit(parallel=True, **_JIT)
def _kd_rows(s, t, g, labels, ce, squares, c, sc, rows, n_blocks):
    """Per row b of (B, C) logits: the gradient into g[b] and (KL_b, CE_b) into rows[b]
    (sc: L / T, L, wk, wc in the logits' dtype); ce False: no cross entropy; squares:
    the cross entropy's exponentials are the KL term's squared this many times (else
    computed). The rows in n_blocks contiguous blocks, each with its own scratch."""
    B, C = s.shape
    fused = s.itemsize == 4  # float32
    for blk in prange(n_blocks):
        work = np.empty((3, C), s.dtype)  # es, et, ec
        terms = np.empty(C, s.dtype)
        part = np.empty((4, 16), s.dtype)
        lanes = np.empty((4, 16))
        for b in range(blk * B // n_blocks, (blk + 1) * B // n_blocks):
            rows[b, 0], rows[b, 1] = _kd_row(s[b], t[b], g[b], labels[b] if ce else 0, ce,
                                             squares, c, sc[0], sc[1], sc[2], sc[3], fused,
                                             work, terms, part, lanes)


def kd_rows(s, t, g, labels, temperature, wk, wc, *, n_threads):
    c = tuple(s.dtype.type(v) for v in EXP2_CONSTANTS[s.dtype.name])
    rows = np.zeros((s.shape[0], 2))
    n = _threads(n_threads, s.size)
    temp = s.dtype.type(temperature)
    sc = np.array((LOG2E / float(temp), LOG2E, wk, wc), s.dtype)
    _kd_rows(s, t, g, np.zeros(1, np.int64) if labels is None else labels, labels is not None,
             CE_SQUARES.get(float(temp), 0), c, sc, rows, min(n, s.shape[0]))
    return rows
