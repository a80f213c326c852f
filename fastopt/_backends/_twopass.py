"""Rules with per-tensor reductions between their passes (Lamb, Adafactor, Muon), written once for
the compiled backends (Cython, Numba, CuPy); each backend supplies the passes.

A backend here is a Compiled module (fastopt._backends._contracts): each pass runs through
fastopt._backends._steps.run_pass, Adafactor's factors pass through its ``factors`` over the
work of ``factor_work(shape)``. The per-tensor scalars (norms, trust ratios, step factors)
are computed on the host from the norm partials, in the order fastopt._scalars fixes, so
every backend gets the same; a pass whose operands are then summed (``pass_sums``) sums
them chunk by chunk while in cache where the backend can, else in passes of their own.
"""

import numpy as np

from fastopt import _rules, _scalars
from fastopt._backends import _orthogonalize, _steps
from fastopt._backends._contracts import Compiled
from fastopt._backends._layout import BAND, CHUNK, COLS, SEGMENT


def pass_sums(backend: Compiled, kernel, operands, scalars, n_threads, masks, sums, n_aux=0,
              discard=False):
    """A pass of `kernel` (_steps.run_pass), then for each (operand, kind) of `sums` the
    per-tensor sums (norm_partials' order, then fastopt._scalars.tensor_sums) of that
    operand as the pass leaves it: summed inside the pass, each chunk while it is in cache,
    where the backend can (its pass_sums; with masks, where it zeroes pruned entries in the
    pass), else by a reduction pass each. With `discard`, a backend that sums in the pass
    does not store operand 1, whose sum is its one use."""
    if hasattr(backend, "pass_sums") and (masks is None or backend.MASKS_IN_KERNELS):
        record = _rules.ALL_KERNELS[kernel].args.record(operands[0][0].dtype, scalars)
        partials = backend.pass_sums(kernel, operands, record, n_threads, sums, masks=masks,
                                     n_aux=n_aux, discard=discard)
        partials = [partials[:, j] for j in range(len(sums))]
    else:
        _steps.run_pass(backend, kernel, operands, scalars, n_threads, masks, n_aux)
        partials = [backend.norm_partials(operands[op], kind, n_threads=n_threads)
                    for op, kind in sums]
    sizes = [p.size for p in operands[0]]
    return [_scalars.tensor_sums(part, sizes, CHUNK) for part in partials]


def _roots(squares):
    """The 2-norms of each list of per-tensor sums of squares."""
    return [[total ** 0.5 for total in sums] for sums in squares]


def _apply(backend, params, out, updates, factors, scalars, n_threads, masks):
    """p <- p decay + scale (u k) with k one value per tensor (fo_scaled_apply)."""
    factors = backend.device([factors[t:t + 1] for t in range(len(params))], params[0])
    _steps.run_pass(backend, "scaled_apply", (params, out, updates, factors), scalars,
                    n_threads, masks, n_aux=1)


def lamb_step(backend: Compiled, params, out, grads, exp_avgs, exp_avg_sqs, updates, *, n_threads,
              masks=None, **hyper):
    update, apply = _scalars.lamb_scalars(params[0].dtype, **hyper)
    # ||p|| and ||u|| summed in the update pass (p is not written before the apply pass)
    squares = pass_sums(backend, "lamb_update", (params, updates, grads, exp_avgs, exp_avg_sqs),
                        update, n_threads, masks, ((0, 2), (1, 2)))
    ratios = _scalars.lamb_trust_ratios(*_roots(squares), params[0].dtype)
    _apply(backend, params, out, updates, ratios, apply, n_threads, masks)


def muon_step(backend: Compiled, params, out, grads, bufs, updates, *, n_threads, lr,
              weight_decay, ns_coefficients, ns_steps, eps, adjust_lr_fn, ns_dtype,
              masks=None, **hyper):
    dtype = params[0].dtype
    update, apply = _scalars.muon_scalars(dtype, lr=lr, weight_decay=weight_decay,
                                          adjust_lr_fn=adjust_lr_fn, **hyper)
    _steps.run_pass(backend, "muon_momentum", (params, updates, grads, bufs), update,
                    n_threads, masks)
    orthogonal = _orthogonalize.orthogonalized(
        updates, lambda arrays: backend.norm_partials(arrays, 2, n_threads=n_threads),
        ns_coefficients, ns_steps, eps, ns_dtype)
    factors = np.array([-lr * _scalars.muon_lr_ratio(p.shape, adjust_lr_fn) for p in params],
                       dtype)
    _apply(backend, params, out, orthogonal, factors, apply, n_threads, masks)


def prodigy_step(backend: Compiled, params, out, grads, s, p0, m, v, terms, *, phase,
                 n_threads, masks=None, **hyper):
    """One of Prodigy's passes: phase "update" writes the dot product's terms to `terms`
    and returns the per-tensor sums (of g . (p0 - p), of |s|); "apply" updates the
    parameters with the new estimate, d_next."""
    update, apply = _scalars.prodigy_scalars(params[0].dtype, **hyper)
    nom = "" if m is not None else "_nom"
    moments = (m, v) if m is not None else (v,)
    if phase == "update":
        # the terms are summed where they are written, and then not kept where they can be
        return tuple(pass_sums(backend, "prodigy_update" + nom,
                               (params, terms, grads, s, p0) + moments, update, n_threads,
                               masks, ((1, 3), (3, 1)), discard=True))
    _steps.run_pass(backend, "prodigy_apply" + nom, (params, out, grads) + moments, apply,
                    n_threads, masks)
    return None


def expand(parents, counts):
    """Work items, int64: each row of `parents` followed by each index < its count."""
    parent = np.repeat(np.arange(len(counts)), counts)
    index = np.arange(len(parent)) - (np.cumsum(counts) - counts)[parent]
    return np.column_stack([parents[parent], index]).astype(np.int64)


def factor_work(shape, segment=SEGMENT):
    """The factors pass's work for tensors of `shape` rows (B slices, R rows, C columns),
    int64: bands (tensor, slice, band of BAND rows, first and end column block: runs of
    `segment` <= SEGMENT blocks of COLS, each row's run read contiguously; the split does
    not change the bits), then blocks (tensor, slice, column block) of the slices of more
    than one band, and slices (tensor, slice)."""
    n_bands, n_blocks = -(-shape[:, 1] // BAND), -(-shape[:, 2] // COLS)
    slices = expand(np.arange(len(shape))[:, None], shape[:, 0])
    t = slices[:, 0]
    blocks = expand(slices, np.where(shape[t, 1] > BAND, n_blocks[t], 0))
    bands = expand(slices, n_bands[t])
    runs = expand(bands, -(-n_blocks[bands[:, 0]] // segment))
    first = runs[:, 3] * segment
    end = np.minimum(first + segment, n_blocks[runs[:, 0]])
    return np.column_stack([runs[:, :3], first, end]).astype(np.int64), blocks, slices


def adafactor_step(backend: Compiled, params, out, grads, row_vars, col_vars, variances,
                   updates, *, n_threads, step, lr, eps2, d, masks=None, **hyper):
    dtype = params[0].dtype
    update, apply = _scalars.adafactor_scalars(dtype, step=step, lr=lr, **hyper)
    factored = [i for i, p in enumerate(params) if p.ndim > 1 and p.size]
    vectors = [i for i, p in enumerate(params) if p.ndim <= 1 and p.size]
    # per tensor, the sums of p^2 and of u^2, taken in the update passes (||p|| before
    # weight decay, as torch: decay happens in the apply pass)
    squares = [[0.0] * len(params), [0.0] * len(params)]

    def update_pass(kernel, picked, operands, n_aux=0):
        sums = pass_sums(backend, kernel, operands, update, n_threads,
                         None if masks is None else [masks[i] for i in picked],
                         ((0, 2), (1, 2)), n_aux=n_aux)
        for total, tensor_sums in zip(squares, sums):
            for i, value in zip(picked, tensor_sums):
                total[i] = value

    if factored:
        def pick(arrays):
            return [arrays[i] for i in factored]
        rows = [row_vars[i].reshape(-1) for i in factored]
        cols = [col_vars[i].reshape(-1) for i in factored]
        shape = np.array([(params[i].size // (params[i].shape[-2] * params[i].shape[-1]),)
                          + params[i].shape[-2:] for i in factored], np.int64)
        like = params[factored[0]]
        rmeans = backend.device([np.empty(b, dtype) for b in shape[:, 0]], like)
        backend.factors(pick(grads), rows, cols, rmeans, shape, *factor_work(shape),
                        _rules.ADAFACTOR_ARGS.record(dtype, update), n_threads)
        update_pass("adafactor_factored", factored,
                    (pick(params), pick(updates), pick(grads), rows, cols, rmeans,
                     backend.device([row[1:] for row in shape], like)), n_aux=4)
    if vectors:
        def pick(arrays):
            return [arrays[i] for i in vectors]
        update_pass("adafactor_vector", vectors,
                    (pick(params), pick(updates), pick(grads), pick(variances)))
    coefficients = _scalars.adafactor_coefficients(
        *_roots(squares), [p.size for p in params], dtype, step=step, lr=lr, eps2=eps2, d=d)
    _apply(backend, params, out, updates, coefficients, apply, n_threads, masks)
