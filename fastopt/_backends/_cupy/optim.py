"""The CuPy backend's optimizer passes: kernels/cuda/optim.cu, one launch per pass over all
tensors: a device table of operand addresses and chunks, one thread block per chunk."""

import numpy as np

from fastopt import _rules
from fastopt._backends import _twopass
from fastopt._backends._cupy import _launch
from fastopt._backends._layout import CHUNK, COLS, LANES

MASKS_IN_KERNELS = False  # pruned entries are zeroed after each pass (fastopt._backends._steps)
# optim.cu has a kernel for each entry of fastopt/optim.h's list, which tests/test_kernels.py
# holds to the rule table, and for each pass kernel
KERNELS = {name: len(k.state) for name, k in _rules.ALL_KERNELS.items()}


def elementwise(kernel, operands, record, n_threads, masks=None, n_aux=0):
    """One launch of fo_cuda_<kernel>_<f32|f64> over all tensors: the operand table, the
    chunks and the kernel's scalar struct travel in one device array."""
    import cupy
    table, n_chunks = _launch.table(operands, _launch.BLOCK_CHUNK)
    if not n_chunks:
        return
    dtype = operands[0][0].dtype
    args = _rules.pack(record).view(np.int64)
    with operands[0][0].device:
        _launch.module("optim.cu").get_function(f"fo_cuda_{kernel}_{_launch.suffix(dtype)}")(
            (n_chunks,), (_launch.THREADS,),
            (cupy.asarray(np.concatenate([table, args])), np.int64(len(operands[0])),
             np.int64(table.size)))


def norm_partials(grads, kind, *, n_threads):
    import cupy
    table, n_chunks = _launch.table((grads,), CHUNK)
    if not n_chunks:
        return np.empty(0)
    with grads[0].device:
        out = cupy.empty(n_chunks, np.float64)
        _launch.module("reduce.cu").get_function(f"fo_cuda_norm_partials_{_launch.suffix(grads[0].dtype)}")(
            (n_chunks,), (LANES,), (cupy.asarray(table), np.int64(len(grads)),
                                         np.int32(kind), out))
        return out.get()


def factor_launches(addresses, shape, slices, record):
    """The factors pass's table (host int64: per tensor FO_META values, the addresses of g,
    row, col, rmean and row partials, then B, R, C; the work items; the slices; the args)
    and its three launches (kernels/cuda/factored.cu), each (kernel, grid, block, arguments
    after the table). A thread sums a whole column, so the items are each slice's column
    blocks (not the CPU passes' bands and blocks)."""
    items = _twopass.expand(slices, -(-shape[:, 2] // COLS)[slices[:, 0]])
    args = _rules.pack(record).view(np.int64)
    table = np.concatenate([np.concatenate([addresses, shape], axis=1).ravel(), items.ravel(),
                            slices.ravel(), args])
    args_at, n_t = np.int64(table.size - args.size), np.int64(len(shape))
    return table, [
        ("adafactor_cols", (len(items), 1), (_launch.THREADS,), (n_t, args_at)),
        ("adafactor_rowparts", (len(items), min(int(shape[:, 1].max()), 65535)), (LANES,),
         (n_t, args_at)),
        ("adafactor_rows", (-(-len(slices) // _launch.THREADS), 1), (_launch.THREADS,),
         (n_t, np.int64(len(items)), np.int64(len(slices)), args_at))]


def factors(grads, rows, cols, rmeans, shape, bands, blocks, slices, record, n_threads):
    """Adafactor's factors pass: three launches over one table (factor_launches)."""
    import cupy
    n_blocks = -(-shape[:, 2] // COLS)
    module = _launch.module("factored.cu")
    sfx = _launch.suffix(grads[0].dtype)
    with grads[0].device:
        rowparts = [cupy.empty(int(b * r * k)) for (b, r, _), k in zip(shape, n_blocks)]
        addresses = np.array([[a.data.ptr for a in arrays]
                              for arrays in zip(grads, rows, cols, rmeans, rowparts)], np.int64)
        table, launches = factor_launches(addresses, shape, slices, record)
        table = cupy.asarray(table)
        for kernel, grid, block, arguments in launches:
            module.get_function(f"fo_cuda_{kernel}_{sfx}")(grid, block, (table,) + arguments)
