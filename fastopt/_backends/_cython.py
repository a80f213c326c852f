"""The Cython backend: C loops over many tensors in one OpenMP region (kernels/cpu).

Every rule runs through one entry point, ``_optim.step(kernel, operands, f64, args, n)``:
the chunk function's name (optim_loops.h), the operand lists, and the bytes of its
fo_<rule>_args struct packed from the host scalars (fastopt.optim._scalars).
"""

import numpy as np

from fastopt._backends._pack import pack
from fastopt._cpu import _optim
from fastopt.optim import _scalars

CHUNK = 16384  # FO_CHUNK of fastopt/reduce.h: the chunks norm_partials reports


def _run(kernel, operands, scalars_fn, hyper, n_threads):
    dtype = operands[0][0].dtype
    _optim.step(kernel, operands, dtype == np.float64, pack(dtype, scalars_fn(dtype, **hyper)),
                n_threads)


def _step(kernel, operands, scalars, n_threads, n_scalar=0):
    dtype = operands[0][0].dtype
    _optim.step(kernel, operands, dtype == np.float64, pack(dtype, scalars), n_threads, n_scalar)


def sgd_step(params, out, grads, momentum_buffers, *, n_threads, **hyper):
    if momentum_buffers is None:
        _run("sgd", (params, out, grads), _scalars.sgd_scalars, hyper, n_threads)
    else:
        _run("sgd_momentum", (params, out, grads, momentum_buffers), _scalars.sgd_scalars,
             hyper, n_threads)


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, n_threads, **hyper):
    if max_exp_avg_sqs is None:
        _run("adam", (params, out, grads, exp_avgs, exp_avg_sqs), _scalars.adam_scalars, hyper,
             n_threads)
    else:
        _run("adam_amsgrad", (params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs),
             _scalars.adam_scalars, hyper, n_threads)


def adagrad_step(params, out, grads, state_sums, *, n_threads, **hyper):
    _run("adagrad", (params, out, grads, state_sums), _scalars.adagrad_scalars, hyper, n_threads)


def rmsprop_step(params, out, grads, square_avgs, grad_avgs, momentum_buffers, *, n_threads,
                 **hyper):
    operands = (params, out, grads, square_avgs) + tuple(
        x for x in (grad_avgs, momentum_buffers) if x is not None)
    _run("rmsprop", operands, _scalars.rmsprop_scalars, hyper, n_threads)


def adadelta_step(params, out, grads, square_avgs, acc_deltas, *, n_threads, **hyper):
    _run("adadelta", (params, out, grads, square_avgs, acc_deltas), _scalars.adadelta_scalars,
         hyper, n_threads)


def adamax_step(params, out, grads, exp_avgs, exp_infs, *, n_threads, **hyper):
    _run("adamax", (params, out, grads, exp_avgs, exp_infs), _scalars.adamax_scalars, hyper,
         n_threads)


def nadam_step(params, out, grads, exp_avgs, exp_avg_sqs, *, n_threads, **hyper):
    _run("nadam", (params, out, grads, exp_avgs, exp_avg_sqs), _scalars.nadam_scalars, hyper,
         n_threads)


def radam_step(params, out, grads, exp_avgs, exp_avg_sqs, *, n_threads, **hyper):
    _run("radam", (params, out, grads, exp_avgs, exp_avg_sqs), _scalars.radam_scalars, hyper,
         n_threads)


def lion_step(params, out, grads, exp_avgs, *, n_threads, **hyper):
    _run("lion", (params, out, grads, exp_avgs), _scalars.lion_scalars, hyper, n_threads)


def lamb_step(params, out, grads, exp_avgs, exp_avg_sqs, updates, *, n_threads, **hyper):
    dtype = params[0].dtype
    update, apply = _scalars.lamb_scalars(dtype, **hyper)
    _step("lamb_update", (params, updates, grads, exp_avgs, exp_avg_sqs), update, n_threads)
    sizes = [p.size for p in params]
    ratios = _scalars.lamb_trust_ratios(
        _scalars.tensor_norms(norm_partials(params, 2, n_threads=n_threads), sizes, CHUNK),
        _scalars.tensor_norms(norm_partials(updates, 2, n_threads=n_threads), sizes, CHUNK),
        dtype)
    _step("lamb_apply", (params, out, updates, [ratios[t:t + 1] for t in range(len(params))]),
          apply, n_threads, n_scalar=1)


def norm_partials(grads, kind, *, n_threads):
    return _optim.norm_partials(grads, grads[0].dtype == np.float64, kind, n_threads)
