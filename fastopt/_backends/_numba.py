"""The Numba backend: @njit(parallel=True, cache=True) kernels over many tensors.

The kernels get a table of data addresses (tensor x operand) and a chunk list, so a step
over any number of tensors is one call and one parallel loop, as in the Cython backend.
Scalars arrive as an array of the parameter's dtype, so float32 math stays float32.
Each operand set has its own kernel (Adam with and without amsgrad, SGD with and without
momentum): LLVM vectorizes a loop only after checking at run time that its arrays do not
overlap, and a placeholder view standing in for a missing operand would overlap a real one
and send every chunk down the scalar path.
Element math is written here on its own; the parity tests hold it to the NumPy reference.
"""

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastopt._cpu._runtime import data_pointers
from fastopt.optim._scalars import adam_scalars, sgd_scalars

CHUNK = 16384  # FO_CHUNK of fastopt/reduce.h
LANES = 16  # FO_NORM_LANES
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
def _sgd_direction(p, g, sc):
    weight_decay = sc[2]
    d = _grad(g, sc)
    if weight_decay != 0:
        d = d + weight_decay * p
    return d


@njit(inline="always", **_JIT)
def _sgd_element(p, g, sc):
    return p + sc[5] * _sgd_direction(p, g, sc)


@njit(inline="always", **_JIT)
def _sgd_momentum_element(p, g, buf, i, sc, first, nesterov):
    momentum, one_minus_dampening, neg_lr = sc[3], sc[4], sc[5]
    d = _sgd_direction(p, g, sc)
    b = d if first else buf[i] * momentum + one_minus_dampening * d
    buf[i] = b
    return p + neg_lr * (d + momentum * b if nesterov else b)


@njit(parallel=True, **_JIT)
def _sgd(ptrs, chunks, sc):
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _view(ptrs, t, 0, lo, n, sc)
        g = _view(ptrs, t, 2, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = _sgd_element(p[i], g[i], sc)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = _sgd_element(p[i], g[i], sc)


@njit(parallel=True, **_JIT)
def _sgd_momentum(ptrs, chunks, sc, first, nesterov):
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _view(ptrs, t, 0, lo, n, sc)
        g = _view(ptrs, t, 2, lo, n, sc)
        buf = _view(ptrs, t, 3, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = _sgd_momentum_element(p[i], g[i], buf, i, sc, first, nesterov)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = _sgd_momentum_element(p[i], g[i], buf, i, sc, first, nesterov)


@njit(inline="always", **_JIT)
def _adam_moments(p, g, m, v, i, sc, lerp_hi):
    """Decayed p, and m[i], v[i] updated; returns (p, m_i, v_i)."""
    weight_decay, decay, w1, beta2 = sc[2], sc[3], sc[4], sc[5]
    one_minus_beta2, one_minus_w1 = sc[6], sc[10]
    d = _grad(g, sc)
    p = p * decay
    if weight_decay != 0:
        d = d + weight_decay * p
    mi = m[i]
    mi = d - (d - mi) * one_minus_w1 if lerp_hi else mi + w1 * (d - mi)
    vi = v[i] * beta2 + one_minus_beta2 * d * d
    m[i] = mi
    v[i] = vi
    return p, mi, vi


@njit(inline="always", **_JIT)
def _adam_apply(p, mi, vhat, sc):
    bc2_sqrt, eps, neg_step_size = sc[7], sc[8], sc[9]
    denom = np.sqrt(vhat) / bc2_sqrt + eps
    return p + neg_step_size * mi / denom


@njit(inline="always", **_JIT)
def _adam_element(p, g, m, v, i, sc, lerp_hi):
    p, mi, vi = _adam_moments(p, g, m, v, i, sc, lerp_hi)
    return _adam_apply(p, mi, vi, sc)


@njit(inline="always", **_JIT)
def _adam_amsgrad_element(p, g, m, v, vmax, i, sc, lerp_hi):
    p, mi, vi = _adam_moments(p, g, m, v, i, sc, lerp_hi)
    old = vmax[i]
    vhat = old if (old > vi or old != old) else vi  # torch.maximum: NaN propagates
    vmax[i] = vhat
    return _adam_apply(p, mi, vhat, sc)


@njit(parallel=True, **_JIT)
def _adam(ptrs, chunks, sc, lerp_hi):
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _view(ptrs, t, 0, lo, n, sc)
        g = _view(ptrs, t, 2, lo, n, sc)
        m = _view(ptrs, t, 3, lo, n, sc)
        v = _view(ptrs, t, 4, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = _adam_element(p[i], g[i], m, v, i, sc, lerp_hi)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = _adam_element(p[i], g[i], m, v, i, sc, lerp_hi)


@njit(parallel=True, **_JIT)
def _adam_amsgrad(ptrs, chunks, sc, lerp_hi):
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _view(ptrs, t, 0, lo, n, sc)
        g = _view(ptrs, t, 2, lo, n, sc)
        m = _view(ptrs, t, 3, lo, n, sc)
        v = _view(ptrs, t, 4, lo, n, sc)
        vmax = _view(ptrs, t, 5, lo, n, sc)
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = _adam_amsgrad_element(p[i], g[i], m, v, vmax, i, sc, lerp_hi)
        else:
            out = _view(ptrs, t, 1, lo, n, sc)
            for i in range(n):
                out[i] = _adam_amsgrad_element(p[i], g[i], m, v, vmax, i, sc, lerp_hi)


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


def _setup(operands, n_threads):
    dtype = operands[0][0].dtype
    ptrs, sizes = data_pointers(operands, dtype.itemsize)
    n_threads = min(n_threads, numba.config.NUMBA_NUM_THREADS, int(sizes.sum()) // MIN_PER_THREAD)
    numba.set_num_threads(max(1, n_threads))
    return dtype, ptrs, _chunks(sizes)


def sgd_step(params, out, grads, momentum_buffers, *, n_threads, **hyper):
    has_buf = momentum_buffers is not None
    operands = (params, out, grads) + ((momentum_buffers,) if has_buf else ())
    dtype, ptrs, chunks = _setup(operands, n_threads)
    s = sgd_scalars(dtype, **hyper)
    sc = np.array([s["clip"], s["gscale"], s["weight_decay"], s["momentum"], s["one_minus_dampening"],
                   s["neg_lr"]], dtype)
    if has_buf:
        _sgd_momentum(ptrs, chunks, sc, s["first"], s["nesterov"])
    else:
        _sgd(ptrs, chunks, sc)


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, n_threads, **hyper):
    amsgrad = max_exp_avg_sqs is not None
    operands = (params, out, grads, exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ())
    dtype, ptrs, chunks = _setup(operands, n_threads)
    s = adam_scalars(dtype, **hyper)
    sc = np.array([s["clip"], s["gscale"], s["weight_decay"], s["decay"], s["one_minus_beta1"], s["beta2"],
                   s["one_minus_beta2"], s["bias_correction2_sqrt"], s["eps"],
                   s["neg_step_size"], 0.0], dtype)
    sc[10] = sc.dtype.type(1) - sc[4]  # torch's (T)1 - w, in the dtype
    (_adam_amsgrad if amsgrad else _adam)(ptrs, chunks, sc, s["lerp_hi"])
