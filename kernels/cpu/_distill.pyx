# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Knowledge distillation on the CPU: the rows of distill_loops.h (fastopt/distill.h) in
parallel. Arguments are validated by fastopt.distill."""

include "_plan.pxi"

from cython.parallel cimport threadid

cdef extern from "distill_loops.h" nogil:
    void fo_cpu_kd_row_f32(const float *s, const float *t, float *g, Py_ssize_t C,
                           Py_ssize_t label, float temp, float wk, float wc, double *out,
                           float *work, const float *next_s, const float *next_t, int stream)
    void fo_cpu_kd_row_f64(const double *s, const double *t, double *g, Py_ssize_t C,
                           Py_ssize_t label, double temp, double wk, double wc, double *out,
                           double *work, const double *next_s, const double *next_t,
                           int stream)


# a gradient this large (bytes) is written with non-temporal stores: it would leave the
# caches before anyone reads it, and they save reading its lines before writing them
DEF STREAM_BYTES = 1 << 26


def kd_rows(cnp.ndarray s, cnp.ndarray t, cnp.ndarray g, object labels, double temp,
            double wk, double wc, int n_threads, object stream=None):
    """Per row b of the (B, C) logits: g[b] = the weighted gradient, and (KL_b, CE_b) as a
    (B, 2) float64 array; labels (int64, B) or None for no cross entropy. stream: write g
    with non-temporal stores (None: when it has STREAM_BYTES or more)."""
    import numpy as np
    cdef Py_ssize_t B = cnp.PyArray_DIM(s, 0), C = cnp.PyArray_DIM(s, 1), b
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(s)
    cdef const cnp.int64_t[::1] lab
    cdef bint ce = labels is not None
    for name, a in (("s", s), ("t", t), ("g", g)):
        if (cnp.PyArray_NDIM(a) != 2 or cnp.PyArray_DIM(a, 0) != B or cnp.PyArray_DIM(a, 1) != C
                or cnp.PyArray_ITEMSIZE(a) != itemsize or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
            raise ValueError(f"{name}: expected a C-contiguous ({B}, {C}) array like s")
    if C < 1:
        raise ValueError("s: expected at least one class")
    if ce:
        lab = labels
        if lab.shape[0] != B:
            raise ValueError(f"labels: expected {B} values")
        for b in range(B):
            if not 0 <= lab[b] < C:
                raise ValueError(f"labels[{b}] is outside [0, {C})")
    cdef cnp.ndarray rows = np.zeros((B, 2), np.float64)
    cdef double *r = <double *>cnp.PyArray_DATA(rows)
    cdef char *ps = <char *>cnp.PyArray_DATA(s)
    cdef char *pt = <char *>cnp.PyArray_DATA(t)
    cdef char *pg = <char *>cnp.PyArray_DATA(g)
    n_threads = max(1, min(n_threads, B, B * C // MIN_PER_THREAD))
    # the rows' exponentials, 3 C values per thread (kept between a row's passes)
    cdef cnp.ndarray work_arr = np.empty(n_threads * 3 * C, s.dtype)
    cdef char *work = <char *>cnp.PyArray_DATA(work_arr)
    cdef Py_ssize_t at, nx
    cdef int streamed = B * C * itemsize >= STREAM_BYTES if stream is None else bool(stream)
    with nogil:
        for b in prange(B, num_threads=n_threads, schedule='static'):
            at = threadid() * 3 * C
            # the next row, prefetched while this one computes (none after the last)
            nx = (b + 1) * C if b + 1 < B else -1
            if itemsize == 8:
                fo_cpu_kd_row_f64(<double *>ps + b * C, <double *>pt + b * C,
                                  <double *>pg + b * C, C, lab[b] if ce else -1, temp, wk, wc,
                                  r + 2 * b, <double *>work + at,
                                  <double *>ps + nx if nx >= 0 else NULL,
                                  <double *>pt + nx if nx >= 0 else NULL, streamed)
            else:
                fo_cpu_kd_row_f32(<float *>ps + b * C, <float *>pt + b * C, <float *>pg + b * C,
                                  C, lab[b] if ce else -1, <float>temp, <float>wk, <float>wc,
                                  r + 2 * b, <float *>work + at,
                                  <float *>ps + nx if nx >= 0 else NULL,
                                  <float *>pt + nx if nx >= 0 else NULL, streamed)
    return rows
