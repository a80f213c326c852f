# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Optimizer update rules on the CPU: C loops from optim_loops.h, driven over many tensors.

Low-level entry points for fastopt._backends._cython: arguments are already validated, the
scalars already computed on the host (fastopt.optim._scalars). `f64` selects float64.
"""

include "_plan.pxi"

cdef extern from "reduce_loops.h" nogil:
    double fo_norm_chunk_f32(const float *g, Py_ssize_t n, int kind)
    double fo_norm_chunk_f64(const double *g, Py_ssize_t n, int kind)

from libc.string cimport strcmp

cdef extern from "optim_loops.h" nogil:
    ctypedef struct fo_cpu_kernel:
        const char *name
        fo_chunk_fn f32
        fo_chunk_fn f64
    const fo_cpu_kernel *fo_cpu_kernels


cdef fo_chunk_fn _kernel(str name, bint f64) except NULL:
    """The chunk function fo_cpu_<name>_<f32|f64> of optim_loops.h."""
    cdef bytes key = name.encode()
    cdef const fo_cpu_kernel *k = fo_cpu_kernels
    while k.name != NULL:
        if strcmp(k.name, key) == 0:
            return k.f64 if f64 else k.f32
        k += 1
    raise ValueError(f"no CPU kernel named {name!r}")


def step(str kernel, tuple operands, bint f64, cnp.ndarray args, int n_threads,
         Py_ssize_t n_scalar=0):
    """Run chunk function `kernel` over `operands` (a tuple of equally long lists of arrays:
    param in, param out, grad, state...). `args` (a C-contiguous array) holds the bytes of
    its fo_<rule>_args struct: the float fields in the parameter's dtype, then the int
    fields (fastopt._backends._pack.pack). The last `n_scalar` operands hold one element
    per tensor (per-tensor scalars such as Lamb's trust ratio)."""
    if not cnp.PyArray_IS_C_CONTIGUOUS(args):
        raise ValueError("args: expected a C-contiguous array")
    run(_kernel(kernel, f64), operands, 8 if f64 else 4, cnp.PyArray_DATA(args), n_threads,
        n_scalar)


def norm_partials(list grads, bint f64, int kind, int n_threads):
    """Each chunk's partial of the gradient norm (fastopt/reduce.h), as float64 array."""
    import numpy as np
    cdef Plan pl
    cdef cnp.ndarray out
    cdef double *o
    cdef Py_ssize_t c, t, lo
    plan_init(&pl, (grads,), 8 if f64 else 4)
    try:
        out = np.empty(pl.n_chunks, np.float64)
        o = <double *>cnp.PyArray_DATA(out)
        n_threads = min(n_threads, pl.n_elements // MIN_PER_THREAD)
        with nogil:
            for c in prange(pl.n_chunks, num_threads=max(n_threads, 1), schedule='static'):
                t = pl.chunk[3 * c]
                lo = pl.chunk[3 * c + 1]
                if f64:
                    o[c] = fo_norm_chunk_f64(<double *>pl.ptr[t] + lo, pl.chunk[3 * c + 2], kind)
                else:
                    o[c] = fo_norm_chunk_f32(<float *>pl.ptr[t] + lo, pl.chunk[3 * c + 2], kind)
    finally:
        plan_free(&pl)
    return out
