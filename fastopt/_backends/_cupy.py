"""The CuPy backend: kernels/cuda/*.cu compiled at run time by NVRTC, for CuPy arrays.

One launch per step and group: a device table of operand addresses and chunks (see
kernels/cuda/optim.cu), one thread block per chunk. Kernels are compiled once per process
(and cached on disk by CuPy; set CUPY_CACHE_DIR to move that cache).
"""

import functools
import importlib.util
from pathlib import Path

import numpy as np

from fastopt.optim._scalars import adam_scalars, sgd_scalars

CHUNK = 65536  # elements per thread block of the update kernels
THREADS = 256
NORM_CHUNK, NORM_LANES = 16384, 16  # FO_CHUNK, FO_NORM_LANES of fastopt/reduce.h


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


def _launch(kernel, operands, scalars):
    import cupy
    table, n_chunks = _table(operands, CHUNK)
    if not n_chunks:
        return
    with operands[0][0].device:
        _module("optim.cu").get_function(kernel)(
            (n_chunks,), (THREADS,), (cupy.asarray(table), np.int64(len(operands[0]))) + scalars)


def norm_partials(grads, kind, *, n_threads):
    import cupy
    table, n_chunks = _table((grads,), NORM_CHUNK)
    if not n_chunks:
        return np.empty(0)
    with grads[0].device:
        out = cupy.empty(n_chunks, np.float64)
        _module("reduce.cu").get_function(f"fo_cuda_norm_partials_{_suffix(grads[0].dtype)}")(
            (n_chunks,), (NORM_LANES,), (cupy.asarray(table), np.int64(len(grads)),
                                         np.int32(kind), out))
        return out.get()


def _cast(dtype, *values):
    return tuple(np.dtype(dtype).type(v) for v in values)


def _suffix(dtype):
    return "f64" if dtype == np.float64 else "f32"


def sgd_step(params, out, grads, momentum_buffers, *, n_threads, **hyper):
    dtype = params[0].dtype
    s = sgd_scalars(dtype, **hyper)
    has_buf = momentum_buffers is not None
    operands = (params, out, grads) + ((momentum_buffers,) if has_buf else ())
    _launch(f"fo_cuda_sgd_{_suffix(dtype)}", operands,
            (np.int32(has_buf),)
            + _cast(dtype, s["clip"], s["gscale"], s["weight_decay"], s["momentum"],
                    s["one_minus_dampening"], s["neg_lr"])
            + (np.int32(s["first"]), np.int32(s["nesterov"])))


def adam_step(params, out, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, n_threads, **hyper):
    dtype = params[0].dtype
    s = adam_scalars(dtype, **hyper)
    amsgrad = max_exp_avg_sqs is not None
    operands = (params, out, grads, exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ())
    _launch(f"fo_cuda_adam_{_suffix(dtype)}", operands,
            (np.int32(amsgrad),)
            + _cast(dtype, s["clip"], s["gscale"], s["weight_decay"], s["decay"],
                    s["one_minus_beta1"],
                    s["beta2"], s["one_minus_beta2"], s["bias_correction2_sqrt"], s["eps"],
                    s["neg_step_size"])
            + (np.int32(s["lerp_hi"]),))
