# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Pruning on the CPU: the counting passes of the magnitude select (prune_loops.h) over
many tensors at once. fastopt._backends._select drives them; arguments are validated by
fastopt.prune."""

include "_plan.pxi"

from cython.parallel cimport parallel, threadid
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

cdef extern from "prune_loops.h" nogil:
    const int BINS "FO_DIGIT_BINS"
    const int TABLES "FO_HIST_TABLES"
    uint32_t *hist_tables "fo_cpu_hist_tables"()
    uint64_t *hist_totals "fo_cpu_hist_totals"(uint32_t *tables)
    void fo_cpu_mag_hist_f32(const float *x, Py_ssize_t n, int shift, uint32_t pmask,
                             uint32_t prefix, uint32_t *h, uint32_t *maxkey)
    void fo_cpu_mag_hist_f64(const double *x, Py_ssize_t n, int shift, uint64_t pmask,
                             uint64_t prefix, uint32_t *h, uint64_t *maxkey)
    Py_ssize_t fo_cpu_mag_ties_f32(const float *x, Py_ssize_t n, uint32_t thr)
    Py_ssize_t fo_cpu_mag_ties_f64(const double *x, Py_ssize_t n, uint64_t thr)
    ctypedef struct fo_cands:
        void *keys
        int64_t *pos
        Py_ssize_t n
    int fo_cpu_mag_split_f32(const float *x, Py_ssize_t n, uint32_t lo, uint32_t hi,
                             uint8_t *m, int64_t pos0, fo_cands *c)
    int fo_cpu_mag_split_f64(const double *x, Py_ssize_t n, uint64_t lo, uint64_t hi,
                             uint8_t *m, int64_t pos0, fo_cands *c)
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
    cdef int nt, tid, k
    cdef Py_ssize_t b
    cdef uint64_t sum_
    cdef cnp.ndarray maxkeys, totals, counts = np.empty(BINS, np.int64)
    cdef uint64_t **tot
    plan_init(&pl, (arrays,), 8 if f64 else 4)
    try:
        nt = _threads(&pl, n_threads)
        maxkeys = np.zeros(nt, np.uint64)
        totals = np.zeros(nt, np.uintp)  # each thread's uint64 histogram (its own buffer)
        tot = <uint64_t **>cnp.PyArray_DATA(totals)
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            _hist_thread(&pl, tid, nt, f64, shift, pmask, prefix, tot + tid,
                         <uint64_t *>cnp.PyArray_DATA(maxkeys) + tid)
        with nogil:  # written, never read first: no copy-on-write faults on fresh pages
            for b in range(BINS):
                sum_ = 0
                for k in range(nt):
                    if tot[k] != NULL:  # NULL: that thread had no buffers
                        sum_ += tot[k][b]
                        tot[k][b] = 0
                (<cnp.int64_t *>cnp.PyArray_DATA(counts))[b] = sum_
    finally:
        plan_free(&pl)
    if (maxkeys == np.uint64(2 ** 64 - 1)).any():  # after the other threads' totals are zero
        raise MemoryError("no memory for the select's histograms")
    return counts, int(maxkeys.max(initial=0))


cdef void _hist_thread(const Plan *pl, int tid, int nt, bint f64, int shift, uint64_t pmask,
                       uint64_t prefix, uint64_t **total, uint64_t *maxkey) noexcept nogil:
    """Thread tid's share of hist(): chunks tid, tid + nt, ... counted into its own
    interleaved uint32 histograms, flushed into its uint64 histogram (`*total` on return)
    before they could overflow and at the end."""
    cdef Py_ssize_t flush = <Py_ssize_t>1 << 31
    cdef uint32_t *h = hist_tables()
    cdef uint32_t mx32 = 0
    cdef uint64_t mx64 = 0
    cdef Py_ssize_t c = tid, t, lo, n, done = 0
    if h == NULL:
        maxkey[0] = <uint64_t>-1
        return
    total[0] = hist_totals(h)
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
            _flush(h, total[0])
            done = 0
    maxkey[0] = mx64 if f64 else mx32


cdef void _flush(uint32_t *h, uint64_t *total) noexcept nogil:
    cdef Py_ssize_t b, j
    for j in range(TABLES):
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


def split(list arrays, list masks, uint64_t lo, uint64_t hi, int n_threads):
    """(keys, positions): write the keep-masks of every key outside [lo, hi] (1 above, 0
    below; 0 for now inside), and return the keys inside with their flat positions across
    `arrays` (tensor by tensor), in that order. Each thread takes one contiguous range of
    chunks, so its candidates follow the previous thread's."""
    import numpy as np
    cdef Plan pl
    cdef bint f64 = len(arrays) > 0 and cnp.PyArray_ITEMSIZE(<cnp.ndarray?>arrays[0]) == 8
    cdef Py_ssize_t keysize = 8 if f64 else 4, total = 0, at = 0, t
    cdef int nt, tid
    cdef int[::1] failed
    cdef fo_cands *cands = NULL
    cdef int64_t[::1] starts
    cdef cnp.ndarray keys, pos
    plan_init(&pl, (arrays, masks), keysize, 0, 1)
    try:
        starts = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
        nt = _threads(&pl, n_threads)
        cands = <fo_cands *>calloc(nt, sizeof(fo_cands))
        if cands == NULL:
            raise MemoryError("no memory for the select's candidates")
        failed_ = np.zeros(nt, np.intc)  # per thread: the candidates could not grow
        failed = failed_
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            failed[tid] = _split_thread(&pl, tid, nt, f64, lo, hi, &starts[0], cands + tid)
        if failed_.any():
            raise MemoryError("no memory for the select's candidates")
        for tid in range(nt):
            total += cands[tid].n
        keys = np.empty(total, np.uint64 if f64 else np.uint32)
        pos = np.empty(total, np.int64)
        for tid in range(nt):
            memcpy(<char *>cnp.PyArray_DATA(keys) + at * keysize, cands[tid].keys,
                   cands[tid].n * keysize)
            memcpy(<int64_t *>cnp.PyArray_DATA(pos) + at, cands[tid].pos,
                   cands[tid].n * sizeof(int64_t))
            at += cands[tid].n
    finally:
        if cands != NULL:
            for tid in range(nt):
                free(cands[tid].keys)
                free(cands[tid].pos)
            free(cands)
        plan_free(&pl)
    return keys, pos


cdef int _split_thread(const Plan *pl, int tid, int nt, bint f64, uint64_t lo, uint64_t hi,
                       const int64_t *starts, fo_cands *c) noexcept nogil:
    """Thread tid's chunks of split(): the tid-th of nt contiguous ranges; -1 if out of
    memory."""
    cdef Py_ssize_t ch, t, off, n
    cdef char *x
    cdef uint8_t *m
    for ch in range(tid * pl.n_chunks // nt, (tid + 1) * pl.n_chunks // nt):
        t, off, n = pl.chunk[3 * ch], pl.chunk[3 * ch + 1], pl.chunk[3 * ch + 2]
        x = pl.ptr[2 * t]
        m = <uint8_t *>pl.ptr[2 * t + 1] + off
        if f64:
            if fo_cpu_mag_split_f64(<double *>x + off, n, lo, hi, m, starts[t] + off, c):
                return -1
        elif fo_cpu_mag_split_f32(<float *>x + off, n, <uint32_t>lo, <uint32_t>hi, m,
                                  starts[t] + off, c):
            return -1
    return 0
