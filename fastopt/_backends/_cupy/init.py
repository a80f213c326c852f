"""The CuPy backend's random fills (kernels/cuda/random.cu) and weight-norm passes
(kernels/cuda/wnorm.cu)."""

import numpy as np

from fastopt._backends import _slices
from fastopt._backends._cupy import _launch
from fastopt._backends._layout import CHUNK, LANES, PER_GROUP
from fastopt._backends._pack import random_args

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
        _launch.module("random.cu").get_function(f"fo_cuda_{_FILLS[kind]}_{sfx}")(
            _launch.grid(groups), (_launch.THREADS,),
            (flat, np.int64(flat.size), cupy.asarray(random_args(reals, seed, stream))))


def weight_norm_sums(x, y, shape, *, n_threads):
    """Partials P[k, b] by one block of 16 threads per (b, k) (kernels/cuda/wnorm.cu)."""
    import cupy
    A, B, C = shape
    K = max(-(-C // CHUNK), 1)
    with x.device:
        partials = cupy.empty((K, B), np.float64)
        _launch.module("wnorm.cu").get_function(f"fo_cuda_slice_dot_{_launch.suffix(x.dtype)}")(
            (B, K), (LANES,), (x, y, np.int64(A), np.int64(B), np.int64(C), partials))
        return _slices.total(partials.get())


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads):
    import cupy
    with v.device:
        k1, k3 = cupy.asarray(k1), cupy.asarray(k1 if k3 is None else k3)
        _launch.module("wnorm.cu").get_function(f"fo_cuda_wnorm_apply_{_launch.suffix(v.dtype)}")(
            _launch.grid(v.size), (_launch.THREADS,),
            (out, v, grad_w if grad_w is not None else np.uint64(0), k1, k3, np.int64(v.size),
             np.int64(shape[1]), np.int64(shape[2])))
