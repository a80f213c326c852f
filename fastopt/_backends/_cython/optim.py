"""The Cython backend's optimizer passes: C loops over many tensors in one OpenMP region
(kernels/cpu/optim_loops.h).

Every kernel of the rule table runs through one entry point, ``elementwise``: the chunk
function's name (optim_loops.h), the operand lists, and the kernel's scalar struct
(fastopt._rules.Args.record); Adafactor's factors pass has its own (``factors``). Pruning
masks (``masks=``, one per tensor) travel as the last operand: the driver zeroes the pruned
entries of each chunk right after its update.
"""

import numpy as np

from fastopt._cpu import _optim

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
