"""The Numba backend's optimizer kernels: @njit(parallel=True, cache=True) over many tensors.

The kernels get a table of data addresses (tensor x operand) and a chunk list, so a step
over any number of tensors is one call and one parallel loop, as in the Cython backend.

Elementwise rules: each kernel of the rule table (fastopt._rules) has an element function
here, registered with ``@element("<kernel>")``, that reads its scalars by field name
(``a.beta2``) from the kernel's Args struct (a record of the C struct's layout, unpacked into
a named tuple of the same fields and types, so float32 math stays float32). One driver per
kernel runs it over the chunks: its source is one template (_DRIVER), compiled with this
file's name so that Numba caches it on disk like a function written out here. Each driver
has one loop, with the parameter itself as the destination of an in-place update: LLVM
vectorizes a loop only after checking at run time that its arrays do not overlap, and a
distinct destination view of the same memory would send every chunk down the scalar path.
Element math is written here on its own; the parity tests hold it to the NumPy reference.

Storage formats (fastopt._backends._formats): with ``formats=``, the operands of an
elementwise kernel may be stored as bfloat16 or float16 while it computes in float32. A
second template (_FORMATTED) compiles one more driver per kernel: per chunk, it loads each
low-precision operand into float32 scratch, runs the element function over the chunk, and
stores the written ones back rounded (fastopt/lowp.h, spelled out below). The storage codes
are read per chunk, not compiled in: a parallel driver takes 2-3 s to compile, and one per
combination of formats would multiply that; the per-chunk dispatch costs nothing measurable.
State may also be blockwise 8-bit (Q8S, Q8U: one uint8 code per element, a float32 absmax per
BLOCK elements); a chunk holds whole blocks (CHUNK is a multiple of BLOCK), so its state is
loaded and quantized back within the chunk, as _formats.q8_load and q8_store do.
"""

import collections
import contextlib
import functools

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastopt import _rules
from fastopt._backends._formats import BF16, BLOCK, F16, F32, Q8S, Q8U, QMAPS, SCALE_MIN
from fastopt._backends._layout import BAND, CHUNK, COLS, LANES, MIN_PER_THREAD
from fastopt._backends._refmath import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1
from fastopt._cpu._runtime import data_pointers

MASKS_IN_KERNELS = False  # pruned entries are zeroed after each pass (fastopt._backends._steps)
# the storage formats (_formats.CODES) that elementwise(formats=) converts inside its chunks
FORMATS = frozenset((F32, BF16, F16, Q8S, Q8U))
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
def _one(like):
    """1 in the parameters' dtype: a bare literal 1 would promote float32 math to float64."""
    return np.ones(1, like.dtype)[0]


def _set_threads(n_threads, sizes):
    n_threads = min(n_threads, numba.config.NUMBA_NUM_THREADS, int(sizes.sum()) // MIN_PER_THREAD)
    numba.set_num_threads(max(1, n_threads))


def _setup(operands, n_threads, n_aux=0):
    dtype = operands[0][0].dtype
    ptrs, sizes = data_pointers(operands, dtype.itemsize, n_aux)
    _set_threads(n_threads, sizes)
    return dtype, ptrs, _chunks(sizes)


# -- the elementwise kernels

_ELEMENTS = {}  # kernel name -> element function


def element(kernel):
    """Register an element function for `kernel` of the rule table: called as
    ``element(p, g, s1, ..., sk, i, a, one)`` with the chunk's state arrays s1..sk (it
    updates their element i), the scalars `a` by field name, and 1 in the dtype; it returns
    the new parameter."""
    def register(fn):
        _ELEMENTS[kernel] = njit(inline="always", **_JIT)(fn)
        return _ELEMENTS[kernel]
    return register


_DRIVER = """
def {name}(ptrs, chunks, rec, like):
    one = _one(like)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, like), _view(ptrs, t, 2, lo, n, like)
        {views}
        {factor}
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = element(p[i], g[i], {states}i, rec[0], one)
        else:
            out = _view(ptrs, t, 1, lo, n, like)
            for i in range(n):
                out[i] = element(p[i], g[i], {states}i, rec[0], one)
"""


@functools.lru_cache(maxsize=None)
def _driver(name):
    """The parallel driver of elementwise kernel `name` (see the module docstring); a
    cautious step's (fastopt._rules.CAUTIOUS_KERNELS) passes its tensor's factor k, its
    last operand, after the state."""
    kernel = _rules.ALL_KERNELS[name]
    n = len(kernel.state) - kernel.aux
    namespace = {"__name__": __name__, "prange": prange, "_view": _view, "_one": _one,
                 "element": _ELEMENTS[name]}
    source = _DRIVER.format(
        name=f"_drive_{name}",
        views="; ".join(f"s{k} = _view(ptrs, t, {k + 2}, lo, n, like)" for k in range(1, n + 1)),
        factor=f"k = _view(ptrs, t, {n + 3}, 0, 1, like)[0]" if kernel.aux else "",
        states="".join(f"s{k}, " for k in range(1, n + 1)) + ("k, " if kernel.aux else ""))
    exec(compile(source, __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_drive_{name}"])


_COUNT_DRIVER = """
def {name}(ptrs, chunks, rec, like, counts, mask_ptrs, mask_like):
    one = _one(like)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, like), _view(ptrs, t, 2, lo, n, like)
        {views}
        agree = 0
        {counting}
        counts[c] = agree
"""
_COUNT_ALL = """for i in range(n):
            agree += element(p[i], g[i], {states}i, rec[0], one) != 0"""
_COUNT_KEPT = """m = _view(mask_ptrs, t, 0, lo, n, mask_like)
        for i in range(n):
            agree += (element(p[i], g[i], {states}i, rec[0], one) != 0) & (m[i] != 0)"""


@functools.lru_cache(maxsize=None)
def _count_driver(name, masked):
    """The parallel driver of cautious count kernel `name`: each chunk's count of the
    elements whose K is 1 (and, `masked`, whose mask byte is not 0), nothing written."""
    n = len(_rules.ALL_KERNELS[name].state)
    namespace = {"__name__": __name__, "prange": prange, "_view": _view, "_one": _one,
                 "element": _ELEMENTS[name]}
    states = "".join(f"s{k}, " for k in range(1, n + 1))
    source = _COUNT_DRIVER.format(
        name=f"_count_{name}",
        views="; ".join(f"s{k} = _view(ptrs, t, {k + 2}, lo, n, like)" for k in range(1, n + 1)),
        counting=(_COUNT_KEPT if masked else _COUNT_ALL).format(states=states))
    exec(compile(source, __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_count_{name}"])


def caution_counts(kernel, operands, record, n_threads, masks=None):
    """Per tensor, how many elements the cautious count kernel `kernel` finds agreeing and
    `masks` does not prune, counted in its pass (as the Cython backend's): no K written,
    nor read back."""
    dtype, ptrs, chunks = _setup(operands, n_threads)
    if masks is not None and (len(masks) != len(operands[0]) or any(
            np.size(m) != p.size for m, p in zip(masks, operands[0]))):
        raise ValueError("masks: expected a mask per tensor, of its element count")
    mask_ptrs = np.zeros((0, 1), np.int64) if masks is None else data_pointers((masks,), 1)[0]
    counts = np.zeros(chunks.shape[0], np.int64)
    _count_driver(kernel, masks is not None)(ptrs, chunks, record, np.empty(0, dtype), counts,
                                             mask_ptrs, np.empty(0, np.uint8))
    per_tensor = np.zeros(len(operands[0]), np.int64)
    np.add.at(per_tensor, chunks[:, 0], counts)
    return per_tensor


def elementwise(kernel, operands, record, n_threads, masks=None, n_aux=0, formats=None):
    """Run kernel `kernel` (a name of the rule table) over `operands` (param in, param out,
    grad, state..., the last `n_aux` per-tensor auxiliaries) with scalars `record`; with
    `formats` (fastopt._backends._formats.Formats) the operands are stored as it says and
    `record` is in float32 (see _formatted)."""
    if formats is not None:
        _formatted(kernel, operands, record, n_threads, n_aux, formats)
        return
    dtype, ptrs, chunks = _setup(operands, n_threads, n_aux)
    if kernel in _PASSES:
        with _slp_vectorized():  # as pass_sums compiles the same signature (the lanes)
            _PASSES[kernel](ptrs, chunks, record, np.empty(0, dtype), _NO_SUMS,
                            np.empty((0, 0)))
    else:
        _driver(kernel)(ptrs, chunks, record, np.empty(0, dtype))


@njit(inline="always", **_JIT)
def _grad(g, a):
    """The gradient prologue: clamp to [-clip, clip] (NaN passes), then the signed scale."""
    clip = a.clip  # read once, not in a branch: a load LLVM cannot hoist, vectorized as gathers
    g = -clip if g < -clip else (clip if g > clip else g)
    return a.gscale * g


@njit(inline="always", **_JIT)
def _lerp(start, end, w, hi, one):
    return end - (end - start) * (one - w) if hi != 0 else start + w * (end - start)


@njit(inline="always", **_JIT)
def _maximum(a, b):
    return a if (a != a or a > b) else b  # torch.maximum: NaN propagates


@njit(inline="always", **_JIT)
def _l2(d, p, weight_decay):
    return d + weight_decay * p if weight_decay != 0 else d


@element("sgd")
def _sgd(p, g, i, a, one):
    return p + a.neg_lr * _l2(_grad(g, a), p, a.weight_decay)


@element("sgd_momentum")
def _sgd_momentum(p, g, buf, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    b = d if a.first != 0 else buf[i] * a.momentum + a.one_minus_dampening * d
    buf[i] = b
    return p + a.neg_lr * (d + a.momentum * b if a.nesterov != 0 else b)


@njit(inline="always", **_JIT)
def _moments(p, g, m, v, i, a, one):
    """Adam's, NAdam's and RAdam's shared start: (decayed p, gradient, m_i, v_i); m, v
    updated."""
    d = _grad(g, a)
    p = p * a.decay
    d = _l2(d, p, a.weight_decay)
    mm = _lerp(m[i], d, a.one_minus_beta1, a.lerp_hi, one)
    vv = v[i] * a.beta2 + a.one_minus_beta2 * d * d
    m[i] = mm
    v[i] = vv
    return p, d, mm, vv


@njit(inline="always", **_JIT)
def _agrees(u, d, one):
    """The cautious option's K: 1 where the step's direction u agrees with the gradient."""
    return one if u * d > 0 else one - one


@njit(inline="always", **_JIT)
def _cautious(u, d, k, one):
    """u K k: u where it agrees with the gradient, times the tensor's factor k, else 0."""
    return u * (k if u * d > 0 else one - one)


@element("adam")
def _adam(p, g, m, v, i, a, one):
    p, d, mm, vv = _moments(p, g, m, v, i, a, one)
    return p + a.neg_step_size * mm / (np.sqrt(vv) / a.bias_correction2_sqrt + a.eps)


@element("adam_amsgrad")
def _adam_amsgrad(p, g, m, v, vmax, i, a, one):
    p, d, mm, vv = _moments(p, g, m, v, i, a, one)
    vv = _maximum(vmax[i], vv)
    vmax[i] = vv
    return p + a.neg_step_size * mm / (np.sqrt(vv) / a.bias_correction2_sqrt + a.eps)


@element("adam_caution")
def _adam_caution(p, g, m, i, a, one):
    d = _l2(_grad(g, a), p * a.decay, a.weight_decay)
    return _agrees(_lerp(m[i], d, a.one_minus_beta1, a.lerp_hi, one), d, one)


@element("adam_cautious")
def _adam_cautious(p, g, m, v, k, i, a, one):
    p, d, mm, vv = _moments(p, g, m, v, i, a, one)
    return p + a.neg_step_size * _cautious(mm, d, k, one) / (np.sqrt(vv) / a.bias_correction2_sqrt
                                                             + a.eps)


@element("adam_amsgrad_cautious")
def _adam_amsgrad_cautious(p, g, m, v, vmax, k, i, a, one):
    p, d, mm, vv = _moments(p, g, m, v, i, a, one)
    vv = _maximum(vmax[i], vv)
    vmax[i] = vv
    return p + a.neg_step_size * _cautious(mm, d, k, one) / (np.sqrt(vv) / a.bias_correction2_sqrt
                                                             + a.eps)


@element("adagrad")
def _adagrad(p, g, s1, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    s = s1[i] + d * d
    s1[i] = s
    return p + a.neg_clr * d / (np.sqrt(s + a.eps_root) + a.eps)


@njit(inline="always", **_JIT)
def _rmsprop_any(p, g, sq, gavg, buf, i, a, one, centered, use_momentum):
    d = _l2(_grad(g, a), p, a.weight_decay)
    s = sq[i] * a.alpha + a.one_minus_alpha * d * d
    sq[i] = s
    if centered:
        m = _lerp(gavg[i], d, a.one_minus_alpha, a.lerp_hi, one)
        gavg[i] = m
        r = np.sqrt(s - m * m + a.eps_root)
    else:
        r = np.sqrt(s + a.eps_root)
    r = r + a.eps
    if use_momentum:
        b = buf[i] * a.momentum + d / r * a.trace_scale
        buf[i] = b
        return p + a.neg_lr * b
    return p + a.neg_lr * d / r


@element("rmsprop")
def _rmsprop(p, g, sq, i, a, one):
    return _rmsprop_any(p, g, sq, sq, sq, i, a, one, False, False)


@element("rmsprop_centered")
def _rmsprop_centered(p, g, sq, gavg, i, a, one):
    return _rmsprop_any(p, g, sq, gavg, sq, i, a, one, True, False)


@element("rmsprop_momentum")
def _rmsprop_momentum(p, g, sq, buf, i, a, one):
    return _rmsprop_any(p, g, sq, sq, buf, i, a, one, False, True)


@element("rmsprop_centered_momentum")
def _rmsprop_centered_momentum(p, g, sq, gavg, buf, i, a, one):
    return _rmsprop_any(p, g, sq, gavg, buf, i, a, one, True, True)


@element("adadelta")
def _adadelta(p, g, sq, acc, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    s = sq[i] * a.rho + a.one_minus_rho * d * d
    sq[i] = s
    delta = np.sqrt(acc[i] + a.eps) / np.sqrt(s + a.eps) * d
    acc[i] = acc[i] * a.rho + a.one_minus_rho * delta * delta
    return p + a.neg_lr * delta


@element("adamax")
def _adamax(p, g, m, u, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    mm = _lerp(m[i], d, a.one_minus_beta1, a.lerp_hi, one)
    uu = _maximum(u[i] * a.beta2, abs(d) + a.eps)
    m[i] = mm
    u[i] = uu
    return p + a.neg_clr * mm / uu


@element("nadam")
def _nadam(p, g, m, v, i, a, one):
    p, d, mm, vv = _moments(p, g, m, v, i, a, one)
    denom = np.sqrt(vv / a.bias_correction2) + a.eps
    p = p + a.grad_coef * d / denom
    return p + a.avg_coef * mm / denom


@element("radam")
def _radam(p, g, m, v, i, a, one):
    p, d, mm, vv = _moments(p, g, m, v, i, a, one)
    u = mm / a.bias_correction1 * a.lr
    if a.rectify != 0:
        u = u * (a.bias_correction2_sqrt / (np.sqrt(vv) + a.eps)) * a.rect
    return p - u


@njit(inline="always", **_JIT)
def _adopt_normed(d, v, a):
    n = d / _maximum(np.sqrt(v), a.eps)
    return -a.clamp if n < -a.clamp else (a.clamp if n > a.clamp else n)


@njit(inline="always", **_JIT)
def _adopt_any(p, g, m, v, k, cautious, i, a, one):
    """ADOPT's step; with `cautious`, m K k in place of m. Branch-free on the first step
    (`a.first`, the same over the whole loop): with an early return there, LLVM turned
    the cautious loop into masked stores and gathers of the record's fields, 2-3x slower."""
    d = _l2(_grad(g, a), p, a.weight_decay)
    first = a.first != 0
    vi, mi = v[i], m[i]
    q = p + a.neg_lr_wd * p if a.decoupled != 0 else p
    mm = _lerp(mi, _adopt_normed(d, vi, a), a.one_minus_beta1, a.lerp_hi, one)
    m[i] = mi if first else mm
    v[i] = vi + d * d if first else vi * a.beta2 + a.one_minus_beta2 * d * d
    return p if first else q + a.neg_lr * (_cautious(mm, d, k, one) if cautious else mm)


@element("adopt")
def _adopt(p, g, m, v, i, a, one):
    return _adopt_any(p, g, m, v, one, False, i, a, one)


@element("adopt_cautious")
def _adopt_cautious(p, g, m, v, k, i, a, one):
    return _adopt_any(p, g, m, v, k, True, i, a, one)


@element("adopt_caution")
def _adopt_caution(p, g, m, v, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    k = _agrees(_lerp(m[i], _adopt_normed(d, v[i], a), a.one_minus_beta1, a.lerp_hi, one), d, one)
    return one - one if a.first != 0 else k


@njit(inline="always", **_JIT)
def _lion_sign(d, m, a, one):
    c = a.one_minus_beta1 * d + a.beta1 * m
    return one if c > 0 else (-one if c < 0 else c)


@njit(inline="always", **_JIT)
def _lion_any(p, g, m, k, cautious, i, a, one):
    """Lion's step; with `cautious`, the sign times K k."""
    d = _grad(g, a)
    u = _lion_sign(d, m[i], a, one)
    if cautious:
        u = _cautious(u, d, k, one)
    m[i] = a.one_minus_beta2 * d + a.beta2 * m[i]
    return p + a.neg_lr * (u + a.weight_decay * p)


@element("lion")
def _lion(p, g, m, i, a, one):
    return _lion_any(p, g, m, one, False, i, a, one)


@element("lion_cautious")
def _lion_cautious(p, g, m, k, i, a, one):
    return _lion_any(p, g, m, k, True, i, a, one)


@element("lion_caution")
def _lion_caution(p, g, m, i, a, one):
    d = _grad(g, a)
    return _agrees(_lion_sign(d, m[i], a, one), d, one)


@element("rprop")
def _rprop(p, g, prev, step_size, i, a, one):
    d = _grad(g, a)
    t = d * prev[i]
    f = a.etaplus if t > 0 else (a.etaminus if t < 0 else one)
    h = step_size[i] * f
    h = a.step_size_min if h < a.step_size_min else (a.step_size_max if h > a.step_size_max
                                                     else h)
    step_size[i] = h
    if f == a.etaminus:
        d = one - one
    prev[i] = d
    return p + (-one * (one if d > 0 else (-one if d < 0 else one - one))) * h


@element("asgd")
def _asgd(p, g, ax, i, a, one):
    d = _grad(g, a)
    if a.weight_decay != 0:
        d = d + a.weight_decay * p
    q = p * a.decay
    q = q + a.neg_eta * d
    ax[i] = ax[i] + (q - ax[i]) * a.mu if a.average else q
    return q


@element("ademamix")
def _ademamix(p, g, m1, m2, v, i, a, one):
    d = _grad(g, a)
    m1[i] = m1[i] * a.beta1 + a.one_minus_beta1 * d
    return _ademamix_tail(p, d, m1[i], m2, v, one, False, i, a, one)


@element("ademamix_nofast")
def _ademamix_nofast(p, g, m2, v, i, a, one):
    d = _grad(g, a)
    return _ademamix_tail(p, d, d, m2, v, one, False, i, a, one)


@element("ademamix_cautious")
def _ademamix_cautious(p, g, m1, m2, v, k, i, a, one):
    d = _grad(g, a)
    m1[i] = m1[i] * a.beta1 + a.one_minus_beta1 * d
    return _ademamix_tail(p, d, m1[i], m2, v, k, True, i, a, one)


@element("ademamix_nofast_cautious")
def _ademamix_nofast_cautious(p, g, m2, v, k, i, a, one):
    d = _grad(g, a)
    return _ademamix_tail(p, d, d, m2, v, k, True, i, a, one)


@element("ademamix_caution")
def _ademamix_caution(p, g, m1, m2, i, a, one):
    d = _grad(g, a)
    fast = m1[i] * a.beta1 + a.one_minus_beta1 * d
    return _agrees(fast / a.bias_correction1 + a.alpha * (m2[i] * a.beta3 + a.one_minus_beta3 * d),
                   d, one)


@element("ademamix_nofast_caution")
def _ademamix_nofast_caution(p, g, m2, i, a, one):
    d = _grad(g, a)
    return _agrees(d / a.bias_correction1 + a.alpha * (m2[i] * a.beta3 + a.one_minus_beta3 * d),
                   d, one)


@njit(inline="always", **_JIT)
def _ademamix_tail(p, d, m1, m2, v, k, cautious, i, a, one):
    """AdEMAMix after its fast moment; with `cautious`, the numerator times K k."""
    m2[i] = m2[i] * a.beta3 + a.one_minus_beta3 * d
    v[i] = v[i] * a.beta2 + a.one_minus_beta2 * d * d
    u = m1 / a.bias_correction1 + a.alpha * m2[i]
    if cautious:
        u = _cautious(u, d, k, one)
    u = u / (np.sqrt(v[i]) / a.bias_correction2_sqrt + a.eps)
    u = u + a.weight_decay * p
    return p + a.neg_lr * u


@element("adan")
def _adan(p, g, m, n, diff, neg_pre, i, a, one):
    d = _grad(g, a)
    e = (-d if a.first else neg_pre[i]) + d
    m[i] = m[i] * a.beta1 + a.one_minus_beta1 * d
    diff[i] = diff[i] * a.beta2 + a.one_minus_beta2 * e
    e = e * a.beta2 + d
    n[i] = n[i] * a.beta3 + a.one_minus_beta3 * e * e
    den = np.sqrt(n[i]) / a.bias_correction3_sqrt + a.eps
    q = p * a.decay  # decay and prox: 1 where they do not apply (no bit changes)
    q = q + a.neg_step_size * m[i] / den
    q = q + a.neg_step_size_diff * diff[i] / den
    q = q / a.prox
    neg_pre[i] = (one - one) + (-one) * d
    return q


@element("sgd_schedulefree")
def _sgd_schedulefree(p, g, z, i, a, one):
    return _schedulefree_tail(p, _grad(g, a), z, i, a, one)


@element("adamw_schedulefree")
def _adamw_schedulefree(p, g, z, v, i, a, one):
    d = _grad(g, a)
    v[i] = v[i] * a.beta2 + a.one_minus_beta2 * d * d
    d = d / (np.sqrt(v[i] / a.bias_correction2) + a.eps)
    return _schedulefree_tail(p, d, z, i, a, one)


@njit(inline="always", **_JIT)
def _schedulefree_tail(y, d, z, i, a, one):
    zz = z[i]
    d = _l2(d, y, a.weight_decay)
    q = _lerp(y, zz, a.ckp1, a.lerp_hi, one)
    q = q + a.y_coef * d
    z[i] = zz + a.neg_lr * d
    return q


@element("muon_momentum")
def _muon_momentum(p, g, buf, i, a, one):
    """Muon's momentum pass: returns the update to orthogonalize; the buffer updated."""
    d = _grad(g, a)
    b = _lerp(buf[i], d, a.one_minus_momentum, a.lerp_hi, one)
    buf[i] = b
    return _lerp(d, b, a.momentum, a.nesterov_hi, one) if a.nesterov else b


@element("ema")
def _ema(e, p, i, a, one):
    return _lerp(e, p, a.weight, a.lerp_hi, one)


@njit(inline="always", **_JIT)
def _prodigy_grad(p, g, a):
    d = _grad(g, a)
    return d + a.weight_decay * p if a.weight_decay != 0 else d


@njit(inline="always", **_JIT)
def _prodigy_tail(p, d, s, p0, v, i, a):
    v[i] = v[i] * a.beta2 + a.v_coef * d * d
    s[i] = s[i] * a.beta3 + a.s_coef * d
    return d * (p0[i] - p)


@element("prodigy_update")
def _prodigy_update(p, g, s, p0, m, v, i, a, one):
    """Prodigy's update pass: returns the dot product's term; s, m, v updated."""
    d = _prodigy_grad(p, g, a)
    m[i] = m[i] * a.beta1 + a.m_coef * d
    return _prodigy_tail(p, d, s, p0, v, i, a)


@element("prodigy_update_nom")
def _prodigy_update_nom(p, g, s, p0, v, i, a, one):
    return _prodigy_tail(p, _prodigy_grad(p, g, a), s, p0, v, i, a)


@element("prodigy_apply")
def _prodigy_apply(p, g, m, v, i, a, one):
    if a.moves == 0:
        return p
    denom = np.sqrt(v[i]) + a.d_eps
    q = p + a.neg_decay * p if a.neg_decay != 0 else p
    return q + a.neg_dlr * (m[i] / denom)


@element("prodigy_apply_nom")
def _prodigy_apply_nom(p, g, v, i, a, one):
    if a.moves == 0:
        return p
    denom = np.sqrt(v[i]) + a.d_eps
    d = _prodigy_grad(p, g, a)
    q = p + a.neg_decay * p if a.neg_decay != 0 else p
    return q + a.neg_dlr_d * (d / denom)


@element("lamb_update")
def _lamb_update(p, g, m, v, i, a, one):
    """Lamb's update pass: returns u (written to the scratch buffer in the "param out"
    slot); m and v updated."""
    d = _grad(g, a)
    mm = a.one_minus_beta1 * d + a.beta1 * m[i]
    vv = a.one_minus_beta2 * (d * d) + a.beta2 * v[i]
    m[i] = mm
    v[i] = vv
    return mm / a.bias_correction1 / (np.sqrt(vv / a.bias_correction2) + a.eps) + a.weight_decay * p


# -- storage formats: fastopt/lowp.h's conversions, and the drivers that apply them per chunk

_WIDTH = {F32: 4, BF16: 2, F16: 2, Q8S: 1, Q8U: 1}  # the itemsize of each format of FORMATS
_NO_KEYS = np.zeros((0, 2), np.uint32)


# The bit operations: Numba widens arithmetic on integers narrower than 64 bits to 64 bits
# (and mixing uint64 with int64 turns float64), so each step is cut back to int32, which
# lets LLVM vectorize 16 lanes wide, not 8 (2x faster for float16).

@njit(inline="always", **_JIT)
def _bits_of(x):
    return np.float32(x).view(np.int32)


@njit(inline="always", **_JIT)
def _float_of(bits):
    return np.int32(bits).view(np.float32)


@njit(inline="always", **_JIT)
def _f16_load(h):
    h = np.int32(h)
    sign, e, m = np.int32((h & 0x8000) << 16), np.int32((h >> 10) & 0x1F), np.int32(h & 0x3FF)
    sub = _bits_of(np.float32(m) * np.float32(5.9604644775390625e-08))  # m 2^-24, exact
    body = np.int32((0x7F800000 if e == 31 else (e + 112) << 23) | (m << 13))  # inf, NaN
    return _float_of((sub if e == 0 else body) | sign)


@njit(inline="always", **_JIT)
def _bf16_round(x, r, stochastic):
    """bfloat16 of x: stochastic with 16 random bits r, else to nearest even."""
    bits = _bits_of(x)
    if (bits & 0x7FFFFFFF) > 0x7F800000:  # NaN: quiet, sign kept
        return np.uint16((bits >> 16) | 0x40)
    add = np.int32(r) if stochastic else np.int32(0x7FFF + ((bits >> 16) & 1))
    return np.uint16(np.int32(bits + add) >> 16)


@njit(inline="always", **_JIT)
def _f16_round(x, r, stochastic):
    """float16 of x: stochastic with 16 random bits r, else to nearest even. Every case is
    computed and one picked (as _formats._f16), which LLVM vectorizes."""
    bits = _bits_of(x)
    a, sign = np.int32(bits & 0x7FFFFFFF), np.int32((bits >> 16) & 0x8000)
    e = np.int32(a >> 23)
    # float16's normal range and above: 13 bits go; 2^16 and above: inf
    h = np.int32(a - (112 << 23))
    add = np.int32(np.int32(r) >> 3) if stochastic else np.int32(0xFFF + ((h >> 13) & 1))
    normal = np.int32(0x7C00) if e >= 143 else np.int32(min(np.int32(h + add) >> 13, 0x7C00))
    # below: in units of 2^-24, s >= 14 bits go; s > 40 (below 2^-64) rounds to zero
    m = np.int64((a & 0x7FFFFF) | 0x800000) if e != 0 else np.int64(a)
    s = min(np.int32(126 - e) if e != 0 else np.int32(125), 41)
    if stochastic:
        up = np.int64(r) << (s - 16) if s >= 16 else np.int64(r) >> (16 - s)
    else:
        up = (np.int64(1) << (s - 1)) - 1 + ((m >> s) & 1)
    sub = np.int32((m + up) >> s) if s <= 40 else np.int32(0)
    out = normal if e >= 113 else sub
    return np.uint16((np.int32(0x7E00) if a > 0x7F800000 else out) | sign)  # NaN


# the loads of uint16 h into new float32 arrays, and the stores of float32 x into h (each
# store takes the random bits r, unread to nearest)

@njit(**_JIT)
def _load_bf16(h):
    x = np.empty(h.size, np.float32)
    for i in range(h.size):
        x[i] = _float_of(np.int32(h[i]) << 16)
    return x


@njit(**_JIT)
def _load_f16(h):
    x = np.empty(h.size, np.float32)
    for i in range(h.size):
        x[i] = _f16_load(h[i])
    return x


@njit(**_JIT)
def _store_bf16_rne(x, h, r):
    for i in range(x.size):
        h[i] = _bf16_round(x[i], 0, False)


@njit(**_JIT)
def _store_bf16_sr(x, h, r):
    for i in range(x.size):
        h[i] = _bf16_round(x[i], r[i], True)


@njit(**_JIT)
def _store_f16_rne(x, h, r):
    for i in range(x.size):
        h[i] = _f16_round(x[i], 0, False)


@njit(**_JIT)
def _store_f16_sr(x, h, r):
    for i in range(x.size):
        h[i] = _f16_round(x[i], r[i], True)


_W0, _W1 = np.uint32(PHILOX_W0), np.uint32(PHILOX_W1)
_S32 = np.uint64(32)


@njit(inline="always", **_JIT)
def _philox32(c0, c1, c2, c3, k0, k1):
    """_refmath.philox_rounds on uint32 words: each round's words cut back to 32 bits, so
    that LLVM vectorizes a loop of them (12x faster than the uint64 form, AMD EPYC)."""
    for _ in range(10):
        p0, p1 = np.uint64(c0) * PHILOX_M0, np.uint64(c2) * PHILOX_M1
        c0, c1, c2, c3 = (np.uint32(p1 >> _S32) ^ c1 ^ k0, np.uint32(p1),
                          np.uint32(p0 >> _S32) ^ c3 ^ k1, np.uint32(p0))
        k0, k1 = np.uint32(k0 + _W0), np.uint32(k1 + _W1)
    return c0, c1, c2, c3


@njit(**_JIT)
def _round_bits(lo, n, stream, step, key):
    """The 16 random bits of elements lo .. lo + n - 1 (lo a multiple of 8) of array `stream`
    (fo_round_words, one Philox per block of 8): element lo + i takes half i & 1 of word
    i >> 1, so the words' uint16 view (little-endian) holds its bits at index i."""
    words = np.empty(((n + 7) >> 3) * 4, np.uint32)
    c1 = np.uint32(stream << 24)
    c2, c3 = np.uint32(step), np.uint32(step >> _S32)
    k0, k1 = key[0], key[1]
    b0 = np.uint64(lo >> 3)
    for j in range(words.size >> 2):
        b = b0 + np.uint64(j)
        w0, w1, w2, w3 = _philox32(np.uint32(b), np.uint32(b >> _S32) | c1, c2, c3, k0, k1)
        words[4 * j], words[4 * j + 1], words[4 * j + 2], words[4 * j + 3] = w0, w1, w2, w3
    return words.view(np.uint16)


# Blockwise 8-bit state. A load looks each code up in its map. A store quantizes as
# _formats.q8_store does, whose binary search takes nine lookups an element, each a vector
# gather (6.4 ns an element on AMD EPYC, Zen 4); here one (0.75 ns). q8_store's code of
# q = x / absmax rises by one at each of 255 thresholds (the least q of each code above 0),
# so it is the count of thresholds at or below q. q lies in [-1, 1] or is NaN (code 0); its
# magnitude bits, clamped to [_Q8_FLOOR, 1.0], pick a bucket of 2^16 float32 values (per
# sign and map) that holds one threshold at most: its entry (_q8_table) is the count below
# the bucket (bits 17 up) and the threshold's rank in it (0x10000: none). It gave the binary
# search's code for all 2^32 float32 values when written; the tests check both sides of
# every threshold and bucket edge.

def _key(q):
    """float32 -> int64, in the order of the values (-0.0 just below +0.0)."""
    b = np.asarray(q, np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, -1 - (b & 0x7FFFFFFF), b)


def _q8_thresholds(qmap):
    """The least float32 q of each code k > 0 of map `qmap` in q8_store: q >= m[k], or
    q >= m[k-1] and q - m[k-1] >= (m[k] - m[k-1]) / 2 (in float32); found by bisection over
    the keys of [m[k-1], m[k]], where it holds at m[k] and not at m[k-1]. Their keys."""
    lo, hi = qmap[:-1], qmap[1:]
    half = (hi - lo) * np.float32(0.5)
    below, at = _key(lo), _key(hi)  # the predicate is false at `below`, true at `at`
    while np.any(at - below > 1):
        mid = (below + at) // 2
        b = np.where(mid < 0, (-1 - mid) | 0x80000000, mid).astype(np.uint32)
        q = b.view(np.float32)
        holds = (q >= hi) | ((q >= lo) & (q - lo >= half))
        below, at = np.where(holds, below, mid), np.where(holds, mid, at)
    return at


_Q8_KEYS = {code: _q8_thresholds(qmap) for code, qmap in QMAPS.items()}
# the magnitude bits from which the buckets start: one bucket of none below every threshold
_Q8_FLOOR = int((min(np.where(k < 0, -1 - k, k).min() for k in _Q8_KEYS.values()) >> 16) - 1
                ) << 16
_Q8_SIDE = ((0x3F800000 - _Q8_FLOOR) >> 16) + 1  # buckets per sign, up to 1.0


def _q8_table(keys):
    """The buckets of one map's threshold keys: positive q by magnitude, then negative q."""
    top = (np.arange(_Q8_SIDE, dtype=np.int64) << 16) + _Q8_FLOOR
    starts = np.concatenate([top, -1 - (top | 0xFFFF)])  # each bucket's least key
    below = np.searchsorted(keys, starts)
    inside = np.searchsorted(keys, starts + 0x10000) - below
    assert inside.max() <= 1, "8-bit state: two thresholds in one bucket"
    rank = np.where(inside == 1, keys[np.minimum(below, keys.size - 1)] - starts, 0x10000)
    return ((below << 17) | rank).astype(np.int32)


_Q8S_TABLE, _Q8U_TABLE = _q8_table(_Q8_KEYS[Q8S]), _q8_table(_Q8_KEYS[Q8U])
_Q8S_MAP, _Q8U_MAP = QMAPS[Q8S], QMAPS[Q8U]


@njit(inline="always", **_JIT)
def _q8_code(q, table):
    """q8_store's code of q (x / absmax) with a map's table."""
    bits = _bits_of(q)
    neg = np.int32(bits >> 31)  # -1 for negative q: its rank counts from the bucket's top
    a = np.int32(min(max(np.int32(bits & 0x7FFFFFFF), _Q8_FLOOR), 0x3F800000))  # NaN: 1.0
    entry = table[np.uint16(((a - _Q8_FLOOR) >> 16) + (_Q8_SIDE & neg))]
    rank = np.int32((a & 0xFFFF) ^ (neg & 0xFFFF))
    code = np.int32((entry >> 17) + (1 if rank >= (entry & 0x1FFFF) else 0))
    return np.uint8(code if q == q else 0)


@njit(inline="always", **_JIT)
def _q8_scale(x):
    """A block's absmax: the largest magnitude (over the bits, which order them, NaN above
    inf), NaN if there is one, at least SCALE_MIN."""
    top = np.int32(0)
    for i in range(x.size):
        top = max(top, np.int32(_bits_of(x[i]) & 0x7FFFFFFF))
    if top > 0x7F800000:
        return np.float32(np.nan)
    return max(_float_of(top), SCALE_MIN)


# The tables are globals, which Numba compiles in as constants: a loop gathers from them
# vectorized only where it names one (an array chosen at run time might alias its stores).

@njit(inline="always", **_JIT)
def _dequantize(codes, absmax, x, qmap):
    for b in range(absmax.size):
        c, xb, scale = codes[b * BLOCK:(b + 1) * BLOCK], x[b * BLOCK:(b + 1) * BLOCK], absmax[b]
        for i in range(c.size):
            xb[i] = qmap[c[i]] * scale


@njit(**_JIT)
def _load_q8(codes, absmax, code):
    """8-bit state (codes, and the absmax of each block) as new float32 values."""
    x = np.empty(codes.size, np.float32)
    if code == Q8S:
        _dequantize(codes, absmax, x, _Q8S_MAP)
    else:
        _dequantize(codes, absmax, x, _Q8U_MAP)
    return x


@njit(inline="always", **_JIT)
def _quantize(x, codes, absmax, table):
    for b in range(absmax.size):
        xb, c = x[b * BLOCK:(b + 1) * BLOCK], codes[b * BLOCK:(b + 1) * BLOCK]
        scale = _q8_scale(xb)
        absmax[b] = scale
        for i in range(xb.size):
            c[i] = _q8_code(xb[i] / scale, table)


@njit(**_JIT)
def _store_q8(x, codes, absmax, code):
    """Float32 values x quantized into codes and absmax (q8_store)."""
    if code == Q8S:
        _quantize(x, codes, absmax, _Q8S_TABLE)
    else:
        _quantize(x, codes, absmax, _Q8U_TABLE)


# The chunk's helpers take its addresses and codes as values read from arrays: an integer
# literal argument (an operand's index) would compile a specialization of each per value.

@njit(inline="always", **_JIT)
def _absmax(scales, lo, n):
    """The chunk's block scales in the float32 array at address `scales`."""
    return numba.carray(_as_pointer(scales + 4 * (lo // BLOCK)), ((n + BLOCK - 1) // BLOCK,),
                        np.float32)


@njit(**_JIT)
def _load(address, scales, lo, n, code):
    """The chunk of the operand at `address` (with its block scales at `scales` if 8-bit) in
    float32: its own memory (float32), else new scratch loaded from its storage."""
    if code == F32:
        return numba.carray(_as_pointer(address + 4 * lo), (n,), np.float32)
    if code == Q8S or code == Q8U:
        return _load_q8(numba.carray(_as_pointer(address + lo), (n,), np.uint8),
                        _absmax(scales, lo, n), code)
    h = numba.carray(_as_pointer(address + 2 * lo), (n,), np.uint16)
    return _load_bf16(h) if code == BF16 else _load_f16(h)


@njit(**_JIT)
def _out(address, lo, n, code):
    """Where the chunk's new parameter goes in float32: param out's memory (float32), else
    new scratch."""
    if code == F32:
        return numba.carray(_as_pointer(address + 4 * lo), (n,), np.float32)
    return np.empty(n, np.float32)


@njit(**_JIT)
def _store(x, address, scales, lo, n, code, stochastic, stream, step, keys, t):
    """Float32 values x of the chunk into the operand at `address` stored as `code`
    (float32: nothing, x is its memory), rounded with random stream `stream` of tensor t
    (8-bit: quantized, with new block scales at `scales`)."""
    if code == F32:
        return
    if code == Q8S or code == Q8U:
        _store_q8(x, numba.carray(_as_pointer(address + lo), (n,), np.uint8),
                  _absmax(scales, lo, n), code)
        return
    h = numba.carray(_as_pointer(address + 2 * lo), (n,), np.uint16)
    if not stochastic:
        if code == BF16:
            _store_bf16_rne(x, h, h)
        else:
            _store_f16_rne(x, h, h)
        return
    r = _round_bits(lo, n, stream, step, keys[t])
    if code == BF16:
        _store_bf16_sr(x, h, r)
    else:
        _store_f16_sr(x, h, r)


# Per chunk: x<op> is operand op in float32 (its memory, or scratch loaded from its storage),
# x1 the new parameter (x0 itself in place); the written low-precision operands are stored
# back from them, each with its random stream. The parameter's stores (param out, the
# shadow) come right after its loop in each branch: a loop that ends an if's branch, merged
# by an assignment after the if (x1 = x0), compiled scalar. The storage is read per chunk
# (not compiled in), so that one driver per kernel serves every combination of formats.
_FORMATTED = """
def {name}(ptrs, scales, chunks, rec, storage, streams, shadow, stochastic, step, keys):
    one = np.float32(1)
    last = ptrs.shape[1] - 1
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        {loads}
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                x0[i] = element(x0[i], x2[i], {states}i, rec[0], one)
            {stores_x0}
        else:
            x1 = _out(ptrs[t, 1], lo, n, storage[1])
            for i in range(n):
                x1[i] = element(x0[i], x2[i], {states}i, rec[0], one)
            {stores_x1}
        {stores}
"""
_STORE = ("_store(x{x}, ptrs[t, {op}], scales[t, {op}], lo, n, storage[{op}], stochastic, "
          "streams[{op}], step, keys, t)")


@functools.lru_cache(maxsize=None)
def _formatted_driver(name):
    """The parallel driver of elementwise kernel `name` with storage formats."""
    ops = range(3, 3 + len(_rules.KERNELS[name].state))

    def param(x):  # param out's store, and the shadow's
        return (_STORE.format(x=x, op=1) + "\n            if shadow:\n                "
                + _STORE.format(x=x, op="last"))
    source = _FORMATTED.format(
        name=f"_drive_formats_{name}", states="".join(f"x{op}, " for op in ops),
        loads="\n        ".join(f"x{op} = _load(ptrs[t, {op}], scales[t, {op}], lo, n, "
                                f"storage[{op}])" for op in (0, 2, *ops)),
        stores_x0=param(0), stores_x1=param(1),
        stores="\n        ".join(_STORE.format(x=op, op=op) for op in ops))
    namespace = {"__name__": __name__, "np": np, "prange": prange, "_load": _load,
                 "_out": _out, "_store": _store, "element": _ELEMENTS[name]}
    exec(compile(source, __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_drive_formats_{name}"])


def _format_pointers(operands, storage):
    """data_pointers over operands of mixed widths: (addresses [tensor, operand], sizes)."""
    ptrs = sizes = None
    for width in (4, 2, 1):
        ops = [op for op, code in enumerate(storage) if _WIDTH[code] == width]
        if not ops:
            continue
        p, s = data_pointers(tuple(operands[op] for op in ops), width)
        if ptrs is None:
            ptrs, sizes = np.empty((len(s), len(storage)), np.int64), s
        elif len(s) != len(sizes) or np.any(s != sizes):
            raise ValueError("storage formats: the operands' tensors differ in number or size")
        ptrs[:, ops] = p
    return ptrs, sizes


def _scale_pointers(scales, storage, sizes):
    """The addresses [tensor, operand] of the block scales of each 8-bit operand (0 for the
    others): `scales` holds a list of float32 arrays per 8-bit operand, in order."""
    q8 = [op for op, code in enumerate(storage) if code in (Q8S, Q8U)]
    if len(scales) != len(q8):
        raise ValueError(f"storage formats: {len(scales)} lists of block scales for {len(q8)} "
                         f"8-bit operands")
    table = np.zeros((len(sizes), len(storage)), np.int64)
    blocks = (sizes + BLOCK - 1) // BLOCK
    for op, absmax in zip(q8, scales):
        p, s = data_pointers((list(absmax),), 4)
        if len(s) != len(blocks) or np.any(s != blocks):
            raise ValueError(f"storage formats: operand {op}'s block scales are not one "
                             f"float32 per {BLOCK} elements of each tensor")
        table[:, op] = p[:, 0]
    return table


def _formatted(kernel, operands, record, n_threads, n_aux, formats):
    """elementwise() over operands (param in, param out, grad, state..., the shadow last if
    formats.shadow) stored as formats.storage says (8-bit state with its block scales in
    formats.scales), computing in float32: the same bits as fastopt._backends._formats.around
    over the float32 kernel."""
    storage, shadow = tuple(formats.storage), bool(formats.shadow)
    if n_aux or kernel not in _ELEMENTS:
        raise ValueError(f"storage formats: {kernel!r} is not an elementwise kernel of the "
                         f"rule table")
    n_ops = 3 + len(_rules.KERNELS[kernel].state) + shadow
    if len(operands) != n_ops or len(storage) != n_ops:
        raise ValueError(f"storage formats: {kernel!r} takes {n_ops} operands, got "
                         f"{len(operands)} and {len(storage)} formats")
    wide = storage[:3] + storage[n_ops - shadow:]  # the operands that are not state
    if (not set(storage) <= FORMATS or (shadow and storage[-1] == F32)
            or Q8S in wide or Q8U in wide):
        raise ValueError(f"storage formats: {storage} (float32, bfloat16 and float16; state "
                         f"also 8-bit; the shadow bfloat16 or float16)")
    if record.dtype[0] != np.float32:
        raise ValueError(f"storage formats: the scalars are {record.dtype[0]}, not float32")
    ptrs, sizes = _format_pointers(operands, storage)
    scales = _scale_pointers(formats.scales, storage, sizes)
    keys = _NO_KEYS
    if formats.stochastic:
        keys = np.ascontiguousarray(formats.keys, np.uint32)
        if keys.ndim != 2 or keys.shape[1] != 2 or keys.shape[0] < len(sizes):
            raise ValueError(f"storage formats: keys of shape {keys.shape} for {len(sizes)} "
                             f"tensors, expected (n_tensors, 2)")
    streams = np.array([formats.stream(op) for op in range(n_ops)], np.int64)
    _set_threads(n_threads, sizes)
    _formatted_driver(kernel)(ptrs, scales, _chunks(sizes), record, np.array(storage, np.int64),
                              streams, shadow, bool(formats.stochastic),
                              np.uint64(formats.step), keys)


# -- the gradient norm, fastopt/reduce.h's order

@njit(inline="always", **_JIT)
def _norm_acc(acc, term, kind):
    if kind == 0:
        return term if (term > acc or term != term) else acc  # max; NaN sticks
    return acc + term


@njit(inline="always", **_JIT)
def _norm_term(g, kind):
    x = np.float64(g)
    return x * x if kind == 2 else (x if kind == 3 else abs(x))


# Each chunk's partial in fastopt/reduce.h's fixed order: element i of a chunk goes to lane
# i % 16 (float64, in index order), lanes are added in lane order. The fixed order forbids
# the reassociation a loop vectorizer needs for a reduction; the sixteen lanes are
# independent, so LLVM's SLP vectorizer packs them into vectors, exactly, when they are
# sixteen locals (the source is generated, once per norm kind) and SLP is on while the
# kernel compiles (Numba leaves it off: numba.core.config.SLP_VECTORIZE). 10M float32 on
# one thread, AMD EPYC: 3.0 ms scalar, 1.1 ms with SLP (the C loop's speed).
_LANES = """
def _lanes_{kind}(g):
    n = g.shape[0]
    {zero}
    full = n - n % {lanes}
    for i in range(0, full, {lanes}):
        b = g[i:i + {lanes}]
        {body}
    rest = n - full
    {tail}
    s = l0
    {total}
    return s
"""


def _lanes(kind):
    """The partial of kind 0 (inf), 1, 2 or 3 (the signed sum) of a 1-D array (a chunk),
    from _LANES: a function of its own, called per chunk by the passes that sum (inlined,
    it made each of them take ~20 s to compile)."""
    lanes = range(LANES)
    acc = f"l{{j}} = _norm_acc(l{{j}}, _norm_term({{g}}[{{at}}], {kind}), {kind})"
    source = _LANES.format(
        kind=kind, lanes=LANES,
        zero="; ".join(f"l{j} = 0.0" for j in lanes),
        body="\n        ".join(acc.format(j=j, g="b", at=j) for j in lanes),
        tail="\n    ".join(f"if rest > {j}:\n        "
                             + acc.format(j=j, g="g", at=f"full + {j}") for j in lanes),
        total="\n    ".join(f"s = _norm_acc(s, l{j}, {kind})" for j in lanes[1:]))
    namespace = {"__name__": __name__, "_norm_acc": _norm_acc, "_norm_term": _norm_term}
    exec(compile(source, __file__, "exec"), namespace)
    return njit(**_JIT)(namespace[f"_lanes_{kind}"])


_LANE_SUMS = {kind: _lanes(kind) for kind in (0, 1, 2, 3)}


_NORM = """
def _norm_partials_{kind}(ptrs, chunks, like):
    out = np.empty(chunks.shape[0], np.float64)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        out[c] = lanes(_view(ptrs, t, 0, lo, n, like))
    return out
"""


def _norm_kernel(kind):
    """The norm pass of kind `kind`: each chunk's partial (_lanes), from _NORM."""
    namespace = {"__name__": __name__, "np": np, "prange": prange, "_view": _view,
                 "lanes": _LANE_SUMS[kind]}
    exec(compile(_NORM.format(kind=kind), __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_norm_partials_{kind}"])


_NORM_KERNELS = {kind: _norm_kernel(kind) for kind in (0, 1, 2, 3)}


@contextlib.contextmanager
def _slp_vectorized():
    """LLVM's SLP vectorizer on for the Numba compilations inside (it never reorders
    floating-point operations, so results are the same bits with or without it)."""
    config = numba.core.config
    before, config.SLP_VECTORIZE = config.SLP_VECTORIZE, 1
    try:
        yield
    finally:
        config.SLP_VECTORIZE = before


def norm_partials(grads, kind, *, n_threads):
    dtype, ptrs, chunks = _setup((grads,), n_threads)
    with _slp_vectorized():  # for the call that compiles it
        return _NORM_KERNELS[kind](ptrs, chunks, np.empty(0, dtype))


_SUMS_DRIVER = """
def {name}(ptrs, chunks, rec, like, out, discard):
    one = _one(like)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ptrs, t, 0, lo, n, like), _view(ptrs, t, 2, lo, n, like)
        {views}
        if discard:
            w = np.empty(n, like.dtype)
            for i in range(n):
                w[i] = element(p[i], g[i], {states}i, rec[0], one)
        elif ptrs[t, 0] == ptrs[t, 1]:
            w = p
            for i in range(n):
                p[i] = element(p[i], g[i], {states}i, rec[0], one)
        else:
            w = _view(ptrs, t, 1, lo, n, like)
            for i in range(n):
                w[i] = element(p[i], g[i], {states}i, rec[0], one)
        {sums}
"""


@functools.lru_cache(maxsize=None)
def _sums_driver(name, sums):
    """The parallel driver of elementwise kernel `name` (not a cautious step) that also
    sums operands as each chunk leaves it: `sums`, (operand, kind) pairs, into out[c, j]
    (_lanes); with `discard`, operand 1 goes to a scratch chunk."""
    n = len(_rules.ALL_KERNELS[name].state)
    operand = ["p", "w", "g"] + [f"s{k}" for k in range(1, n + 1)]
    namespace = {"__name__": __name__, "np": np, "prange": prange, "_view": _view,
                 "_one": _one, "element": _ELEMENTS[name],
                 **{f"lanes_{kind}": _LANE_SUMS[kind] for _, kind in sums}}
    tag = "_".join(f"{op}{kind}" for op, kind in sums)
    source = _SUMS_DRIVER.format(
        name=f"_sum_{name}_{tag}",
        views="; ".join(f"s{k} = _view(ptrs, t, {k + 2}, lo, n, like)" for k in range(1, n + 1)),
        states="".join(f"s{k}, " for k in range(1, n + 1)),
        sums="\n        ".join(f"out[c, {j}] = lanes_{kind}({operand[op]})"
                                for j, (op, kind) in enumerate(sums)))
    exec(compile(source, __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_sum_{name}_{tag}"])


def pass_sums(kernel, operands, record, n_threads, sums, masks=None, n_aux=0, discard=False):
    """elementwise()'s pass that also sums operands as each chunk leaves it, in the pass
    (see fastopt._backends._contracts.Compiled)."""
    if masks is not None:
        raise ValueError("pass_sums: pruning masks are zeroed after the pass on this backend")
    sums = tuple((int(op), int(kind)) for op, kind in sums)
    dtype, ptrs, chunks = _setup(operands, n_threads, n_aux)
    out = np.empty((chunks.shape[0], len(sums)), np.float64)
    with _slp_vectorized():  # for the call that compiles it (the lanes, as norm_partials')
        if kernel in _PASSES:  # this backend's own passes (which store operand 1 all the same)
            _PASSES[kernel](ptrs, chunks, record, np.empty(0, dtype),
                            np.array(sums, np.int64).reshape(-1, 2), out)
        else:
            _sums_driver(kernel, sums)(ptrs, chunks, record, np.empty(0, dtype), out, discard)
    return out


# -- the passes of the multi-pass rules (fastopt._backends._twopass). Each takes `sums`, the
# (operand, kind) pairs to sum as each chunk leaves it, into out[chunk, pair]

_lanes_0, _lanes_1, _lanes_2, _lanes_3 = (_LANE_SUMS[kind] for kind in range(4))


@njit(**_JIT)
def _chunk_sums(ptrs, t, lo, n, like, sums, out, c):
    """Chunk c's partials (norm_partials' order) of the operands of `sums`, into out[c]."""
    for j in range(sums.shape[0]):
        x = _view(ptrs, t, sums[j, 0], lo, n, like)
        kind = sums[j, 1]
        out[c, j] = (_lanes_0(x) if kind == 0 else _lanes_1(x) if kind == 1
                     else _lanes_2(x) if kind == 2 else _lanes_3(x))


@njit(parallel=True, **_JIT)
def _scaled_apply(ptrs, chunks, rec, like, sums, out):
    """Operands: p, p_out, u, and the tensor's factor k (one element): p decay + scale (u k)."""
    decay, scale = rec[0].decay, rec[0].scale
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, u = _view(ptrs, t, 0, lo, n, like), _view(ptrs, t, 2, lo, n, like)
        k = _view(ptrs, t, 3, 0, 1, like)[0]
        if ptrs[t, 0] == ptrs[t, 1]:
            for i in range(n):
                p[i] = p[i] * decay + scale * (u[i] * k)
        else:
            new = _view(ptrs, t, 1, lo, n, like)
            for i in range(n):
                new[i] = p[i] * decay + scale * (u[i] * k)
        _chunk_sums(ptrs, t, lo, n, like, sums, out, c)


# Adafactor's passes: scalars fo_adafactor_args (clip, gscale, w, eps1, eps1_sq, lerp_hi)

_Prologue = collections.namedtuple("_Prologue", ("clip", "gscale"))  # what _grad reads

@njit(inline="always", **_JIT)
def _adafactor_sq(g, a):
    x = np.float64(_grad(g, a))
    return x * x


@njit(parallel=True, **_JIT)
def _adafactor_factors(ptrs, shape, bands, blocks, slices, rec, like):
    """The factors pass (kernels/cpu/factored_loops.h): per (tensor, slice, band, run of
    column blocks), each row's partial per block and the band's column partials (the
    column factors, if the slice has one band); per (tensor, slice, column block) of a
    slice of several bands, the bands' partials in order and the column factors; then per
    slice, the row sums, row factors and clamped row mean. ptrs[t]: g, row, col, rmean,
    rowpart, colpart."""
    r0 = rec[0]
    a = _Prologue(r0.clip, r0.gscale)  # a record cannot enter a prange loop; a tuple can
    w, eps1, lerp_hi = r0.w, r0.eps1, r0.lerp_hi
    one = _one(like)
    f64 = np.empty(0, np.float64)
    for it in prange(bands.shape[0]):
        t, b, band, k0, k1 = bands[it, 0], bands[it, 1], bands[it, 2], bands[it, 3], bands[it, 4]
        R, C = shape[t, 1], shape[t, 2]
        n_blocks, n_bands = (C + COLS - 1) // COLS, (R + BAND - 1) // BAND
        lo, hi = k0 * COLS, min(C, k1 * COLS)
        g = _view(ptrs, t, 0, b * R * C, R * C, like)
        part = _view(ptrs, t, 4, b * R * n_blocks, R * n_blocks, f64)
        acc = np.zeros(hi - lo, np.float64)
        lane = np.empty(LANES, np.float64)
        x = np.empty(COLS, np.float64)
        for r in range(band * BAND, min(R, band * BAND + BAND)):
            for k in range(k0, k1):
                c0 = k * COLS
                width = min(COLS, C - c0)
                full = width - width % LANES
                gs, xs = g[r * C + c0:r * C + c0 + width], x[:width]
                accs = acc[c0 - lo:c0 - lo + width]
                # as the C loop: the terms, the column partials, then the lanes
                for j in range(width):
                    xs[j] = _adafactor_sq(gs[j], a)
                for j in range(width):
                    accs[j] += xs[j]
                lane[:] = 0.0
                for j in range(0, full, LANES):
                    for m in range(LANES):
                        lane[m] += xs[j + m]
                for m in range(width - full):
                    lane[m] += xs[full + m]
                s = lane[0]
                for m in range(1, LANES):
                    s += lane[m]
                part[r * n_blocks + k] = s
        if n_bands == 1:  # its partials are the column sums
            col = _view(ptrs, t, 2, b * C + lo, hi - lo, like)
            mean = np.empty(hi - lo, like.dtype)  # float64 -> dtype, rounded as a C cast
            for j in range(hi - lo):
                mean[j] = acc[j] / R
                col[j] = _lerp(col[j], mean[j], w, lerp_hi, one)
        else:  # a loop: Numba's parfor pass dropped `_view(...)[:] = acc` here (0.68)
            colpart = _view(ptrs, t, 5, (b * n_bands + band) * C + lo, hi - lo, f64)
            for j in range(hi - lo):
                colpart[j] = acc[j]
    for it in prange(blocks.shape[0]):
        t, b, k = blocks[it, 0], blocks[it, 1], blocks[it, 2]
        R, C = shape[t, 1], shape[t, 2]
        n_bands = (R + BAND - 1) // BAND
        c0 = k * COLS
        width = min(COLS, C - c0)
        col = _view(ptrs, t, 2, b * C + c0, width, like)
        colpart = _view(ptrs, t, 5, b * n_bands * C, n_bands * C, f64)
        acc = colpart[c0:c0 + width].copy()
        for band in range(1, n_bands):
            for j in range(width):
                acc[j] += colpart[band * C + c0 + j]
        mean = np.empty(width, like.dtype)
        for j in range(width):
            mean[j] = acc[j] / R
            col[j] = _lerp(col[j], mean[j], w, lerp_hi, one)
    for it in prange(slices.shape[0]):
        t, b = slices[it, 0], slices[it, 1]
        R, C = shape[t, 1], shape[t, 2]
        n_blocks = (C + COLS - 1) // COLS
        row = _view(ptrs, t, 1, b * R, R, like)
        part = _view(ptrs, t, 4, b * R * n_blocks, R * n_blocks, f64)
        cast = np.empty(1, like.dtype)
        total = 0.0
        for r in range(R):
            s = part[r * n_blocks]
            for k in range(1, n_blocks):
                s += part[r * n_blocks + k]
            cast[0] = s / C
            v = _lerp(row[r], cast[0], w, lerp_hi, one)
            row[r] = v
            total += np.float64(v)
        cast[0] = total / R
        _view(ptrs, t, 3, b, 1, like)[0] = _maximum(cast[0], eps1)


@njit(parallel=True, **_JIT)
def _adafactor_factored(ptrs, chunks, rec, like, sums, out):
    """Operands: p (unread), u (written), g, then per tensor: row factors, column factors,
    clamped row means, shape (R, C). Walks each chunk row segment by row segment."""
    r0 = rec[0]
    a = _Prologue(r0.clip, r0.gscale)
    eps1_sq = r0.eps1_sq
    one = _one(like)
    ilike = np.empty(0, np.int64)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        u, g = _view(ptrs, t, 1, lo, n, like), _view(ptrs, t, 2, lo, n, like)
        shape = _view(ptrs, t, 6, 0, 2, ilike)
        R, C = shape[0], shape[1]
        v = np.empty(min(n, C), like.dtype)  # scratch of a row segment, reused
        i = 0
        while i < n:
            r, c0 = (lo + i) // C, (lo + i) % C
            length = min(C - c0, n - i)
            rv = _view(ptrs, t, 3, r, 1, like)[0]
            rm = _view(ptrs, t, 5, r // R, 1, like)[0]
            cv = _view(ptrs, t, 4, (r // R) * C + c0, length, like)
            # two loops over slices: as one loop over the chunk's views, it ran 2.4-3x
            # slower (7.9 vs 2.6-3.3 ms on 10M float32, 2 threads, AMD EPYC)
            us, gs, vs = u[i:i + length], g[i:i + length], v[:length]
            for j in range(length):
                vs[j] = _maximum(rv * cv[j] / rm, eps1_sq)
            for j in range(length):
                us[j] = one / np.sqrt(vs[j]) * _grad(gs[j], a)
            i += length
        _chunk_sums(ptrs, t, lo, n, like, sums, out, c)


@njit(parallel=True, **_JIT)
def _adafactor_vector(ptrs, chunks, rec, like, sums, out):
    """Operands: p (unread), u (written), g, variance."""
    r0 = rec[0]
    a = _Prologue(r0.clip, r0.gscale)
    w, eps1_sq, lerp_hi = r0.w, r0.eps1_sq, r0.lerp_hi
    one = _one(like)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        u, g = _view(ptrs, t, 1, lo, n, like), _view(ptrs, t, 2, lo, n, like)
        var = _view(ptrs, t, 3, lo, n, like)
        for i in range(n):
            d = _grad(g[i], a)
            v = _lerp(var[i], d * d, w, lerp_hi, one)
            var[i] = v
            u[i] = one / np.sqrt(_maximum(v, eps1_sq)) * d
        _chunk_sums(ptrs, t, lo, n, like, sums, out, c)


_PASSES = {"scaled_apply": _scaled_apply, "adafactor_vector": _adafactor_vector,
           "adafactor_factored": _adafactor_factored}
_NO_SUMS = np.empty((0, 2), np.int64)
# the kernels this backend runs: every element function and the passes
KERNELS = {**{name: len(_rules.ALL_KERNELS[name].state) for name in _ELEMENTS},
           **{k.name: len(k.state) for k in _rules.PASS_KERNELS}}


def factors(grads, rows, cols, rmeans, shape, bands, blocks, slices, record, n_threads):
    dtype = grads[0].dtype
    n_blocks, n_bands = -(-shape[:, 2] // COLS), -(-shape[:, 1] // BAND)
    rowparts = [np.empty(b * r * k) for (b, r, _), k in zip(shape, n_blocks)]
    colparts = [np.empty(b * k * c) for (b, _, c), k in zip(shape, n_bands)]
    ptrs, sizes = data_pointers((grads, rows, cols, rmeans, rowparts, colparts),
                                dtype.itemsize, 5)
    _set_threads(n_threads, sizes)
    _adafactor_factors(ptrs, shape, bands, blocks, slices, record, np.empty(0, dtype))


def device(arrays, like):
    return arrays
