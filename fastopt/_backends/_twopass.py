"""Rules with per-tensor reductions between their passes (Lamb, Adafactor), written once for
the compiled backends (Cython, Numba, CuPy); each backend supplies the passes.

A backend here is a module with:
- ``run(kernel, operands, scalars, n_threads, n_aux=0)``: one chunk-kernel pass (kernels by
  their optim_loops.h names), the last `n_aux` operands per-tensor auxiliaries;
- ``norm_partials(arrays, kind, n_threads=...)``: fastopt/reduce.h's chunk partials, on the host;
- ``factors(grads, rows, cols, rmeans, rowparts, scalars, n_threads)``: Adafactor's factors pass;
- ``device(host_arrays, like)``: the host arrays as arrays beside `like` (CPU: themselves).
The per-tensor scalars (norms, trust ratios, step factors) are computed on the host from the
norm partials, in the order fastopt.optim._scalars fixes, so every backend gets the same.
"""

import functools

import numpy as np

from fastopt.optim import _scalars

CHUNK = 16384  # FO_CHUNK of fastopt/reduce.h: the chunks norm_partials reports
COLS = 512  # FO_COLS


def _norms(backend, arrays, n_threads):
    return _scalars.tensor_norms(backend.norm_partials(arrays, 2, n_threads=n_threads),
                                 [a.size for a in arrays], CHUNK)


def _apply(backend, params, out, updates, factors, scalars, n_threads):
    """p <- p decay + scale (u k) with k one value per tensor (fo_scaled_apply)."""
    factors = backend.device([factors[t:t + 1] for t in range(len(params))], params[0])
    backend.run("scaled_apply", (params, out, updates, factors), scalars, n_threads, n_aux=1)


def lamb_step(backend, params, out, grads, exp_avgs, exp_avg_sqs, updates, *, n_threads,
              **hyper):
    update, apply = _scalars.lamb_scalars(params[0].dtype, **hyper)
    backend.run("lamb_update", (params, updates, grads, exp_avgs, exp_avg_sqs), update,
                n_threads)
    ratios = _scalars.lamb_trust_ratios(_norms(backend, params, n_threads),
                                        _norms(backend, updates, n_threads), params[0].dtype)
    _apply(backend, params, out, updates, ratios, apply, n_threads)


def adafactor_step(backend, params, out, grads, row_vars, col_vars, variances, updates, *,
                   n_threads, step, lr, eps2, d, **hyper):
    dtype = params[0].dtype
    update, apply = _scalars.adafactor_scalars(dtype, step=step, lr=lr, **hyper)
    param_norms = _norms(backend, params, n_threads)  # before weight decay, as torch
    factored = [i for i, p in enumerate(params) if p.ndim > 1 and p.size]
    vectors = [i for i, p in enumerate(params) if p.ndim <= 1 and p.size]
    if factored:
        pick = lambda arrays: [arrays[i] for i in factored]
        rows = [row_vars[i].reshape(-1) for i in factored]
        cols = [col_vars[i].reshape(-1) for i in factored]
        shapes = [params[i].shape[-2:] for i in factored]
        like = params[factored[0]]
        rmeans = backend.device(
            [np.empty(params[i].size // (r * c), dtype) for i, (r, c) in zip(factored, shapes)],
            like)
        rowparts = backend.device(
            [np.empty(params[i].size // c * -(-c // COLS)) for i, (_, c) in zip(factored, shapes)],
            like)
        backend.factors(pick(grads), rows, cols, rmeans, rowparts, update, n_threads)
        backend.run("adafactor_factored",
                    (pick(params), pick(updates), pick(grads), rows, cols, rmeans,
                     backend.device([np.array(s, np.int64) for s in shapes], like)),
                    update, n_threads, n_aux=4)
    if vectors:
        pick = lambda arrays: [arrays[i] for i in vectors]
        backend.run("adafactor_vector",
                    (pick(params), pick(updates), pick(grads), pick(variances)), update,
                    n_threads)
    coefficients = _scalars.adafactor_coefficients(
        param_norms, _norms(backend, updates, n_threads), [p.size for p in params], dtype,
        step=step, lr=lr, eps2=eps2, d=d)
    _apply(backend, params, out, updates, coefficients, apply, n_threads)


def steps_for(backend):
    """(lamb_step, adafactor_step) of a backend module, as its registry entries."""
    return functools.partial(lamb_step, backend), functools.partial(adafactor_step, backend)
