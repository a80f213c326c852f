# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Pruning on the CPU: the counting passes of the magnitude select (prune_loops.h) over
many tensors at once. fastopt._backends._select drives them; arguments are validated by
fastopt.prune."""

include "_plan.pxi"

from cython.parallel cimport parallel, threadid
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
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
                             uint8_t *m, int64_t pos0, fo_cands *c, int64_t *below,
                             uint32_t *maxkey)
    int fo_cpu_mag_split_f64(const double *x, Py_ssize_t n, uint64_t lo, uint64_t hi,
                             uint8_t *m, int64_t pos0, fo_cands *c, int64_t *below,
                             uint64_t *maxkey)
    ctypedef struct fo_nm_item:
        pass
    const int NM_MAX "FO_NM_MAX"
    void fo_cpu_nm_f32(const float *x, uint8_t *keep, Py_ssize_t C, int m, int n,
                       Py_ssize_t u0, Py_ssize_t u1, uint32_t *maxkey)
    void fo_cpu_nm_f64(const double *x, uint8_t *keep, Py_ssize_t C, int m, int n,
                       Py_ssize_t u0, Py_ssize_t u1, uint64_t *maxkey)
    void fo_cpu_nm_sorted_f32(const float *x, uint8_t *keep, Py_ssize_t C, int m, int n,
                              Py_ssize_t u0, Py_ssize_t u1, fo_nm_item *items,
                              uint32_t *maxkey)
    void fo_cpu_nm_sorted_f64(const double *x, uint8_t *keep, Py_ssize_t C, int m, int n,
                              Py_ssize_t u0, Py_ssize_t u1, fo_nm_item *items,
                              uint64_t *maxkey)
    uint32_t mag_key_f32 "fo_mag_key_f32"(float x)
    uint64_t mag_key_f64 "fo_mag_key_f64"(double x)
    int fo_cpu_split_simd()
    void prefetch_w "fo_prefetch_w"(const void *p)
    int fo_cpu_mag_split_simd_f32(const float *x, Py_ssize_t n, uint32_t lo, uint32_t hi,
                                  uint8_t *m, int64_t pos0, fo_cands *c, int64_t *below,
                                  uint32_t *maxkey)
    int fo_cpu_mag_split_simd_f64(const double *x, Py_ssize_t n, uint64_t lo, uint64_t hi,
                                  uint8_t *m, int64_t pos0, fo_cands *c, int64_t *below,
                                  uint64_t *maxkey)
    void fo_cpu_mag_mask_f32(const float *x, Py_ssize_t n, uint32_t thr, Py_ssize_t ties,
                             uint8_t *m)
    void fo_cpu_mag_mask_f64(const double *x, Py_ssize_t n, uint64_t thr, Py_ssize_t ties,
                             uint8_t *m)


SIMD = fo_cpu_split_simd()  # whether the split pass packs its candidates with AVX-512
SETTLE_PER_THREAD = 32768  # settle()'s candidates per thread, at least
cdef Py_ssize_t SETTLE_AHEAD = 16  # settle() prefetches the mask byte this many candidates on
SAMPLE_PER_THREAD = 1024  # sample()'s runs per thread, at least
SAMPLE_RUN_BYTES = 64  # sample()'s runs: a cache line's worth of elements


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


def split(list arrays, list masks, uint64_t lo, uint64_t hi, int n_threads, bint simd=True):
    """(keys, positions, below, maxkey): write the keep-masks of every key outside [lo, hi]
    (1 above, 0 below; 0 for now inside), and return the keys inside with their flat
    positions across `arrays` (tensor by tensor), in that order, how many keys are below lo
    and the largest key. Each thread takes one contiguous range of chunks, so its
    candidates follow the previous thread's. `simd`: with AVX-512 where the CPU has it
    (SIMD), else (tests) the portable loop, to the same results."""
    import numpy as np
    cdef Plan pl
    cdef bint f64 = len(arrays) > 0 and cnp.PyArray_ITEMSIZE(<cnp.ndarray?>arrays[0]) == 8
    cdef Py_ssize_t keysize = 8 if f64 else 4, total = 0, at = 0, t
    cdef int nt, tid
    cdef bint vec = simd and SIMD
    cdef int[::1] failed
    cdef fo_cands *cands = NULL
    cdef int64_t[::1] starts, below
    cdef uint64_t[::1] maxkey
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
        below_ = np.zeros(nt, np.int64)
        below = below_
        maxkey_ = np.zeros(nt, np.uint64)
        maxkey = maxkey_
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            failed[tid] = _split_thread(&pl, tid, nt, f64, vec, lo, hi, &starts[0],
                                        cands + tid, &below[tid], &maxkey[tid])
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
    return keys, pos, int(below_.sum()), int(maxkey_.max(initial=0))


cdef int _split_thread(const Plan *pl, int tid, int nt, bint f64, bint simd, uint64_t lo,
                       uint64_t hi,
                       const int64_t *starts, fo_cands *c, int64_t *below,
                       uint64_t *maxkey) noexcept nogil:
    """Thread tid's chunks of split(): the tid-th of nt contiguous ranges, its count of keys
    below lo into *below and its largest key into *maxkey; -1 if out of memory."""
    cdef Py_ssize_t ch, t, off, n
    cdef uint32_t mx32 = 0
    cdef char *x
    cdef uint8_t *m
    for ch in range(tid * pl.n_chunks // nt, (tid + 1) * pl.n_chunks // nt):
        t, off, n = pl.chunk[3 * ch], pl.chunk[3 * ch + 1], pl.chunk[3 * ch + 2]
        x = pl.ptr[2 * t]
        m = <uint8_t *>pl.ptr[2 * t + 1] + off
        if f64 and simd:
            if fo_cpu_mag_split_simd_f64(<double *>x + off, n, lo, hi, m, starts[t] + off, c,
                                         below, maxkey):
                return -1
        elif f64:
            if fo_cpu_mag_split_f64(<double *>x + off, n, lo, hi, m, starts[t] + off, c,
                                    below, maxkey):
                return -1
        elif simd:
            if fo_cpu_mag_split_simd_f32(<float *>x + off, n, <uint32_t>lo, <uint32_t>hi, m,
                                         starts[t] + off, c, below, &mx32):
                return -1
        elif fo_cpu_mag_split_f32(<float *>x + off, n, <uint32_t>lo, <uint32_t>hi, m,
                                  starts[t] + off, c, below, &mx32):
            return -1
    if not f64:
        maxkey[0] = mx32
    return 0


def settle(list masks, keys, const int64_t[::1] pos, uint64_t thr, Py_ssize_t ties,
           int n_threads):
    """Set to 1 the keep-masks, at the flat positions `pos` (ascending, across `masks`), of
    the candidate `keys` (uint32 or uint64, as split() returns them, whose masks it left 0)
    above `thr`, and of those equal to it all but the first `ties`. Each thread takes a
    contiguous range of the candidates, with the count of ties before it."""
    import numpy as np
    cdef Py_ssize_t n = pos.shape[0]
    cdef int nt = max(1, min(n_threads, n // SETTLE_PER_THREAD)), tid
    cdef bint f64 = keys.dtype.itemsize == 8
    cdef int64_t[::1] cuts, left, bounds
    cdef Py_ssize_t[::1] ptrs
    if keys.shape[0] != n:
        raise ValueError("keys: expected one per position")
    if n == 0:
        return
    cuts_ = np.arange(nt + 1, dtype=np.int64) * n // nt
    cuts = cuts_
    eq = [np.count_nonzero(keys[cuts_[t]:cuts_[t + 1]] == thr) for t in range(nt)]
    left_ = ties - np.cumsum([0] + eq[:-1], dtype=np.int64)  # the ties each range prunes
    left = left_
    bounds_ = np.cumsum([0] + [mk.size for mk in masks], dtype=np.int64)
    bounds = bounds_
    ptrs_ = np.array([<Py_ssize_t>cnp.PyArray_DATA(<cnp.ndarray?>mk) for mk in masks], np.intp)
    ptrs = ptrs_
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        _settle_range(cnp.PyArray_DATA(<cnp.ndarray>keys), f64, &pos[0], cuts[tid],
                      cuts[tid + 1], thr, left[tid], &bounds[0], <uint8_t **>&ptrs[0])


cdef void _settle_range(const void *keys, bint f64, const int64_t *pos, Py_ssize_t a,
                        Py_ssize_t b, uint64_t thr, Py_ssize_t ties, const int64_t *bounds,
                        uint8_t **masks) noexcept nogil:
    """settle() over candidates a .. b - 1, the first `ties` of its keys equal to thr pruned
    (none if ties <= 0)."""
    cdef Py_ssize_t j, t = 0
    cdef uint64_t k
    while pos[a] >= bounds[t + 1]:
        t += 1
    for j in range(a, b):
        if j + SETTLE_AHEAD < b:  # the writes miss the cache: start them early
            prefetch_w(&masks[t][pos[j + SETTLE_AHEAD] - bounds[t]])
        while pos[j] >= bounds[t + 1]:
            t += 1
        k = (<const uint64_t *>keys)[j] if f64 else (<const uint32_t *>keys)[j]
        if k > thr:
            masks[t][pos[j] - bounds[t]] = 1
        elif k == thr:
            if ties <= 0:
                masks[t][pos[j] - bounds[t]] = 1
            ties -= 1


def sample(list arrays, Py_ssize_t n, int n_threads):
    """The magnitude keys (uint32 for float32 arrays, uint64 for float64) of about n
    elements spread over `arrays` (flat, one after another), in runs of SAMPLE_RUN_BYTES
    bytes' worth of consecutive elements (a cache line each, rather than n misses), one
    row per run: run i starts in the i-th of the equal ranges of the positions (leaving
    room for a run at the end), at the fraction of the range given by the fractional part of i times the
    golden ratio (i * 0x9E3779B9 mod 2**32, over 2**32): evenly spread, and in no period
    that a weight's rows could share."""
    import numpy as np
    cdef bint f64 = cnp.PyArray_ITEMSIZE(<cnp.ndarray?>arrays[0]) == 8
    cdef Py_ssize_t run = SAMPLE_RUN_BYTES // (8 if f64 else 4), runs = n // run
    cdef int nt = max(1, min(n_threads, runs // SAMPLE_PER_THREAD)), tid
    cdef int64_t[::1] bounds
    cdef Py_ssize_t[::1] ptrs
    cdef cnp.ndarray keys = np.empty((runs, run), np.uint64 if f64 else np.uint32)
    bounds_ = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
    bounds = bounds_
    ptrs_ = np.array([<Py_ssize_t>cnp.PyArray_DATA(<cnp.ndarray?>a) for a in arrays], np.intp)
    ptrs = ptrs_
    span = int(bounds_[-1]) - run  # the runs' starts: 0 .. span
    if runs < 1 or runs > span or span * runs >= 2 ** 63:
        raise ValueError(f"n: expected {run} <= n <= {max(span, 0) * run}, runs of {run}")
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        _sample_range(f64, &bounds[0], <char **>&ptrs[0], bounds[bounds.shape[0] - 1] - run,
                      run, runs, tid * runs // nt, (tid + 1) * runs // nt,
                      cnp.PyArray_DATA(keys))
    return keys


cdef void _sample_range(bint f64, const int64_t *bounds, char **ptrs, int64_t span,
                        Py_ssize_t run, Py_ssize_t runs, Py_ssize_t a, Py_ssize_t b,
                        void *keys) noexcept nogil:
    """sample()'s runs a .. b - 1, starting in [0, span] (bounds: the arrays' first flat
    positions, then the total). A run may reach past the next one's start."""
    cdef Py_ssize_t i, j, t = 0
    cdef int64_t start, end, p
    cdef uint64_t frac
    for i in range(a, b):
        start = i * span // runs
        end = (i + 1) * span // runs
        frac = (<uint64_t>i * 0x9E3779B9u) & 0xFFFFFFFFu
        p = start + <int64_t>((frac * <uint64_t>(end - start)) >> 32)
        while p < bounds[t]:  # the last run reached into a later array
            t -= 1
        for j in range(i * run, (i + 1) * run):
            while p >= bounds[t + 1]:
                t += 1
            if f64:
                (<uint64_t *>keys)[j] = mag_key_f64((<const double *>ptrs[t])[p - bounds[t]])
            else:
                (<uint32_t *>keys)[j] = mag_key_f32((<const float *>ptrs[t])[p - bounds[t]])
            p += 1


def nm(x, keep, int n, int m, Py_ssize_t C, int n_threads):
    """N:M keep-masks (prune_loops.h, fastopt._backends._numpy.compress.nm_masks): `x` flat
    and contiguous (float32 or float64) as groups of m rows of C elements, `keep` uint8 of
    its size; returns the largest magnitude key. Each thread takes a contiguous range of
    the groups."""
    import numpy as np
    cdef cnp.ndarray xa = <cnp.ndarray?>x, ka = <cnp.ndarray?>keep
    cdef bint f64 = cnp.PyArray_ITEMSIZE(xa) == 8
    cdef Py_ssize_t groups = cnp.PyArray_SIZE(xa) // (m * C)
    cdef int nt = max(1, min(n_threads, cnp.PyArray_SIZE(xa) // MIN_PER_THREAD, groups)), tid
    cdef int[::1] failed
    cdef uint64_t[::1] maxkey
    if cnp.PyArray_SIZE(ka) != cnp.PyArray_SIZE(xa) or groups * m * C != cnp.PyArray_SIZE(xa):
        raise ValueError("keep: expected x's size, a whole number of groups")
    failed_ = np.zeros(nt, np.intc)
    failed = failed_
    maxkey_ = np.zeros(nt, np.uint64)
    maxkey = maxkey_
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        failed[tid] = _nm_range(cnp.PyArray_DATA(xa), <uint8_t *>cnp.PyArray_DATA(ka), f64,
                                C, m, n, tid * groups // nt, (tid + 1) * groups // nt,
                                &maxkey[tid])
    if failed_.any():
        raise MemoryError("no memory for nm_mask's groups")
    return int(maxkey_.max())


cdef int _nm_range(const void *x, uint8_t *keep, bint f64, Py_ssize_t C, int m, int n,
                   Py_ssize_t u0, Py_ssize_t u1, uint64_t *maxkey) noexcept nogil:
    """nm()'s groups u0 .. u1 - 1, their largest key into *maxkey; -1 if out of memory"""
    cdef fo_nm_item *items = NULL
    cdef uint32_t mx32 = 0
    if m > NM_MAX:
        items = <fo_nm_item *>malloc(m * sizeof(fo_nm_item))
        if items == NULL:
            return -1
    if f64 and items == NULL:
        fo_cpu_nm_f64(<const double *>x, keep, C, m, n, u0, u1, maxkey)
    elif f64:
        fo_cpu_nm_sorted_f64(<const double *>x, keep, C, m, n, u0, u1, items, maxkey)
    elif items == NULL:
        fo_cpu_nm_f32(<const float *>x, keep, C, m, n, u0, u1, &mx32)
    else:
        fo_cpu_nm_sorted_f32(<const float *>x, keep, C, m, n, u0, u1, items, &mx32)
    if not f64:
        maxkey[0] = mx32
    free(items)
    return 0
