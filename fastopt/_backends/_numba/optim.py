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
from fastopt._backends._layout import CHUNK, COLS, LANES, MIN_PER_THREAD
from fastopt._cpu._runtime import data_pointers

MASKS_IN_KERNELS = False  # pruned entries are zeroed after each pass (fastopt._backends._steps)
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


def _setup(operands, n_threads, n_aux=0):
    dtype = operands[0][0].dtype
    ptrs, sizes = data_pointers(operands, dtype.itemsize, n_aux)
    n_threads = min(n_threads, numba.config.NUMBA_NUM_THREADS, int(sizes.sum()) // MIN_PER_THREAD)
    numba.set_num_threads(max(1, n_threads))
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
    """The parallel driver of elementwise kernel `name` (see the module docstring)."""
    kernel = _rules.KERNELS[name]
    n = len(kernel.state)
    namespace = {"__name__": __name__, "prange": prange, "_view": _view, "_one": _one,
                 "element": _ELEMENTS[name]}
    source = _DRIVER.format(
        name=f"_drive_{name}",
        views="; ".join(f"s{k} = _view(ptrs, t, {k + 2}, lo, n, like)" for k in range(1, n + 1)),
        states="".join(f"s{k}, " for k in range(1, n + 1)))
    exec(compile(source, __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_drive_{name}"])


def elementwise(kernel, operands, record, n_threads, masks=None, n_aux=0):
    """Run kernel `kernel` (a name of the rule table) over `operands` (param in, param out,
    grad, state..., the last `n_aux` per-tensor auxiliaries) with scalars `record`."""
    dtype, ptrs, chunks = _setup(operands, n_threads, n_aux)
    fn = _PASSES.get(kernel) or _driver(kernel)
    fn(ptrs, chunks, record, np.empty(0, dtype))


@njit(inline="always", **_JIT)
def _grad(g, a):
    """The gradient prologue: clamp to [-clip, clip] (NaN passes), then the signed scale."""
    g = -a.clip if g < -a.clip else (a.clip if g > a.clip else g)
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


@element("adagrad")
def _adagrad(p, g, s1, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    s = s1[i] + d * d
    s1[i] = s
    return p + a.neg_clr * d / (np.sqrt(s) + a.eps)


@njit(inline="always", **_JIT)
def _rmsprop_any(p, g, sq, gavg, buf, i, a, one, centered, use_momentum):
    d = _l2(_grad(g, a), p, a.weight_decay)
    s = sq[i] * a.alpha + a.one_minus_alpha * d * d
    sq[i] = s
    if centered:
        m = _lerp(gavg[i], d, a.one_minus_alpha, a.lerp_hi, one)
        gavg[i] = m
        r = np.sqrt(s - m * m)
    else:
        r = np.sqrt(s)
    r = r + a.eps
    if use_momentum:
        b = buf[i] * a.momentum + d / r
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


@element("adopt")
def _adopt(p, g, m, v, i, a, one):
    d = _l2(_grad(g, a), p, a.weight_decay)
    if a.first != 0:
        v[i] = v[i] + d * d
        return p
    if a.decoupled != 0:
        p = p + a.neg_lr_wd * p
    n = d / _maximum(np.sqrt(v[i]), a.eps)
    n = -a.clamp if n < -a.clamp else (a.clamp if n > a.clamp else n)
    mm = _lerp(m[i], n, a.one_minus_beta1, a.lerp_hi, one)
    m[i] = mm
    v[i] = v[i] * a.beta2 + a.one_minus_beta2 * d * d
    return p + a.neg_lr * mm


@element("lion")
def _lion(p, g, m, i, a, one):
    d = _grad(g, a)
    c = a.one_minus_beta1 * d + a.beta1 * m[i]
    u = one if c > 0 else (-one if c < 0 else c)
    m[i] = a.one_minus_beta2 * d + a.beta2 * m[i]
    return p + a.neg_lr * (u + a.weight_decay * p)


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


# -- the gradient norm, fastopt/reduce.h's order

@njit(inline="always", **_JIT)
def _norm_acc(acc, term, kind):
    if kind == 0:
        return term if (term > acc or term != term) else acc  # max; NaN sticks
    return acc + term


@njit(inline="always", **_JIT)
def _norm_term(g, kind):
    x = np.float64(g)
    return x * x if kind == 2 else abs(x)


# Each chunk's partial in fastopt/reduce.h's fixed order: element i of a chunk goes to lane
# i % 16 (float64, in index order), lanes are added in lane order. The fixed order forbids
# the reassociation a loop vectorizer needs for a reduction; the sixteen lanes are
# independent, so LLVM's SLP vectorizer packs them into vectors, exactly, when they are
# sixteen locals (the source is generated, once per norm kind) and SLP is on while the
# kernel compiles (Numba leaves it off: numba.core.config.SLP_VECTORIZE). 10M float32 on
# one thread, AMD EPYC: 3.0 ms scalar, 1.1 ms with SLP (the C loop's speed).
_NORM = """
def _norm_partials_{kind}(ptrs, chunks, like):
    out = np.empty(chunks.shape[0], np.float64)
    for c in prange(chunks.shape[0]):
        t, lo, n = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        g = _view(ptrs, t, 0, lo, n, like)
        {zero}
        full = n - n % {lanes}
        for i in range(0, full, {lanes}):
            b = g[i:i + {lanes}]
            {body}
        rest = n - full
        {tail}
        s = l0
        {total}
        out[c] = s
    return out
"""


def _norm_kernel(kind):
    """The norm pass of kind 0 (inf), 1 or 2, from _NORM."""
    lanes = range(LANES)
    acc = f"l{{j}} = _norm_acc(l{{j}}, _norm_term({{g}}[{{at}}], {kind}), {kind})"
    source = _NORM.format(
        kind=kind, lanes=LANES,
        zero="; ".join(f"l{j} = 0.0" for j in lanes),
        body="\n            ".join(acc.format(j=j, g="b", at=j) for j in lanes),
        tail="\n        ".join(f"if rest > {j}:\n            "
                               + acc.format(j=j, g="g", at=f"full + {j}") for j in lanes),
        total="\n        ".join(f"s = _norm_acc(s, l{j}, {kind})" for j in lanes[1:]))
    namespace = {"__name__": __name__, "np": np, "prange": prange, "_view": _view,
                 "_norm_acc": _norm_acc, "_norm_term": _norm_term}
    exec(compile(source, __file__, "exec"), namespace)
    return njit(parallel=True, **_JIT)(namespace[f"_norm_partials_{kind}"])


_NORM_KERNELS = {kind: _norm_kernel(kind) for kind in (0, 1, 2)}


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


# -- the passes of the multi-pass rules (fastopt._backends._twopass)

@njit(parallel=True, **_JIT)
def _scaled_apply(ptrs, chunks, rec, like):
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
            out = _view(ptrs, t, 1, lo, n, like)
            for i in range(n):
                out[i] = p[i] * decay + scale * (u[i] * k)


# Adafactor's passes: scalars fo_adafactor_args (clip, gscale, w, eps1, eps1_sq, lerp_hi)

_Prologue = collections.namedtuple("_Prologue", ("clip", "gscale"))  # what _grad reads

@njit(inline="always", **_JIT)
def _adafactor_sq(g, a):
    x = np.float64(_grad(g, a))
    return x * x


@njit(parallel=True, **_JIT)
def _adafactor_factors(ptrs, shape, items, slices, rec, like):
    """The factors pass (kernels/cpu/factored_loops.h): per (tensor, slice, column block),
    the block's column sums over all rows and each row's partial; then per slice, the row
    sums, row factors and clamped row mean. ptrs[t]: g, row, col, rmean, rowpart."""
    r0 = rec[0]
    a = _Prologue(r0.clip, r0.gscale)  # a record cannot enter a prange loop; a tuple can
    w, eps1, lerp_hi = r0.w, r0.eps1, r0.lerp_hi
    one = _one(like)
    f64 = np.empty(0, np.float64)
    for it in prange(items.shape[0]):
        t, b, k = items[it, 0], items[it, 1], items[it, 2]
        R, C = shape[t, 1], shape[t, 2]
        n_blocks = (C + COLS - 1) // COLS
        c0 = k * COLS
        width = min(COLS, C - c0)
        full = width - width % LANES
        g = _view(ptrs, t, 0, b * R * C, R * C, like)
        col = _view(ptrs, t, 2, b * C + c0, width, like)
        part = _view(ptrs, t, 4, b * R * n_blocks, R * n_blocks, f64)
        acc = np.zeros(width, np.float64)
        lane = np.empty(LANES, np.float64)
        for r in range(R):
            lane[:] = 0.0
            at = r * C + c0
            for j in range(0, full, LANES):
                for m in range(LANES):
                    x = _adafactor_sq(g[at + j + m], a)
                    lane[m] += x
                    acc[j + m] += x
            for m in range(width - full):
                x = _adafactor_sq(g[at + full + m], a)
                lane[m] += x
                acc[full + m] += x
            s = lane[0]
            for m in range(1, LANES):
                s += lane[m]
            part[r * n_blocks + k] = s
        mean = np.empty(width, like.dtype)  # float64 -> dtype, rounded as a C cast
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
def _adafactor_factored(ptrs, chunks, rec, like):
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
        i = 0
        while i < n:
            r, c0 = (lo + i) // C, (lo + i) % C
            length = min(C - c0, n - i)
            rv = _view(ptrs, t, 3, r, 1, like)[0]
            rm = _view(ptrs, t, 5, r // R, 1, like)[0]
            cv = _view(ptrs, t, 4, (r // R) * C + c0, length, like)
            for j in range(length):
                v = _maximum(rv * cv[j] / rm, eps1_sq)
                u[i + j] = one / np.sqrt(v) * _grad(g[i + j], a)
            i += length


@njit(parallel=True, **_JIT)
def _adafactor_vector(ptrs, chunks, rec, like):
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


_PASSES = {"scaled_apply": _scaled_apply, "adafactor_vector": _adafactor_vector,
           "adafactor_factored": _adafactor_factored}
# the kernels this backend runs: every element function and the passes
KERNELS = {**{name: len(_rules.KERNELS[name].state) for name in _ELEMENTS},
           **{k.name: len(k.state) for k in _rules.PASS_KERNELS}}


def factors(grads, rows, cols, rmeans, rowparts, shape, items, slices, record, n_threads):
    dtype = grads[0].dtype
    ptrs, sizes = data_pointers((grads, rows, cols, rmeans, rowparts), dtype.itemsize, 4)
    numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS,
                                     int(sizes.sum()) // MIN_PER_THREAD)))
    _adafactor_factors(ptrs, shape, items, slices, record, np.empty(0, dtype))


def device(arrays, like):
    return arrays
