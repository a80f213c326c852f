"""The CuPy backend: kernels/cuda/*.cu compiled at run time by NVRTC, for CuPy arrays.

One launch per step and group: a device table of operand addresses and chunks (see
kernels/cuda/optim.cu), one thread block per chunk. Kernels are compiled once per process
(and cached on disk by CuPy; set CUPY_CACHE_DIR to move that cache).
"""

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np

from fastopt import _rules
from fastopt._backends import _select, _slices
from fastopt._backends._layout import CHUNK, DIGIT_BITS, KD_ROWS, LANES, PRUNE_THREADS
from fastopt._backends._numpy import PER_GROUP
from fastopt._backends._numpy_compress import CE_SQUARES
from fastopt._backends._pack import random_args

MASKS_IN_KERNELS = False  # pruned entries are zeroed after each pass (fastopt._backends._steps)
# optim.cu has a kernel for each entry of fastopt/optim.h's list, which tests/test_kernels.py
# holds to the rule table, and for each pass kernel
KERNELS = {name: len(k.state) for name, k in _rules.ALL_KERNELS.items()}
BLOCK_CHUNK = 65536  # elements per thread block of the update kernels
THREADS = 256


def kernel_dir():
    """The kernels/ folder (CUDA sources and shared headers): package data of an installed
    fastopt, or the folder beside the package when it is imported from a source checkout."""
    # kernels/ holds no Python: it is a namespace package, whose importlib.resources handle
    # is no file-system path, so take its folder from the import spec
    spec = importlib.util.find_spec("fastopt.kernels")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "kernels"


def compile_options():
    """NVRTC options, shared with the compile test that runs without a GPU.

    --fmad=false keeps a*b+c as two roundings, as the CPU build does, so every backend
    computes the same numbers.
    """
    return ("-std=c++14", "--fmad=false", f"-I{kernel_dir() / 'include'}")


def source(name):
    return (kernel_dir() / "cuda" / name).read_text()


def unavailable_reason():
    import cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"no CUDA device ({exc})"
    return None if count > 0 else "no CUDA device"


@functools.lru_cache(maxsize=None)
def _module(name):
    import cupy
    return cupy.RawModule(code=source(name), options=compile_options())


def _table(operands, chunk):
    """Host int64 table: operand addresses per tensor, then (tensor, offset, length) per
    chunk (see kernels/cuda/optim.cu); and the number of chunks."""
    n_t = len(operands[0])
    sizes = [int(a.size) for a in operands[0]]
    chunks = [(t, lo, min(chunk, size - lo))
              for t, size in enumerate(sizes) for lo in range(0, size, chunk)]
    table = np.empty(n_t * len(operands) + 3 * len(chunks), np.int64)
    table[:n_t * len(operands)] = [op[t].data.ptr for t in range(n_t) for op in operands]
    table[n_t * len(operands):] = np.ravel(chunks)
    return table, len(chunks)


def elementwise(kernel, operands, record, n_threads, masks=None, n_aux=0):
    """One launch of fo_cuda_<kernel>_<f32|f64> over all tensors: the operand table, the
    chunks and the kernel's scalar struct travel in one device array."""
    import cupy
    table, n_chunks = _table(operands, BLOCK_CHUNK)
    if not n_chunks:
        return
    dtype = operands[0][0].dtype
    args = _rules.pack(record).view(np.int64)
    with operands[0][0].device:
        _module("optim.cu").get_function(f"fo_cuda_{kernel}_{_suffix(dtype)}")(
            (n_chunks,), (THREADS,),
            (cupy.asarray(np.concatenate([table, args])), np.int64(len(operands[0])),
             np.int64(table.size)))


def norm_partials(grads, kind, *, n_threads):
    import cupy
    table, n_chunks = _table((grads,), CHUNK)
    if not n_chunks:
        return np.empty(0)
    with grads[0].device:
        out = cupy.empty(n_chunks, np.float64)
        _module("reduce.cu").get_function(f"fo_cuda_norm_partials_{_suffix(grads[0].dtype)}")(
            (n_chunks,), (LANES,), (cupy.asarray(table), np.int64(len(grads)),
                                         np.int32(kind), out))
        return out.get()


def _grid(n):
    """Blocks of THREADS for a grid-stride loop over n elements (at most 65536)."""
    return (min(-(-n // THREADS), 65536),)


def _suffix(dtype):
    return "f64" if dtype == np.float64 else "f32"


def factors(grads, rows, cols, rmeans, rowparts, shape, items, slices, record, n_threads):
    """Adafactor's factors pass: three launches over one table (kernels/cuda/factored.cu)."""
    import cupy
    dtype = grads[0].dtype
    meta = np.array([[g.data.ptr, row.data.ptr, col.data.ptr, rmean.data.ptr, part.data.ptr]
                     for g, row, col, rmean, part in zip(grads, rows, cols, rmeans, rowparts)],
                    np.int64)
    args = _rules.pack(record).view(np.int64)
    # per tensor FO_META values: the five addresses, then B, R, C
    table = np.concatenate([np.concatenate([meta, shape], axis=1).ravel(), items.ravel(),
                            slices.ravel(), args])
    args_at = np.int64(table.size - args.size)
    n_t = np.int64(len(grads))
    module = _module("factored.cu")
    sfx = _suffix(dtype)
    with grads[0].device:
        table = cupy.asarray(table)
        module.get_function(f"fo_cuda_adafactor_cols_{sfx}")(
            (len(items),), (THREADS,), (table, n_t, args_at))
        module.get_function(f"fo_cuda_adafactor_rowparts_{sfx}")(
            (len(items), min(int(shape[:, 1].max()), 65535)), (LANES,),
            (table, n_t, args_at))
        module.get_function(f"fo_cuda_adafactor_rows_{sfx}")(
            (-(-len(slices) // THREADS),), (THREADS,),
            (table, n_t, np.int64(len(items)), np.int64(len(slices)), args_at))


def device(arrays, like):
    """Host arrays as device arrays beside `like`, in one transfer."""
    import cupy
    if not arrays:
        return []
    ends = np.cumsum([a.size for a in arrays])
    with like.device:
        flat = cupy.asarray(np.concatenate([a.reshape(-1) for a in arrays]))
    return [flat[end - a.size:end].reshape(a.shape) for a, end in zip(arrays, ends)]


_FILLS = ("uniform", "normal", "trunc_normal", "bits")  # by FO_RANDOM_<KIND>


def random_fill(out, kind, reals, seed, stream, *, n_threads):
    """One launch of kernels/cuda/random.cu: a thread per Philox group."""
    import cupy
    flat = out.reshape(-1)
    groups = -(-flat.size // PER_GROUP[kind, out.dtype.name])
    if not groups:
        return
    sfx = {"float32": "f32", "float64": "f64", "uint32": "u32"}[out.dtype.name]
    with out.device:
        _module("random.cu").get_function(f"fo_cuda_{_FILLS[kind]}_{sfx}")(
            _grid(groups), (THREADS,),
            (flat, np.int64(flat.size), cupy.asarray(random_args(reals, seed, stream))))


def weight_norm_sums(x, y, shape, *, n_threads):
    """Partials P[k, b] by one block of 16 threads per (b, k) (kernels/cuda/wnorm.cu)."""
    import cupy
    A, B, C = shape
    K = max(-(-C // CHUNK), 1)
    with x.device:
        partials = cupy.empty((K, B), np.float64)
        _module("wnorm.cu").get_function(f"fo_cuda_slice_dot_{_suffix(x.dtype)}")(
            (B, K), (LANES,), (x, y, np.int64(A), np.int64(B), np.int64(C), partials))
        return _slices.total(partials.get())


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads):
    import cupy
    with v.device:
        k1, k3 = cupy.asarray(k1), cupy.asarray(k1 if k3 is None else k3)
        _module("wnorm.cu").get_function(f"fo_cuda_wnorm_apply_{_suffix(v.dtype)}")(
            _grid(v.size), (THREADS,),
            (out, v, grad_w if grad_w is not None else np.uint64(0), k1, k3, np.int64(v.size),
             np.int64(shape[1]), np.int64(shape[2])))


# -- fastopt.prune's select passes (kernels/cuda/prune.cu; _select drives them)



def _key(dtype):
    return np.uint64 if dtype == np.float64 else np.uint32


def _prune_launch(kernel, operands, *args):
    """One launch of fo_cuda_prune_<kernel>: a block per CHUNK chunk of the
    tensors."""
    import cupy
    table, n_chunks = _table(operands, CHUNK)
    if n_chunks:
        name = f"fo_cuda_prune_{kernel}_{_suffix(operands[0][0].dtype)}"
        _module("prune.cu").get_function(name)(
            (n_chunks,), (PRUNE_THREADS,),
            (cupy.asarray(table), np.int64(len(operands[0]))) + args)


def prune_hist(arrays, shift, pmask, prefix, n_threads):
    import cupy
    key = _key(arrays[0].dtype)
    with arrays[0].device:
        counts = cupy.zeros(2 ** DIGIT_BITS, np.uint64)
        maxkey = cupy.zeros(1, key)
        _prune_launch("hist", (arrays,), np.int32(shift), key(pmask), key(prefix), counts,
                      maxkey)
        return counts.get().astype(np.int64), int(maxkey.get()[0])


def prune_ties(arrays, thr, n_threads):
    import cupy
    with arrays[0].device:
        out = cupy.zeros(_select.n_chunks(arrays), np.int64)
        _prune_launch("ties", (arrays,), _key(arrays[0].dtype)(thr), out)
        return out.get()


def prune_mask(arrays, masks, thr, tie_modes, n_threads):
    import cupy
    with arrays[0].device:
        _prune_launch("mask", (arrays, masks), _key(arrays[0].dtype)(thr),
                      cupy.asarray(np.asarray(tie_modes, np.int64)))


magnitude_masks = functools.partial(_select.magnitude_masks, sys.modules[__name__])


# -- fastopt.quant's loops (kernels/cuda/quant.cu)

_QUANT_KINDS = {"quantize": 0, "fake_quantize": 2, "fake_quantize_grad": 3}  # FO_CUDA_*


def quant_loop(op, x, out, gy, B, C, inv, zp, scale, qmin, qmax, fused, is_signed, *,
               n_threads):
    """The loops of kernels/cpu/_quant.pyx (same arguments) on device arrays; the
    per-slice parameters come from the host."""
    import cupy
    x, out = x.reshape(-1), out.reshape(-1)
    module = _module("quant.cu")
    with x.device:
        if op == "dequantize":
            n = out.size
            module.get_function(f"fo_cuda_dequant_{_suffix(out.dtype)}")(
                _grid(n), (THREADS,),
                (x, out, np.int64(n), np.int64(B), np.int64(C), cupy.asarray(zp, np.int32),
                 cupy.asarray(scale, np.float64), np.int32(is_signed)))
            return 0
        dtype, n = x.dtype, x.size
        inv, zp, scale = device([np.asarray(v, dtype) for v in
                                 (inv, zp, inv if scale is None else scale)], x)
        nan = cupy.zeros(1, np.uint64)
        module.get_function(f"fo_cuda_quant_{_suffix(dtype)}")(
            _grid(n), (THREADS,),
            (np.int32(_QUANT_KINDS[op]), x, out, x if gy is None else gy.reshape(-1),
             np.int64(n), np.int64(B), np.int64(C), inv, zp, scale, dtype.type(qmin),
             dtype.type(qmax), np.int32(fused), nan))
        return int(nan.get()[0])


# -- fastopt.distill's rows (kernels/cuda/distill.cu)

def kd_rows(s, t, g, labels, temperature, wk, wc, *, n_threads):
    """Per row: the weighted gradient into g, and (KL_b, CE_b) as a host (B, 2) float64
    array; LANES threads per row, KD_ROWS rows per block."""
    import cupy
    B, C = s.shape
    f = s.dtype.type
    temp = f(temperature)
    with s.device:
        rows = cupy.zeros((B, 2), np.float64)
        labels = np.uint64(0) if labels is None else cupy.asarray(labels, np.int64)
        _module("distill.cu").get_function(f"fo_cuda_kd_rows_{_suffix(s.dtype)}")(
            (-(-B // KD_ROWS),), (KD_ROWS * LANES,),
            (s, t, g, np.int64(B), np.int64(C), labels, temp, f(wk), f(wc),
             np.int32(CE_SQUARES.get(float(temp), 0)), rows))
        return rows.get()


