"""The Numba backend: @njit(parallel=True, cache=True) kernels over many tensors.

The kernels get a table of data addresses (tensor x operand) and a chunk list, so a step
over any number of tensors is one call and one parallel loop, as in the Cython backend.
Scalars arrive as an array of the parameter's dtype, so float32 math stays float32.
Each operand set has its own loop (Adam with and without amsgrad, SGD with and without
momentum, ...), chosen once per chunk: LLVM vectorizes a loop only after checking at run
time that its arrays do not overlap, and a placeholder view standing in for a missing
operand would overlap a real one and send every chunk down the scalar path. For the same
reason an in-place update passes the parameter view itself as the destination.
Element math is written here on its own; the parity tests hold it to the NumPy reference.
"""

import functools
import sys

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastopt._backends import _numba_compress, _numba_init, _select, _twopass
from fastopt._backends._masked import wrap_steps
from fastopt._cpu._runtime import data_pointers
from fastopt.optim import _scalars

CHUNK = 16384  # FO_CHUNK of fastopt/reduce.h
LANES = 16  # FO_NORM_LANES
COLS = 512  # FO_COLS
MIN_PER_THREAD = 32768  # as in the Cython driver: small steps use fewer threads
_JIT = dict(cache=True, error_model="numpy")  # numpy error model: no branch per division


@intrinsic
def _as_pointer(typingctx, address):
    """int64 address -> void*, for numba.carray."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@njit(**_JIT)
def _chunks(sizes):
    n_chunks = 0
    for size in sizes:
        n_chunks += (size + CHUNK - 1) // CHUNK
    chunks = np.empty((n_chunks, 3), np.int64)
    k = 0
    for t in range(sizes.shape[0]):
        for lo in range(0, sizes[t], CHUNK):
            chunks[k, 0] = t
            chunks[k, 1] = lo
            chunks[k, 2] = min(CHUNK, sizes[t] - lo)
            k += 1
    return chunks


@njit(inline="always", **_JIT)
def _view(ptrs, t, op, lo, n, like):
    return numba.carray(_as_pointer(ptrs[t, op] + lo * like.itemsize), (n,), like.dtype)


@njit(inline="always", **_JIT)
def _grad(g, sc):
    """The gradient prologue: clamp to [-clip, clip] (NaN passes), then the signed scale.
    Every rule's scalar array starts with (clip, gscale)."""
    clip, gscale = sc[0], sc[1]
    g = -clip if g < -clip else (clip if g > clip else g)
    return gscale * g


@njit(inline="always", **_JIT)
def _sgd_element(p, g, buf, i, sc, has_buf, first, nesterov):
    weight_decay, momentum, one_minus_dampening, neg_lr = sc[2], sc[3], sc[4], sc[5]
    d = _l2(_grad(g, sc), p, weight_decay)
    if has_buf:
        b = d if first else buf[i] * momentum + one_minus_dampening * d
        buf[i] = b
        d = d + momentum * b if nesterov else b
    return p + neg_lr * d


@njit(inline="always", **_JIT)
def _sgd_chunk(dst, p, g, buf, n, sc, first, nesterov, has_buf):
    # dst is p itself for in-place updates (no overlap check); one loop per operand set, so
    # the view standing in for an absent momentum buffer is never touched
    if has_buf:
        for i in range(n):
            dst[i] = _sgd_element(p[i], g[i], buf, i, sc, True, first, nesterov)
    else:
        for i in range(n):
            dst[i] = _sgd_element(p[i], g[i], buf, i, sc, False, first, nesterov)


@njit(parallel=True, **_JIT)
def _sgd(ptrs, chunks, sc, fl, has_buf):
    first, nesterov = fl[0] != 0, fl[1] != 0
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        buf = _view(ptrs, t, 3 if has_buf else 2, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            _sgd_chunk(p, p, g, buf, n, sc, first, nesterov, has_buf)
        else:
            _sgd_chunk(_view(ptrs, t, 1, lo, n, sc), p, g, buf, n, sc, first, nesterov, has_buf)


@njit(inline="always", **_JIT)
def _adam_element(p, g, m, v, vmax, i, sc, lerp_hi, one, amsgrad):
    bc2_sqrt, eps, neg_step_size = sc[7], sc[8], sc[9]
    p, d, mm, vv = _moments(p, g, m, v, i, sc, lerp_hi, one)
    if amsgrad:
        vv = _maximum(vmax[i], vv)
        vmax[i] = vv
    return p + neg_step_size * mm / (np.sqrt(vv) / bc2_sqrt + eps)


@njit(inline="always", **_JIT)
def _adam_chunk(dst, p, g, m, v, vmax, n, sc, lerp_hi, one, amsgrad):
    if amsgrad:
        for i in range(n):
            dst[i] = _adam_element(p[i], g[i], m, v, vmax, i, sc, lerp_hi, one, True)
    else:
        for i in range(n):
            dst[i] = _adam_element(p[i], g[i], m, v, vmax, i, sc, lerp_hi, one, False)


@njit(parallel=True, **_JIT)
def _adam(ptrs, chunks, sc, fl, amsgrad):
    lerp_hi = fl[0] != 0
    one = _one(sc)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        m, v = _view(ptrs, t, 3, lo, n, sc), _view(ptrs, t, 4, lo, n, sc)
        vmax = _view(ptrs, t, 5 if amsgrad else 4, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            _adam_chunk(p, p, g, m, v, vmax, n, sc, lerp_hi, one, amsgrad)
        else:
            _adam_chunk(_view(ptrs, t, 1, lo, n, sc), p, g, m, v, vmax, n, sc, lerp_hi, one,
                        amsgrad)


@njit(inline="always", **_JIT)
def _norm_acc(acc, term, kind):
    if kind == 0:
        return term if (term > acc or term != term) else acc  # max; NaN sticks
    return acc + term


@njit(inline="always", **_JIT)
def _norm_term(g, kind):
    x = np.float64(g)
    return x * x if kind == 2 else abs(x)


@njit(parallel=True, **_JIT)
def _norm_partials(ptrs, chunks, like, kind):
    """Each chunk's partial in fastopt/reduce.h's fixed order: element i of a chunk goes to
    lane i % 16 (float64, in index order), lanes are added in lane order."""
    out = np.empty(chunks.shape[0], np.float64)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        g = _view(ptrs, t, 0, lo, n, like)
        lane = np.zeros(LANES, np.float64)
        full = n - n % LANES
        for i in range(0, full, LANES):
            for j in range(LANES):
                lane[j] = _norm_acc(lane[j], _norm_term(g[i + j], kind), kind)
        for j in range(n - full):
            lane[j] = _norm_acc(lane[j], _norm_term(g[full + j], kind), kind)
        s = lane[0]
        for j in range(1, LANES):
            s = _norm_acc(s, lane[j], kind)
        out[c] = s
    return out


def norm_partials(grads, kind, *, n_threads):
    dtype, ptrs, chunks = _setup((grads,), n_threads)
    return _norm_partials(ptrs, chunks, np.empty(0, dtype), kind)


def _setup(operands, n_threads, n_aux=0):
    dtype = operands[0][0].dtype
    ptrs, sizes = data_pointers(operands, dtype.itemsize, n_aux)
    n_threads = min(n_threads, numba.config.NUMBA_NUM_THREADS, int(sizes.sum()) // MIN_PER_THREAD)
    numba.set_num_threads(max(1, n_threads))
    return dtype, ptrs, _chunks(sizes)


def sgd_step(params, out, grads, momentum_buffers, *, n_threads, **hyper):
    has_buf = momentum_buffers is not None
    _run(_sgd, (params, out, grads) + ((momentum_buffers,) if has_buf else ()),
         _scalars.sgd_scalars(params[0].dtype, **hyper), n_threads, has_buf)


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, n_threads, **hyper):
    amsgrad = max_exp_avg_sqs is not None
    _run(_adam, (params, out, grads, exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ()),
         _scalars.adam_scalars(params[0].dtype, **hyper), n_threads, amsgrad)


# -- shared element helpers. Each element function unpacks its scalars in the order of
# fastopt.optim._scalars (the struct order of fastopt/optim.h): sc[0], sc[1] are the gradient
# prologue's (clip, gscale); `fl` holds the flags.

@njit(inline="always", **_JIT)
def _one(sc):
    """1 in the scalars' dtype: a bare literal 1 would promote float32 math to float64."""
    return np.ones(1, sc.dtype)[0]


@njit(inline="always", **_JIT)
def _lerp(start, end, w, hi, one):
    return end - (end - start) * (one - w) if hi else start + w * (end - start)


@njit(inline="always", **_JIT)
def _maximum(a, b):
    return a if (a != a or a > b) else b  # torch.maximum: NaN propagates


@njit(inline="always", **_JIT)
def _l2(d, p, weight_decay):
    return d + weight_decay * p if weight_decay != 0 else d


@njit(inline="always", **_JIT)
def _adagrad_element(p, g, s1, i, sc):
    d = _l2(_grad(g, sc), p, sc[2])
    s = s1[i] + d * d
    s1[i] = s
    return p + sc[3] * d / (np.sqrt(s) + sc[4])


@njit(parallel=True, **_JIT)
def _adagrad(ptrs, chunks, sc, fl):
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        s1 = _view(ptrs, t, 3, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = _adagrad_element(p[i], g[i], s1, i, sc)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = _adagrad_element(p[i], g[i], s1, i, sc)


@njit(inline="always", **_JIT)
def _rmsprop_element(p, g, sq, gavg, buf, i, sc, centered, use_momentum, lerp_hi, one):
    alpha, one_minus_alpha, eps, momentum, neg_lr = sc[3], sc[4], sc[5], sc[6], sc[7]
    d = _l2(_grad(g, sc), p, sc[2])
    s = sq[i] * alpha + one_minus_alpha * d * d
    sq[i] = s
    if centered:
        m = _lerp(gavg[i], d, one_minus_alpha, lerp_hi, one)
        gavg[i] = m
        r = np.sqrt(s - m * m)
    else:
        r = np.sqrt(s)
    r = r + eps
    if use_momentum:
        b = buf[i] * momentum + d / r
        buf[i] = b
        return p + neg_lr * b
    return p + neg_lr * d / r


@njit(inline="always", **_JIT)
def _rmsprop_loop(dst, p, g, sq, gavg, buf, n, sc, centered, use_momentum, lerp_hi, one):
    # dst is p itself for in-place updates: the same array, so LLVM needs no overlap check
    for i in range(n):
        dst[i] = _rmsprop_element(p[i], g[i], sq, gavg, buf, i, sc, centered, use_momentum,
                                  lerp_hi, one)


@njit(inline="always", **_JIT)
def _rmsprop_chunk(dst, p, g, sq, gavg, buf, n, sc, centered, use_momentum, lerp_hi, one):
    # one loop per flag combination, the flags constant in each: no overlap checks between
    # views that stand in for absent operands, no branches in the loop
    if centered and use_momentum:
        _rmsprop_loop(dst, p, g, sq, gavg, buf, n, sc, True, True, lerp_hi, one)
    elif centered:
        _rmsprop_loop(dst, p, g, sq, gavg, sq, n, sc, True, False, lerp_hi, one)
    elif use_momentum:
        _rmsprop_loop(dst, p, g, sq, sq, buf, n, sc, False, True, lerp_hi, one)
    else:
        _rmsprop_loop(dst, p, g, sq, sq, sq, n, sc, False, False, lerp_hi, one)


@njit(parallel=True, **_JIT)
def _rmsprop(ptrs, chunks, sc, fl):
    centered, use_momentum, lerp_hi = fl[0] != 0, fl[1] != 0, fl[2] != 0
    k_buf = 5 if centered else 4
    one = _one(sc)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        sq = _view(ptrs, t, 3, lo, n, sc)
        gavg = _view(ptrs, t, 4 if centered else 3, lo, n, sc)
        buf = _view(ptrs, t, k_buf if use_momentum else 3, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            _rmsprop_chunk(p, p, g, sq, gavg, buf, n, sc, centered, use_momentum, lerp_hi, one)
        else:
            _rmsprop_chunk(_view(ptrs, t, 1, lo, n, sc), p, g, sq, gavg, buf, n, sc, centered,
                           use_momentum, lerp_hi, one)


@njit(inline="always", **_JIT)
def _adadelta_element(p, g, sq, acc, i, sc):
    rho, one_minus_rho, eps, neg_lr = sc[3], sc[4], sc[5], sc[6]
    d = _l2(_grad(g, sc), p, sc[2])
    s = sq[i] * rho + one_minus_rho * d * d
    sq[i] = s
    delta = np.sqrt(acc[i] + eps) / np.sqrt(s + eps) * d
    acc[i] = acc[i] * rho + one_minus_rho * delta * delta
    return p + neg_lr * delta


@njit(inline="always", **_JIT)
def _adamax_element(p, g, m, u, i, sc, lerp_hi, one):
    one_minus_beta1, beta2, eps, neg_clr = sc[3], sc[4], sc[5], sc[6]
    d = _l2(_grad(g, sc), p, sc[2])
    mm = _lerp(m[i], d, one_minus_beta1, lerp_hi, one)
    uu = _maximum(u[i] * beta2, abs(d) + eps)
    m[i] = mm
    u[i] = uu
    return p + neg_clr * mm / uu


@njit(inline="always", **_JIT)
def _moments(p, g, m, v, i, sc, lerp_hi, one):
    """Adam's, NAdam's and RAdam's shared start: (decayed p, gradient, m_i, v_i); m, v
    updated."""
    weight_decay, decay, one_minus_beta1, beta2, one_minus_beta2 = sc[2], sc[3], sc[4], sc[5], sc[6]
    d = _grad(g, sc)
    p = p * decay
    d = _l2(d, p, weight_decay)
    mm = _lerp(m[i], d, one_minus_beta1, lerp_hi, one)
    vv = v[i] * beta2 + one_minus_beta2 * d * d
    m[i] = mm
    v[i] = vv
    return p, d, mm, vv


@njit(inline="always", **_JIT)
def _nadam_element(p, g, m, v, i, sc, fl, one):
    bias_correction2, eps, grad_coef, avg_coef = sc[7], sc[8], sc[9], sc[10]
    p, d, mm, vv = _moments(p, g, m, v, i, sc, fl[0] != 0, one)
    denom = np.sqrt(vv / bias_correction2) + eps
    p = p + grad_coef * d / denom
    return p + avg_coef * mm / denom


@njit(inline="always", **_JIT)
def _radam_element(p, g, m, v, i, sc, fl, one):
    bias_correction1, lr, bc2_sqrt, eps, rect = sc[7], sc[8], sc[9], sc[10], sc[11]
    p, d, mm, vv = _moments(p, g, m, v, i, sc, fl[0] != 0, one)
    u = mm / bias_correction1 * lr
    if fl[1] != 0:
        u = u * (bc2_sqrt / (np.sqrt(vv) + eps)) * rect
    return p - u


@njit(inline="always", **_JIT)
def _two_state_chunk(dst, p, g, s1, s2, n, sc, fl, one, rule):
    """Rules with two state buffers: 0 Adadelta, 1 Adamax, 2 NAdam, 3 RAdam. The choice is
    made once per chunk, each loop is its own; dst is p itself for in-place updates (the
    same array, so LLVM needs no overlap check)."""
    if rule == 0:
        for i in range(n):
            dst[i] = _adadelta_element(p[i], g[i], s1, s2, i, sc)
    elif rule == 1:
        for i in range(n):
            dst[i] = _adamax_element(p[i], g[i], s1, s2, i, sc, fl[0] != 0, one)
    elif rule == 2:
        for i in range(n):
            dst[i] = _nadam_element(p[i], g[i], s1, s2, i, sc, fl, one)
    else:
        for i in range(n):
            dst[i] = _radam_element(p[i], g[i], s1, s2, i, sc, fl, one)


@njit(parallel=True, **_JIT)
def _two_state(ptrs, chunks, sc, fl, rule):
    one = _one(sc)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        s1, s2 = _view(ptrs, t, 3, lo, n, sc), _view(ptrs, t, 4, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            _two_state_chunk(p, p, g, s1, s2, n, sc, fl, one, rule)
        else:
            _two_state_chunk(_view(ptrs, t, 1, lo, n, sc), p, g, s1, s2, n, sc, fl, one, rule)


@njit(inline="always", **_JIT)
def _lion_element(p, g, m, i, sc, one):
    beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, neg_lr = (
        sc[2], sc[3], sc[4], sc[5], sc[6], sc[7])
    d = _grad(g, sc)
    c = one_minus_beta1 * d + beta1 * m[i]
    u = one if c > 0 else (-one if c < 0 else c)
    m[i] = one_minus_beta2 * d + beta2 * m[i]
    return p + neg_lr * (u + weight_decay * p)


@njit(parallel=True, **_JIT)
def _lion(ptrs, chunks, sc, fl):
    one = _one(sc)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        m = _view(ptrs, t, 3, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = _lion_element(p[i], g[i], m, i, sc, one)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = _lion_element(p[i], g[i], m, i, sc, one)


@njit(inline="always", **_JIT)
def _lamb_update_element(p, g, m, v, i, sc):
    beta1, one_minus_beta1, beta2, one_minus_beta2 = sc[2], sc[3], sc[4], sc[5]
    bias_correction1, bias_correction2, eps, weight_decay = sc[6], sc[7], sc[8], sc[9]
    d = _grad(g, sc)
    mm = one_minus_beta1 * d + beta1 * m[i]
    vv = one_minus_beta2 * (d * d) + beta2 * v[i]
    m[i] = mm
    v[i] = vv
    return mm / bias_correction1 / (np.sqrt(vv / bias_correction2) + eps) + weight_decay * p


@njit(parallel=True, **_JIT)
def _lamb_update(ptrs, chunks, sc, fl):
    """Operands: p, u (the update, written), g, exp_avg, exp_avg_sq."""
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, u, g = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 1, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        m, v = _view(ptrs, t, 3, lo, n, sc), _view(ptrs, t, 4, lo, n, sc)
        for i in range(n):
            u[i] = _lamb_update_element(p[i], g[i], m, v, i, sc)


@njit(parallel=True, **_JIT)
def _scaled_apply(ptrs, chunks, sc, fl):
    """Operands: p, p_out, u, and the tensor's factor k (one element): p decay + scale (u k)."""
    decay, scale = sc[0], sc[1]
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, u = _view(ptrs, t, 0, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        k = _view(ptrs, t, 3, 0, 1, sc)[0]
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = p[i] * decay + scale * (u[i] * k)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = p[i] * decay + scale * (u[i] * k)


# Adafactor: scalars (clip, gscale, w, eps1, eps1_sq), flag lerp_hi

@njit(inline="always", **_JIT)
def _adafactor_sq(g, sc):
    x = np.float64(_grad(g, sc))
    return x * x


@njit(parallel=True, **_JIT)
def _adafactor_factors(ptrs, shape, items, slices, sc, fl):
    """The factors pass (kernels/cpu/factored_loops.h): per (tensor, slice, column block),
    the block's column sums over all rows and each row's partial; then per slice, the row
    sums, row factors and clamped row mean. ptrs[t]: g, row, col, rmean, rowpart."""
    lerp_hi = fl[0] != 0
    one = _one(sc)
    f64 = np.empty(0, np.float64)
    for it in prange(items.shape[0]):
        t, b, k = items[it, 0], items[it, 1], items[it, 2]
        R, C = shape[t, 1], shape[t, 2]
        n_blocks = (C + COLS - 1) // COLS
        c0 = k * COLS
        width = min(COLS, C - c0)
        full = width - width % LANES
        g = _view(ptrs, t, 0, b * R * C, R * C, sc)
        col = _view(ptrs, t, 2, b * C + c0, width, sc)
        part = _view(ptrs, t, 4, b * R * n_blocks, R * n_blocks, f64)
        acc = np.zeros(width, np.float64)
        lane = np.empty(LANES, np.float64)
        for r in range(R):
            lane[:] = 0.0
            at = r * C + c0
            for j in range(0, full, LANES):
                for m in range(LANES):
                    x = _adafactor_sq(g[at + j + m], sc)
                    lane[m] += x
                    acc[j + m] += x
            for m in range(width - full):
                x = _adafactor_sq(g[at + full + m], sc)
                lane[m] += x
                acc[full + m] += x
            s = lane[0]
            for m in range(1, LANES):
                s += lane[m]
            part[r * n_blocks + k] = s
        mean = np.empty(width, sc.dtype)  # float64 -> dtype, rounded as a C cast
        for j in range(width):
            mean[j] = acc[j] / R
            col[j] = _lerp(col[j], mean[j], sc[2], lerp_hi, one)
    for it in prange(slices.shape[0]):
        t, b = slices[it, 0], slices[it, 1]
        R, C = shape[t, 1], shape[t, 2]
        n_blocks = (C + COLS - 1) // COLS
        row = _view(ptrs, t, 1, b * R, R, sc)
        part = _view(ptrs, t, 4, b * R * n_blocks, R * n_blocks, f64)
        cast = np.empty(1, sc.dtype)
        total = 0.0
        for r in range(R):
            s = part[r * n_blocks]
            for k in range(1, n_blocks):
                s += part[r * n_blocks + k]
            cast[0] = s / C
            v = _lerp(row[r], cast[0], sc[2], lerp_hi, one)
            row[r] = v
            total += np.float64(v)
        cast[0] = total / R
        _view(ptrs, t, 3, b, 1, sc)[0] = _maximum(cast[0], sc[3])


@njit(parallel=True, **_JIT)
def _adafactor_factored(ptrs, chunks, sc, fl, ilike):
    """Operands: p (unread), u (written), g, then per tensor: row factors, column factors,
    clamped row means, shape (R, C). Walks each chunk row segment by row segment."""
    one = _one(sc)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        u, g = _view(ptrs, t, 1, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        shape = _view(ptrs, t, 6, 0, 2, ilike)
        R, C = shape[0], shape[1]
        i = 0
        while i < n:
            r, c0 = (lo + i) // C, (lo + i) % C
            length = min(C - c0, n - i)
            rv = _view(ptrs, t, 3, r, 1, sc)[0]
            rm = _view(ptrs, t, 5, r // R, 1, sc)[0]
            cv = _view(ptrs, t, 4, (r // R) * C + c0, length, sc)
            for j in range(length):
                v = _maximum(rv * cv[j] / rm, sc[4])
                u[i + j] = one / np.sqrt(v) * _grad(g[i + j], sc)
            i += length


@njit(parallel=True, **_JIT)
def _adafactor_vector(ptrs, chunks, sc, fl):
    """Operands: p (unread), u (written), g, variance."""
    lerp_hi = fl[0] != 0
    one = _one(sc)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        u, g = _view(ptrs, t, 1, lo, n, sc), _view(ptrs, t, 2, lo, n, sc)
        var = _view(ptrs, t, 3, lo, n, sc)
        for i in range(n):
            d = _grad(g[i], sc)
            v = _lerp(var[i], d * d, sc[2], lerp_hi, one)
            var[i] = v
            u[i] = one / np.sqrt(_maximum(v, sc[4])) * d


def _run(kernel, operands, scalars, n_threads, *rule, n_aux=0):
    """Call a kernel with the scalars split into a dtype array and an int flag array."""
    dtype, ptrs, chunks = _setup(operands, n_threads, n_aux)
    kernel(ptrs, chunks, *_split(scalars, dtype), *rule)


def _split(scalars, dtype):
    """The scalars as a dtype array of the real-valued fields and an int64 array of flags."""
    sc = np.array([v for v in scalars.values() if not isinstance(v, bool)], dtype)
    fl = np.array([v for v in scalars.values() if isinstance(v, bool)] or [0], np.int64)
    return sc, fl


def adagrad_step(params, out, grads, state_sums, *, n_threads, **hyper):
    _run(_adagrad, (params, out, grads, state_sums),
         _scalars.adagrad_scalars(params[0].dtype, **hyper), n_threads)


def rmsprop_step(params, out, grads, square_avgs, grad_avgs, momentum_buffers, *, n_threads,
                 **hyper):
    operands = (params, out, grads, square_avgs) + tuple(
        x for x in (grad_avgs, momentum_buffers) if x is not None)
    _run(_rmsprop, operands, _scalars.rmsprop_scalars(params[0].dtype, **hyper), n_threads)


def adadelta_step(params, out, grads, square_avgs, acc_deltas, *, n_threads, **hyper):
    _run(_two_state, (params, out, grads, square_avgs, acc_deltas),
         _scalars.adadelta_scalars(params[0].dtype, **hyper), n_threads, 0)


def adamax_step(params, out, grads, exp_avgs, exp_infs, *, n_threads, **hyper):
    _run(_two_state, (params, out, grads, exp_avgs, exp_infs),
         _scalars.adamax_scalars(params[0].dtype, **hyper), n_threads, 1)


def nadam_step(params, out, grads, exp_avgs, exp_avg_sqs, *, n_threads, **hyper):
    _run(_two_state, (params, out, grads, exp_avgs, exp_avg_sqs),
         _scalars.nadam_scalars(params[0].dtype, **hyper), n_threads, 2)


def radam_step(params, out, grads, exp_avgs, exp_avg_sqs, *, n_threads, **hyper):
    _run(_two_state, (params, out, grads, exp_avgs, exp_avg_sqs),
         _scalars.radam_scalars(params[0].dtype, **hyper), n_threads, 3)


def lion_step(params, out, grads, exp_avgs, *, n_threads, **hyper):
    _run(_lion, (params, out, grads, exp_avgs), _scalars.lion_scalars(params[0].dtype, **hyper),
         n_threads)


lamb_step, adafactor_step = _twopass.steps_for(sys.modules[__name__])
# fastopt.init's and fastopt.weight_norm's operations live in their own module
random_fill = _numba_init.random_fill
weight_norm_sums, weight_norm_apply = _numba_init.weight_norm_sums, _numba_init.weight_norm_apply
# fastopt.prune's select: _select's driver over the counting passes of _numba_compress
magnitude_masks = functools.partial(_select.magnitude_masks, _numba_compress)
quant_loop = _numba_compress.quant_loop  # fastopt.quant's loops
kd_rows = _numba_compress.kd_rows  # fastopt.distill's rows


# -- the passes _twopass drives

_PASSES = {
    "lamb_update": (_lamb_update, ()),
    "scaled_apply": (_scaled_apply, ()),
    "adafactor_vector": (_adafactor_vector, ()),
    "adafactor_factored": (_adafactor_factored, (np.empty(0, np.int64),)),
}


def run(kernel, operands, scalars, n_threads, n_aux=0):
    fn, rule = _PASSES[kernel]
    _run(fn, operands, scalars, n_threads, *rule, n_aux=n_aux)


def factors(grads, rows, cols, rmeans, rowparts, shape, items, slices, scalars, n_threads):
    dtype = grads[0].dtype
    ptrs, sizes = data_pointers((grads, rows, cols, rmeans, rowparts), dtype.itemsize, 4)
    numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS,
                                     int(sizes.sum()) // MIN_PER_THREAD)))
    _adafactor_factors(ptrs, shape, items, slices, *_split(scalars, dtype))


def device(arrays, like):
    return arrays


wrap_steps(globals())  # pruning masks: the pruned entries zeroed after each elementwise step
