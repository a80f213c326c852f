"""The magnitude select of fastopt.prune (kernels/include/fastopt/prune.h), written once for
the compiled backends; each supplies its counting passes (the SelectPasses contract of
fastopt._backends._contracts: prune_hist, prune_ties, prune_mask, and optionally prune_split,
which writes the masks of every key outside [lo, hi] (1 above, 0 below) and returns the keys
inside with their flat positions across the arrays, in order).

A radix select, most significant digit first: each counting pass narrows the k-th smallest
key to one digit value, so float32 takes 2 passes and float64 4, whatever the data, plus
one pass to write the masks (and one to count ties per chunk, only when the threshold's
ties are split between pruned and kept). After the first pass, only the keys sharing the
threshold's first digit are undecided; when they are few (at most 1/SPLIT_SHARE of all,
typical of real weights) and the backend has prune_split, one pass writes the masks and
collects them, and the rest of the select runs on that short array alone: 2 passes over
the weights in all, for either dtype. Counts are integers: no result depends on the thread
count.
"""

import numpy as np

from fastopt._backends._contracts import SelectPasses
from fastopt._backends._layout import CHUNK, DIGIT_BITS

SPLIT_SHARE = 16  # prune_split when at most 1/16 of the keys share the first digit's bin


def key_bits(dtype):
    """The bits of a magnitude key (the float's bits without the sign) and inf's key."""
    return (63, 0x7FF0000000000000) if np.dtype(dtype).itemsize == 8 else (31, 0x7F800000)


def _shifts(bits):
    shifts = list(range(bits - DIGIT_BITS, -1, -DIGIT_BITS))
    return shifts + [0] if shifts[-1] else shifts


def tie_modes(ties, r):
    """Per chunk, of its keys equal to the threshold: -1 prune all, 0 keep all, or prune the
    first m > 0, so that the first `r` ties in chunk order are pruned."""
    before = np.cumsum(ties) - ties
    take = np.clip(r - before, 0, ties)
    return np.where((take == ties) & (ties > 0), -1, take).astype(np.int64)


def magnitude_masks(backend: SelectPasses, arrays, masks, k, *, check_nan=True, n_threads):
    """Write keep-masks pruning the k smallest magnitudes of `arrays` (one dtype), ties to
    the earlier element; False (masks unwritten) if check_nan and an array holds NaN."""
    bits, inf_key = key_bits(arrays[0].dtype)
    total = sum(a.size for a in arrays)
    shifts = _shifts(bits)
    counts, maxkey = backend.prune_hist(arrays, shifts[0], 0, 0, n_threads)
    if check_nan and maxkey > inf_key:
        return False
    if k in (0, total):  # keep everything (keys >= 0) or prune everything (none is above)
        thr, mode = (0, 0) if k == 0 else (2 ** bits - 1, -1)
        backend.prune_mask(arrays, masks, thr, np.full(n_chunks(arrays), mode, np.int64),
                           n_threads)
        return True
    digit, rank = _digit(counts, k)
    prefix, pmask = digit << shifts[0], (2 ** DIGIT_BITS - 1) << shifts[0]
    split = getattr(backend, "prune_split", None)
    if split is None or counts[digit] > total // SPLIT_SHARE:
        _narrow(backend, arrays, masks, rank, counts, shifts[1:], prefix, pmask, n_threads)
        return True
    keys, pos = split(arrays, masks, prefix, prefix | (2 ** shifts[0] - 1), n_threads)
    keep = np.empty(keys.size, np.uint8)
    _narrow(backend, [keys.view(arrays[0].dtype)], [keep], rank, counts, shifts[1:], prefix,
            pmask, n_threads)
    bounds = np.cumsum([0] + [m.size for m in masks])
    cuts = np.searchsorted(pos, bounds)
    for m, start, a, b in zip(masks, bounds, cuts[:-1], cuts[1:]):
        m[pos[a:b] - start] = keep[a:b]
    return True


def _digit(counts, rank):
    """The digit holding the rank-th smallest key (from 1) and that key's rank among the
    keys with that digit."""
    cum = np.cumsum(counts)
    digit = int(np.searchsorted(cum, rank))
    return digit, rank - (int(cum[digit - 1]) if digit else 0)


def _narrow(backend, arrays, masks, rank, counts, shifts, prefix, pmask, n_threads):
    """The select after its first digit (`counts` its histogram; `prefix` under `pmask` the
    digit found, `rank` the wanted key's rank among the keys matching it): a counting pass
    per remaining digit, then the masks."""
    for shift in shifts:
        counts, _ = backend.prune_hist(arrays, shift, pmask, prefix, n_threads)
        digit, rank = _digit(counts, rank)
        prefix |= digit << shift
        pmask |= (2 ** DIGIT_BITS - 1) << shift
    if rank == int(counts[prefix & (2 ** DIGIT_BITS - 1)]):  # the last digit is at shift 0
        modes = np.full(n_chunks(arrays), -1, np.int64)
    else:
        modes = tie_modes(backend.prune_ties(arrays, prefix, n_threads), rank)
    backend.prune_mask(arrays, masks, prefix, modes, n_threads)


def n_chunks(arrays):
    """How many FO_CHUNK chunks the arrays make, each cut separately."""
    return sum(-(-a.size // CHUNK) for a in arrays)
