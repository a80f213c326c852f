# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Pruning on the CPU: the counting passes of the magnitude select (prune_loops.h) over
many tensors at once. fastopt._backends._select drives them; arguments are validated by
fastopt.prune."""

include "_plan.pxi"

from cython.parallel cimport parallel, threadid
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

cdef extern from "prune_loops.h" nogil:
    const int BINS "FO_DIGIT_BINS"
    void fo_cpu_mag_hist_f32(const float *x, Py_ssize_t n, int shift, uint32_t pmask,
                             uint32_t prefix, uint32_t *h, uint32_t *maxkey)
    void fo_cpu_mag_hist_f64(const double *x, Py_ssize_t n, int shift, uint64_t pmask,
                             uint64_t prefix, uint32_t *h, uint64_t *maxkey)
    Py_ssize_t fo_cpu_mag_ties_f32(const float *x, Py_ssize_t n, uint32_t thr)
    Py_ssize_t fo_cpu_mag_ties_f64(const double *x, Py_ssize_t n, uint64_t thr)
    void fo_cpu_mag_mask_f32(const float *x, Py_ssize_t n, uint32_t thr, Py_ssize_t ties,
                             uint8_t *m)
    void fo_cpu_mag_mask_f64(const double *x, Py_ssize_t n, uint64_t thr, Py_ssize_t ties,
                             uint8_t *m)



cdef int _threads(const Plan *pl, int n_threads) noexcept nogil:
    return max(1, min(n_threads, pl.n_elements // MIN_PER_THREAD, pl.n_chunks))


def hist(list arrays, int shift, uint64_t pmask, uint64_t prefix, int n_threads):
    """(counts, maxkey): the FO_DIGIT_BINS counts (int64) of the digit at `shift` over the
    keys of every element of `arrays` (all float32 or all float64) whose key has
    (key & pmask) == prefix, and the largest key of all elements."""
    import numpy as np
    cdef Plan pl
    cdef bint f64 = len(arrays) > 0 and cnp.PyArray_ITEMSIZE(<cnp.ndarray?>arrays[0]) == 8
    cdef int nt, tid
    cdef cnp.ndarray totals, maxkeys
    plan_init(&pl, (arrays,), 8 if f64 else 4)
    try:
        nt = _threads(&pl, n_threads)
        totals = np.zeros((nt, BINS), np.uint64)
        maxkeys = np.zeros(nt, np.uint64)
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            _hist_thread(&pl, tid, nt, f64, shift, pmask, prefix,
                         <uint64_t *>cnp.PyArray_DATA(totals) + tid * BINS,
                         <uint64_t *>cnp.PyArray_DATA(maxkeys) + tid)
    finally:
        plan_free(&pl)
    if (maxkeys == np.uint64(2 ** 64 - 1)).any():
        raise MemoryError("no memory for the select's histograms")
    return totals.sum(axis=0).astype(np.int64), int(maxkeys.max(initial=0))


cdef void _hist_thread(const Plan *pl, int tid, int nt, bint f64, int shift, uint64_t pmask,
                       uint64_t prefix, uint64_t *total, uint64_t *maxkey) noexcept nogil:
    """Thread tid's share of hist(): chunks tid, tid + nt, ... counted into its own
    interleaved uint32 histograms, added to `total` before they could overflow."""
    cdef Py_ssize_t flush = <Py_ssize_t>1 << 31
    cdef uint32_t *h = <uint32_t *>calloc(4 * BINS, sizeof(uint32_t))
    cdef uint32_t mx32 = 0
    cdef uint64_t mx64 = 0
    cdef Py_ssize_t c = tid, t, lo, n, done = 0
    if h == NULL:
        maxkey[0] = <uint64_t>-1
        return
    while c < pl.n_chunks:
        t, lo, n = pl.chunk[3 * c], pl.chunk[3 * c + 1], pl.chunk[3 * c + 2]
        if f64:
            fo_cpu_mag_hist_f64(<double *>pl.ptr[t] + lo, n, shift, pmask, prefix, h, &mx64)
        else:
            fo_cpu_mag_hist_f32(<float *>pl.ptr[t] + lo, n, shift, <uint32_t>pmask,
                                <uint32_t>prefix, h, &mx32)
        done += n
        c += nt
        if done >= flush or c >= pl.n_chunks:
            _flush(h, total)
            done = 0
    maxkey[0] = mx64 if f64 else mx32
    free(h)


cdef void _flush(uint32_t *h, uint64_t *total) noexcept nogil:
    cdef Py_ssize_t b, j
    for j in range(4):
        for b in range(BINS):
            total[b] += h[j * BINS + b]
            h[j * BINS + b] = 0


def ties(list arrays, uint64_t thr, int n_threads):
    """How many keys equal `thr` in each FO_CHUNK chunk (tensor by tensor), int64."""
    import numpy as np
    cdef Plan pl
    cdef bint f64 = len(arrays) > 0 and cnp.PyArray_ITEMSIZE(<cnp.ndarray?>arrays[0]) == 8
    cdef Py_ssize_t c, t, lo, n
    cdef cnp.int64_t[::1] out
    plan_init(&pl, (arrays,), 8 if f64 else 4)
    try:
        counts = np.zeros(pl.n_chunks, np.int64)
        out = counts
        with nogil:
            for c in prange(pl.n_chunks, num_threads=_threads(&pl, n_threads), schedule='static'):
                t, lo, n = pl.chunk[3 * c], pl.chunk[3 * c + 1], pl.chunk[3 * c + 2]
                if f64:
                    out[c] = fo_cpu_mag_ties_f64(<double *>pl.ptr[t] + lo, n, thr)
                else:
                    out[c] = fo_cpu_mag_ties_f32(<float *>pl.ptr[t] + lo, n, <uint32_t>thr)
    finally:
        plan_free(&pl)
    return counts


def mask(list arrays, list masks, uint64_t thr, const cnp.int64_t[::1] tie_modes,
         int n_threads):
    """Write the keep-masks (one byte per element): keys above `thr` kept, below pruned;
    keys equal to it per chunk's tie mode (fo_cpu_mag_mask): -1 prune all, 0 keep all,
    r > 0 prune the chunk's first r."""
    cdef Plan pl
    cdef bint f64 = len(arrays) > 0 and cnp.PyArray_ITEMSIZE(<cnp.ndarray?>arrays[0]) == 8
    cdef Py_ssize_t c, t, lo, n
    plan_init(&pl, (arrays, masks), 8 if f64 else 4, 0, 1)
    try:
        if tie_modes.shape[0] != pl.n_chunks:
            raise ValueError(f"tie_modes: expected {pl.n_chunks} values, one per chunk")
        with nogil:
            for c in prange(pl.n_chunks, num_threads=_threads(&pl, n_threads), schedule='static'):
                t, lo, n = pl.chunk[3 * c], pl.chunk[3 * c + 1], pl.chunk[3 * c + 2]
                if f64:
                    fo_cpu_mag_mask_f64(<double *>pl.ptr[2 * t] + lo, n, thr, tie_modes[c],
                                        <uint8_t *>pl.ptr[2 * t + 1] + lo)
                else:
                    fo_cpu_mag_mask_f32(<float *>pl.ptr[2 * t] + lo, n, <uint32_t>thr,
                                        tie_modes[c], <uint8_t *>pl.ptr[2 * t + 1] + lo)
    finally:
        plan_free(&pl)
