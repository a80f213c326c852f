"""The magnitude select of fastopt.prune (kernels/include/fastopt/prune.h), written once for
the compiled backends; each supplies its counting passes:

- ``prune_hist(arrays, shift, pmask, prefix, n_threads)`` -> (FO_DIGIT_BINS counts, max key):
  the histogram of the digit at `shift` of the keys matching the prefix so far;
- ``prune_ties(arrays, thr, n_threads)`` -> how many keys equal `thr`, per FO_CHUNK chunk;
- ``prune_mask(arrays, masks, thr, tie_modes, n_threads)``: the keep-masks.

A radix select, most significant digit first: each counting pass narrows the k-th smallest
key to one digit value, so float32 takes 2 passes and float64 4, whatever the data, plus
one pass to write the masks (and one to count ties per chunk, only when the threshold's
ties are split between pruned and kept). Counts are integers: no result depends on the
thread count.
"""

import numpy as np

DIGIT_BITS = 16  # FO_DIGIT_BITS
CHUNK = 16384  # FO_CHUNK: the chunks prune_ties reports


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


def magnitude_masks(backend, arrays, masks, k, *, check_nan=True, n_threads):
    """Write keep-masks pruning the k smallest magnitudes of `arrays` (one dtype), ties to
    the earlier element; False (masks unwritten) if check_nan and an array holds NaN."""
    bits, inf_key = key_bits(arrays[0].dtype)
    total = sum(a.size for a in arrays)
    prefix = pmask = 0
    rank = k  # the wanted key's rank among the keys matching the prefix, from 1
    counts = None
    for j, shift in enumerate(_shifts(bits)):
        counts, maxkey = backend.prune_hist(arrays, shift, pmask, prefix, n_threads)
        if j == 0 and check_nan and maxkey > inf_key:
            return False
        if k in (0, total):
            break
        cum = np.cumsum(counts)
        digit = int(np.searchsorted(cum, rank))
        rank -= int(cum[digit - 1]) if digit else 0
        prefix |= digit << shift
        pmask |= (2 ** DIGIT_BITS - 1) << shift
    if k == 0:  # keep everything: keys >= 0
        thr, modes = 0, np.zeros(n_chunks(arrays), np.int64)
    elif k == total:  # prune everything: no key is above the largest
        thr, modes = 2 ** bits - 1, np.full(n_chunks(arrays), -1, np.int64)
    else:
        thr = prefix
        all_ties = int(counts[prefix & (2 ** DIGIT_BITS - 1)])
        if rank == all_ties:
            modes = np.full(n_chunks(arrays), -1, np.int64)
        else:
            modes = tie_modes(backend.prune_ties(arrays, thr, n_threads), rank)
    backend.prune_mask(arrays, masks, thr, modes, n_threads)
    return True


def n_chunks(arrays):
    """How many FO_CHUNK chunks the arrays make, each cut separately."""
    return sum(-(-a.size // CHUNK) for a in arrays)
