"""Pruning masks for the backends whose update kernels do not take them (the NumPy
reference, Numba, CuPy): the step as it is, then the pruned entries of the written
parameters and of the state arrays shaped like them set to +0 (fastopt.prune). The Cython
backend zeroes them inside its update loops instead (kernels/cpu/chunks.h); a backend
module that does sets ``MASKS_IN_KERNELS = True``."""

import functools
import inspect

from fastopt._interop import array_module


def zero_pruned(mask, arrays):
    """Set the pruned entries (mask byte 0) to +0 in every array of `arrays` (None skipped)
    that has the first one's shape: Adafactor's row and column factors are left alone."""
    shape = arrays[0].shape
    xp = array_module(arrays[0])
    pruned = (mask == 0).reshape(shape)
    for a in arrays:
        if a is not None and a.shape == shape:
            xp.copyto(a, 0, where=pruned)


def with_masks(step):
    """`step` taking ``masks=`` (one uint8 array per tensor, or None)."""
    @functools.wraps(step)
    def masked_step(params, out, grads, *states, masks=None, **kwargs):
        step(params, out, grads, *states, **kwargs)
        if masks is not None:
            for t, mask in enumerate(masks):
                zero_pruned(mask, [out[t]] + [s[t] for s in states if s is not None])
    return masked_step


def wrap_steps(namespace):
    """Give every ``*_step`` function of a backend module that does not take ``masks=``
    itself the post-step zeroing of with_masks."""
    for name, fn in list(namespace.items()):
        if name.endswith("_step") and callable(fn) \
                and "masks" not in inspect.signature(fn).parameters:
            namespace[name] = with_masks(fn)
