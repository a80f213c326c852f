"""The Cython backend: C loops over many tensors in one OpenMP region (kernels/cpu)."""

import numpy as np

from fastopt._cpu import _optim
from fastopt.optim._scalars import adam_scalars, sgd_scalars


def sgd_step(params, out, grads, momentum_buffers, *, n_threads, **hyper):
    dtype = params[0].dtype
    _optim.sgd(params, out, grads, momentum_buffers, dtype == np.float64,
               n_threads=n_threads, **sgd_scalars(dtype, **hyper))


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, n_threads, **hyper):
    dtype = params[0].dtype
    _optim.adam(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                dtype == np.float64, n_threads=n_threads, **adam_scalars(dtype, **hyper))


def norm_partials(grads, kind, *, n_threads):
    return _optim.norm_partials(grads, grads[0].dtype == np.float64, kind, n_threads)
