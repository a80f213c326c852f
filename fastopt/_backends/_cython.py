"""The Cython backend: C loops over many tensors in one OpenMP region (kernels/cpu).

Every kernel of the rule table runs through one entry point, ``elementwise``: the chunk
function's name (optim_loops.h), the operand lists, and the kernel's scalar struct
(fastopt._rules.Args.record); Adafactor's factors pass has its own (``factors``). Pruning
masks (``masks=``, one per tensor) travel as the last operand: the driver zeroes the pruned
entries of each chunk right after its update.
"""

import functools
import sys

import numpy as np

from fastopt._backends import _select, _slices
from fastopt._backends._pack import random_args
from fastopt._cpu import _distill, _optim, _prune, _quant, _random, _wnorm

MASKS_IN_KERNELS = True  # the driver zeroes pruned entries inside each chunk's update
KERNELS = _optim.kernels()  # chunk function name -> number of state operands


def elementwise(kernel, operands, record, n_threads, masks=None, n_aux=0):
    dtype = operands[0][0].dtype
    if masks is not None:
        operands += (masks,)
    _optim.step(kernel, operands, dtype == np.float64, record, n_threads, n_aux,
                masks is not None)


def factors(grads, rows, cols, rmeans, rowparts, shape, items, slices, record, n_threads):
    _optim.adafactor_factors(grads, rows, cols, rmeans, rowparts, shape, items, slices,
                             grads[0].dtype == np.float64, record, n_threads)


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
