"""The Numba backend's kernels for fastopt.prune: the counting passes of the magnitude
select (fastopt/prune.h), written out again in Numba, one parallel call per tensor; the
select itself is fastopt._backends._select's, shared with the Cython backend. Re-exported
by fastopt._backends._numba."""

import numba
import numpy as np
from numba import njit, prange

from fastopt._backends._numpy import CHUNK
from fastopt._backends._select import DIGIT_BITS, key_bits

_JIT = dict(cache=True, error_model="numpy")
MIN_PER_THREAD = 32768
BINS = 2 ** DIGIT_BITS


def _keys(a):
    """The float array's bits as unsigned integers (the sign is cleared in the kernels)."""
    return a.view(np.uint64 if a.dtype.itemsize == 8 else np.uint32)


def _scalar(value, keys):
    return keys.dtype.type(value)


@njit(parallel=True, **_JIT)
def _hist(keys, absmask, shift, dmask, pmask, prefix, n_blocks):
    n = keys.size
    hist = np.zeros((n_blocks, dmask + 1), np.int64)
    maxkey = np.zeros(n_blocks, keys.dtype)
    for b in prange(n_blocks):
        mx = keys.dtype.type(0)
        for i in range(b * n // n_blocks, (b + 1) * n // n_blocks):
            k = keys[i] & absmask
            if (k & pmask) == prefix:
                hist[b, (k >> shift) & dmask] += 1
            mx = max(mx, k)
        maxkey[b] = mx
    return hist.sum(axis=0), maxkey.max()


@njit(parallel=True, **_JIT)
def _ties(keys, absmask, thr):
    n_chunks = (keys.size + CHUNK - 1) // CHUNK
    out = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        count = 0
        for i in range(c * CHUNK, min((c + 1) * CHUNK, keys.size)):
            count += (keys[i] & absmask) == thr
        out[c] = count
    return out


@njit(parallel=True, **_JIT)
def _mask(keys, absmask, thr, modes, mask):
    for c in prange(modes.size):
        ties = modes[c]
        for i in range(c * CHUNK, min((c + 1) * CHUNK, keys.size)):
            k = keys[i] & absmask
            if ties < 0:
                mask[i] = k > thr
            elif ties == 0:
                mask[i] = k >= thr
            else:
                tie = k == thr
                mask[i] = k > thr or (tie and ties <= 0)
                ties -= tie


def _threads(n_threads, size):
    n = max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS, size // MIN_PER_THREAD))
    numba.set_num_threads(n)
    return n


def _absmask(keys):
    return _scalar(2 ** key_bits(np.float64 if keys.dtype.itemsize == 8 else np.float32)[0] - 1,
                   keys)


def prune_hist(arrays, shift, pmask, prefix, n_threads):
    total, maxkey = np.zeros(BINS, np.int64), 0
    for a in arrays:
        keys = _keys(a)
        s = lambda v: _scalar(v, keys)  # noqa: E731
        counts, mx = _hist(keys, _absmask(keys), s(shift), s(BINS - 1), s(pmask), s(prefix),
                           _threads(n_threads, a.size))
        total += counts
        maxkey = max(maxkey, int(mx))
    return total, maxkey


def prune_ties(arrays, thr, n_threads):
    out = []
    for a in arrays:
        keys = _keys(a)
        _threads(n_threads, a.size)
        out.append(_ties(keys, _absmask(keys), _scalar(thr, keys)))
    return np.concatenate(out)


def prune_mask(arrays, masks, thr, tie_modes, n_threads):
    start = 0
    for a, m in zip(arrays, masks):
        keys = _keys(a)
        n_chunks = -(-a.size // CHUNK)
        _threads(n_threads, a.size)
        _mask(keys, _absmask(keys), _scalar(thr, keys), tie_modes[start:start + n_chunks], m)
        start += n_chunks
