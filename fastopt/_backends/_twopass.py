"""Rules with per-tensor reductions between their passes (Lamb, Adafactor, Muon), written once for
the compiled backends (Cython, Numba, CuPy); each backend supplies the passes.

A backend here is a Compiled module (fastopt._backends._contracts): each pass runs through
fastopt._backends._steps.run_pass, Adafactor's factors pass through its ``factors`` over the
work of ``factor_work(shape)``. The per-tensor scalars (norms, trust ratios, step factors)
are computed on the host from the norm partials, in the order fastopt._scalars fixes, so
every backend gets the same.
"""

import numpy as np

from fastopt import _rules, _scalars
from fastopt._backends import _orthogonalize, _steps
from fastopt._backends._contracts import Compiled
from fastopt._backends._layout import CHUNK, COLS


def _norms(backend: Compiled, params, updates, n_threads):
    """Per-tensor 2-norms of the parameters and of the updates, in one reduction call (the
    parameters are not written before the apply pass)."""
    arrays = params + updates
    norms = _scalars.tensor_norms(backend.norm_partials(arrays, 2, n_threads=n_threads),
                                  [a.size for a in arrays], CHUNK)
    return norms[:len(params)], norms[len(params):]


def _apply(backend, params, out, updates, factors, scalars, n_threads, masks):
    """p <- p decay + scale (u k) with k one value per tensor (fo_scaled_apply)."""
    factors = backend.device([factors[t:t + 1] for t in range(len(params))], params[0])
    _steps.run_pass(backend, "scaled_apply", (params, out, updates, factors), scalars,
                    n_threads, masks, n_aux=1)


def lamb_step(backend: Compiled, params, out, grads, exp_avgs, exp_avg_sqs, updates, *, n_threads,
              masks=None, **hyper):
    update, apply = _scalars.lamb_scalars(params[0].dtype, **hyper)
    _steps.run_pass(backend, "lamb_update", (params, updates, grads, exp_avgs, exp_avg_sqs),
                    update, n_threads, masks)
    ratios = _scalars.lamb_trust_ratios(*_norms(backend, params, updates, n_threads),
                                        params[0].dtype)
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
        _steps.run_pass(backend, "prodigy_update" + nom, (params, terms, grads, s, p0) + moments,
                        update, n_threads, masks)
        sizes = [p.size for p in params]
        return (_scalars.tensor_sums(backend.norm_partials(terms, 3, n_threads=n_threads),
                                     sizes, CHUNK),
                _scalars.tensor_sums(backend.norm_partials(s, 1, n_threads=n_threads),
                                     sizes, CHUNK))
    _steps.run_pass(backend, "prodigy_apply" + nom, (params, out, grads) + moments, apply,
                    n_threads, masks)
    return None


def factor_work(shape):
    """The factors pass's work for tensors of `shape` rows (B slices, R rows, C columns):
    items (tensor, slice, column block of COLS) and slices (tensor, slice), int64."""
    slices_per = shape[:, 0]
    blocks_per = -(-shape[:, 2] // COLS)
    tensor = np.repeat(np.arange(len(shape)), slices_per)
    first = np.cumsum(slices_per) - slices_per
    slices = np.stack([tensor, np.arange(len(tensor)) - first[tensor]], axis=1)
    blocks = blocks_per[tensor]
    item_slice = np.repeat(np.arange(len(tensor)), blocks)
    block = np.arange(len(item_slice)) - (np.cumsum(blocks) - blocks)[item_slice]
    items = np.concatenate([slices[item_slice], block[:, None]], axis=1)
    return items.astype(np.int64), slices.astype(np.int64)


def adafactor_step(backend: Compiled, params, out, grads, row_vars, col_vars, variances,
                   updates, *, n_threads, step, lr, eps2, d, masks=None, **hyper):
    dtype = params[0].dtype
    update, apply = _scalars.adafactor_scalars(dtype, step=step, lr=lr, **hyper)
    factored = [i for i, p in enumerate(params) if p.ndim > 1 and p.size]
    vectors = [i for i, p in enumerate(params) if p.ndim <= 1 and p.size]
    if factored:
        def pick(arrays):
            return [arrays[i] for i in factored]
        rows = [row_vars[i].reshape(-1) for i in factored]
        cols = [col_vars[i].reshape(-1) for i in factored]
        shape = np.array([(params[i].size // (params[i].shape[-2] * params[i].shape[-1]),)
                          + params[i].shape[-2:] for i in factored], np.int64)
        like = params[factored[0]]
        rmeans = backend.device([np.empty(b, dtype) for b in shape[:, 0]], like)
        rowparts = backend.device([np.empty(b * r * -(-c // COLS)) for b, r, c in shape], like)
        backend.factors(pick(grads), rows, cols, rmeans, rowparts, shape, *factor_work(shape),
                        _rules.ADAFACTOR_ARGS.record(dtype, update), n_threads)
        _steps.run_pass(backend, "adafactor_factored",
                        (pick(params), pick(updates), pick(grads), rows, cols, rmeans,
                         backend.device([row[1:] for row in shape], like)),
                        update, n_threads, None if masks is None else pick(masks), n_aux=4)
    if vectors:
        def pick(arrays):
            return [arrays[i] for i in vectors]
        _steps.run_pass(backend, "adafactor_vector",
                        (pick(params), pick(updates), pick(grads), pick(variances)), update,
                        n_threads, None if masks is None else pick(masks))
    # ||p|| is taken before weight decay (as torch): decay happens in the apply pass
    coefficients = _scalars.adafactor_coefficients(
        *_norms(backend, params, updates, n_threads), [p.size for p in params], dtype,
        step=step, lr=lr, eps2=eps2, d=d)
    _apply(backend, params, out, updates, coefficients, apply, n_threads, masks)
