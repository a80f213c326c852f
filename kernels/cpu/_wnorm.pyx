# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Weight normalization on the CPU: the slice sums and the elementwise passes of
wnorm_loops.h (see fastopt/wnorm.h). Arguments are validated by fastopt.weight_norm."""

include "_plan.pxi"

cdef extern from "wnorm_loops.h" nogil:
    ctypedef struct fo_wnorm_args:
        const void *k1
        const void *k3
        Py_ssize_t B
        Py_ssize_t C
    void fo_cpu_slice_dot_f32(const float *x, const float *y, Py_ssize_t A, Py_ssize_t B,
                              Py_ssize_t C, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t k,
                              double *P)
    void fo_cpu_slice_dot_f64(const double *x, const double *y, Py_ssize_t A, Py_ssize_t B,
                              Py_ssize_t C, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t k,
                              double *P)
    void fo_cpu_wnorm_scale_f32(char **ptr, Py_ssize_t lo, Py_ssize_t n, const void *args)
    void fo_cpu_wnorm_scale_f64(char **ptr, Py_ssize_t lo, Py_ssize_t n, const void *args)
    void fo_cpu_wnorm_grad_f32(char **ptr, Py_ssize_t lo, Py_ssize_t n, const void *args)
    void fo_cpu_wnorm_grad_f64(char **ptr, Py_ssize_t lo, Py_ssize_t n, const void *args)


cdef void _check(cnp.ndarray a, Py_ssize_t size, Py_ssize_t itemsize, str name) except *:
    if (cnp.PyArray_SIZE(a) != size or cnp.PyArray_ITEMSIZE(a) != itemsize
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
        raise ValueError(f"{name}: expected a C-contiguous array of {size} elements of "
                         f"{itemsize} bytes")


def slice_dot(cnp.ndarray x, cnp.ndarray y, Py_ssize_t A, Py_ssize_t B, Py_ssize_t C,
              const cnp.int64_t[:, ::1] items, int n_threads):
    """The partials P (K x B, float64) of x . y per slice of the (A, B, C) arrays; `items`
    rows are (b0, b1, k) and together cover every (b, k) once."""
    import numpy as np
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(x), i, K = (C + CHUNK - 1) // CHUNK
    cdef bint f64 = itemsize == 8
    _check(x, A * B * C, itemsize, "x")
    _check(y, A * B * C, itemsize, "y")
    for i in range(items.shape[0]):
        if not (0 <= items[i, 0] < items[i, 1] <= B and 0 <= items[i, 2] < K):
            raise ValueError(f"items[{i}] is outside the slices")
    cdef cnp.ndarray out = np.zeros((K, B), np.float64)
    cdef double *P = <double *>cnp.PyArray_DATA(out)
    cdef char *px = <char *>cnp.PyArray_DATA(x)
    cdef char *py = <char *>cnp.PyArray_DATA(y)
    n_threads = max(1, min(n_threads, A * B * C // MIN_PER_THREAD))
    with nogil:
        for i in prange(items.shape[0], num_threads=n_threads, schedule='static'):
            if f64:
                fo_cpu_slice_dot_f64(<double *>px, <double *>py, A, B, C, items[i, 0],
                                     items[i, 1], items[i, 2], P + items[i, 2] * B)
            else:
                fo_cpu_slice_dot_f32(<float *>px, <float *>py, A, B, C, items[i, 0],
                                     items[i, 1], items[i, 2], P + items[i, 2] * B)
    return out


def scale(cnp.ndarray out, cnp.ndarray v, object grad_w, cnp.ndarray k1, object k3,
          Py_ssize_t B, Py_ssize_t C, int n_threads):
    """out = k1[b] * v (grad_w None), else out = k1[b] * (grad_w - v * k3[b]), for the
    flattened (A, B, C) arrays; k1, k3 hold B factors in v's dtype."""
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(v)
    cdef fo_wnorm_args args
    cdef bint grad = grad_w is not None
    _check(k1, B, itemsize, "k1")
    if grad:
        _check(<cnp.ndarray?>k3, B, itemsize, "k3")
    if B < 1 or C < 1 or cnp.PyArray_SIZE(v) % (B * C):
        raise ValueError("v: its size is not a multiple of B * C")
    args.k1 = cnp.PyArray_DATA(k1)
    args.k3 = cnp.PyArray_DATA(<cnp.ndarray>k3) if grad else NULL
    args.B, args.C = B, C
    operands = ([out.reshape(-1)], [v.reshape(-1)]) + (([grad_w.reshape(-1)],) if grad else ())
    if itemsize == 8:
        run(fo_cpu_wnorm_grad_f64 if grad else fo_cpu_wnorm_scale_f64, operands, 8, &args,
            n_threads)
    else:
        run(fo_cpu_wnorm_grad_f32 if grad else fo_cpu_wnorm_scale_f32, operands, 4, &args,
            n_threads)
