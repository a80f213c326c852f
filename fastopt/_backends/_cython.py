"""The Cython backend: C loops over many tensors in one OpenMP region (kernels/cpu).

Every rule runs through one entry point, ``_optim.step(kernel, operands, f64, args, n)``:
the chunk function's name (optim_loops.h), the operand lists, and the bytes of its
fo_<rule>_args struct packed from the host scalars (fastopt.optim._scalars); Adafactor's
factors pass has its own (``_optim.adafactor_factors``). The two-pass rules are driven by
fastopt._backends._twopass. Pruning masks (``masks=``, one per tensor) travel as the last
operand: the driver zeroes the pruned entries of each chunk right after its update.
"""

import functools
import sys

import numpy as np

from fastopt._backends import _select, _slices, _twopass
from fastopt._backends._pack import pack, random_args
from fastopt._cpu import _distill, _optim, _prune, _quant, _random, _wnorm
from fastopt.optim import _scalars

MASKS_IN_KERNELS = True  # the driver zeroes pruned entries inside each chunk's update


def _run(kernel, operands, scalars_fn, hyper, n_threads):
    masks = hyper.pop("masks", None)
    run(kernel, operands, scalars_fn(operands[0][0].dtype, **hyper), n_threads, masks=masks)


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


lamb_step, adafactor_step = _twopass.steps_for(sys.modules[__name__])


# -- the passes _twopass drives

def run(kernel, operands, scalars, n_threads, n_aux=0, masks=None):
    dtype = operands[0][0].dtype
    if masks is not None:
        operands += (masks,)
    _optim.step(kernel, operands, dtype == np.float64, pack(dtype, scalars), n_threads, n_aux,
                masks is not None)


def factors(grads, rows, cols, rmeans, rowparts, shape, items, slices, scalars, n_threads):
    dtype = grads[0].dtype
    _optim.adafactor_factors(grads, rows, cols, rmeans, rowparts, shape, items, slices,
                             dtype == np.float64, pack(dtype, scalars), n_threads)


def device(arrays, like):
    return arrays


def norm_partials(grads, kind, *, n_threads):
    return _optim.norm_partials(grads, grads[0].dtype == np.float64, kind, n_threads)


def random_fill(out, kind, reals, seed, stream, *, n_threads):
    _random.fill(out, kind, random_args(reals, seed, stream), n_threads)


def weight_norm_sums(x, y, shape, *, n_threads):
    return _slices.total(_wnorm.slice_dot(x, y, *shape, _slices.items(*shape), n_threads))


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads):
    _wnorm.scale(out, v, grad_w, k1, k3, shape[1], shape[2], n_threads)


# -- fastopt.prune's select passes (_select drives them)

def prune_hist(arrays, shift, pmask, prefix, n_threads):
    return _prune.hist(arrays, shift, pmask, prefix, n_threads)


def prune_ties(arrays, thr, n_threads):
    return _prune.ties(arrays, thr, n_threads)


def prune_mask(arrays, masks, thr, tie_modes, n_threads):
    _prune.mask(arrays, masks, thr, tie_modes, n_threads)


def prune_split(arrays, masks, lo, hi, n_threads):
    return _prune.split(arrays, masks, lo, hi, n_threads)


magnitude_masks = functools.partial(_select.magnitude_masks, sys.modules[__name__])


def quant_loop(op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed, *,
               n_threads):
    return _quant.loop(op, x.reshape(-1), out.reshape(-1), None if gy is None else gy.reshape(-1),
                       B, C, inv, zp, scale, qmin, qmax, fused, is_signed, n_threads)


def kd_rows(s, t, g, labels, temperature, wk, wc, *, n_threads):
    return _distill.kd_rows(s, t, g, labels, temperature, wk, wc, n_threads)
