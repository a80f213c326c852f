"""The Cython backend's optimizer passes: C loops over many tensors in one OpenMP region
(kernels/cpu/optim_loops.h).

Every kernel of the rule table runs through one entry point, ``elementwise``: the chunk
function's name (optim_loops.h), the operand lists, and the kernel's scalar struct
(fastopt._rules.Args.record); Adafactor's factors pass has its own (``factors``). Pruning
masks (``masks=``, one per tensor) travel as the last operand: the driver zeroes the pruned
entries of each chunk right after its update. Storage formats (``formats=``,
fastopt._backends._formats.Formats: bfloat16 or float16 parameters, gradients, state, and
blockwise 8-bit state) are converted inside each chunk, block by block around the float32
kernel (kernels/cpu/format_loops.h).
"""

import numpy as np

from fastopt import _rules
from fastopt._backends import _formats
from fastopt._cpu import _optim

MASKS_IN_KERNELS = True  # the driver zeroes pruned entries inside each chunk's update
FUSES_EMA = True  # elementwise(ema=) moves the weight EMA chunk by chunk after the update
# the storage codes elementwise() converts inside each chunk (fastopt._backends._formats)
FORMATS = frozenset((_formats.F32, _formats.BF16, _formats.F16, _formats.Q8S, _formats.Q8U))
KERNELS = _optim.kernels()  # chunk function name -> number of state operands
# the dynamic maps of 8-bit state (signed, unsigned) and the quantizer's lookup tables
_QMAPS = np.stack([_formats.QMAPS[_formats.Q8S], _formats.QMAPS[_formats.Q8U]])
_QTABLES = np.stack([_optim.q8_table(qmap) for qmap in _QMAPS])


def elementwise(kernel, operands, record, n_threads, masks=None, n_aux=0, formats=None,
                ema=None):
    """`ema`: (averages, their fo_ema_args record), the weight EMA of each parameter
    updated from the written parameter chunk by chunk (not with `formats`)."""
    if formats is not None:
        if ema is not None:
            raise ValueError("storage formats: the weight EMA runs as a pass of its own")
        if n_aux or kernel not in _rules.KERNELS:
            raise ValueError(f"storage formats: {kernel!r} is not an elementwise kernel")
        if formats.compute != np.float32:
            raise ValueError(f"storage formats: kernels compute in float32, not "
                             f"{formats.compute}")
        _optim.step_formats(kernel, operands, record, n_threads, tuple(formats.storage),
                            formats.shadow, formats.stochastic, formats.step,
                            np.ascontiguousarray(formats.keys, np.uint32), masks,
                            tuple(list(s) for s in formats.scales), _QMAPS, _QTABLES)
        return
    dtype = operands[0][0].dtype
    if ema is not None:
        operands += (ema[0],)
    if masks is not None:
        operands += (masks,)
    _optim.step(kernel, operands, dtype == np.float64, record, n_threads, n_aux,
                masks is not None, None if ema is None else ema[1])


def pass_sums(kernel, operands, record, n_threads, sums, masks=None, n_aux=0, discard=False):
    """elementwise()'s pass that also sums operands as each chunk leaves it, in cache (see
    fastopt._backends._contracts.Compiled)."""
    if masks is not None:
        operands += (masks,)
    return _optim.step_sums(kernel, operands, operands[0][0].dtype == np.float64, record,
                            n_threads, tuple(sums), discard, n_aux, masks is not None)


def caution_counts(kernel, operands, record, n_threads, masks=None):
    """Per tensor, how many elements the cautious count kernel `kernel` finds agreeing and
    `masks` does not prune, counted in its pass (kernels/cpu/optim_loops.h): no K written,
    nor read back."""
    if masks is not None:
        operands += (masks,)
    return _optim.caution_counts(kernel, operands, operands[0][0].dtype == np.float64, record,
                                 n_threads, masks is not None)


def factors(grads, rows, cols, rmeans, shape, bands, blocks, slices, record, n_threads):
    _optim.adafactor_factors(grads, rows, cols, rmeans, shape, bands, blocks, slices,
                             grads[0].dtype == np.float64, record, n_threads)


def device(arrays, like):
    return arrays


def norm_partials(grads, kind, *, n_threads):
    return _optim.norm_partials(grads, grads[0].dtype == np.float64, kind, n_threads)
