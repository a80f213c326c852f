"""The magnitude select of fastopt.prune (kernels/include/fastopt/prune.h), written once for
the compiled backends; each supplies its counting passes (the SelectPasses contract of
fastopt._backends._contracts: prune_hist, prune_ties, prune_mask, and optionally the split
group: prune_sample, prune_split, which writes the masks of every key outside [lo, hi] (1
above, 0 below) and returns the keys inside with their flat positions across the arrays,
in order, and prune_settle, which writes those keys' masks once the threshold is known).

With the split group, from SAMPLED_MIN keys: a sample (prune_sample, about 1 key in
SAMPLE_EVERY, at most SAMPLE, in runs of neighbours) brackets the k-th smallest key by its
ranks Z standard deviations either side (the deviation measured across the runs, as
neighbours may share a scale); one split pass over the weights writes the masks outside the
bracket and collects the keys inside (about 1% of them), a partition finds the threshold
among those, and prune_settle writes their masks: one pass over the weights, for either
dtype. Where the bracket would hold more than 1/SPLIT_SHARE of the keys (heavy ties) or
missed the threshold (the split pass's count below it tells), the radix select runs.

The radix select, most significant digit first: each counting pass narrows the k-th
smallest key to one digit value, so float32 takes 2 passes and float64 4, whatever the
data, plus one pass to write the masks (and one to count ties per chunk, only when the
threshold's ties are split between pruned and kept). After the first pass, only the keys
sharing the threshold's first digit are undecided; when they are few (at most
1/SPLIT_SHARE of all, typical of real weights) and the backend has the split group, the
split pass settles them as above: 2 passes over the weights. Counts are integers and the
sample's positions fixed: no result depends on the thread count, and every path gives the
same masks.
"""

import math

import numpy as np

from fastopt._backends._contracts import SelectPasses
from fastopt._backends._layout import CHUNK, DIGIT_BITS

SPLIT_SHARE = 16  # prune_split when at most 1/16 of the keys share the first digit's bin
SAMPLED_MIN = 1 << 18  # the sampled select (prune_split's backends) from this many keys
SAMPLE = 1 << 17  # keys sampled to bracket the threshold: at most this many,
SAMPLE_EVERY = 64  # and one in this many
Z = 3.5  # the bracket's half-width in standard deviations of the sample's rank


def key_bits(dtype):
    """The bits of a magnitude key (the float's bits without the sign) and inf's key."""
    return (63, 0x7FF0000000000000) if np.dtype(dtype).itemsize == 8 else (31, 0x7F800000)


def magnitude(key, dtype):
    """The magnitude (a float) whose key is `key`: NaN for keys above inf's."""
    utype = np.uint64 if np.dtype(dtype).itemsize == 8 else np.uint32
    return float(np.array(key, utype).view(dtype))


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
    the earlier element; False (masks not all written) if check_nan and an array holds
    NaN."""
    bits, inf_key = key_bits(arrays[0].dtype)
    total = sum(a.size for a in arrays)
    split = hasattr(backend, "prune_split")
    if split and 0 < k < total and total >= SAMPLED_MIN:
        done = _sampled(backend, arrays, masks, k, total, bits, inf_key, check_nan, n_threads)
        if done is not None:
            return done
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
    if not split or counts[digit] > total // SPLIT_SHARE:
        _narrow(backend, arrays, masks, rank, counts, shifts[1:], prefix, pmask, n_threads)
        return True
    _split(backend, arrays, masks, k, prefix, prefix | (2 ** shifts[0] - 1), n_threads)
    return True


def _split(backend, arrays, masks, k, lo, hi, n_threads):
    """The select's last pass, where the k-th smallest key is expected in [lo, hi], which
    holds few keys: prune_split writes the masks outside it and collects the keys inside
    (with their positions), the threshold among those is found by a partition, and
    prune_settle writes their masks. Returns (done, maxkey): done False where the k-th key
    was not in [lo, hi] (the masks are then to be written again)."""
    keys, pos, below, maxkey = backend.prune_split(arrays, masks, lo, hi, n_threads)
    rank = k - below
    if not 0 < rank <= keys.size:
        return False, maxkey
    thr = np.partition(keys, rank - 1)[rank - 1]
    backend.prune_settle(masks, keys, pos, int(thr), rank - int(np.count_nonzero(keys < thr)),
                         n_threads)
    return True, maxkey


def _sampled(backend, arrays, masks, k, total, bits, inf_key, check_nan, n_threads):
    """The select in one pass over the weights, where a sample brackets the threshold: the
    keys at spread positions (prune_sample) give [lo, hi], which holds the k-th smallest key
    unless the sample's rank of it is off by more than Z standard deviations; _split then
    settles the keys inside. True or False as magnitude_masks, or None (masks unwritten,
    or to be written again) where the bracket would hold more than 1/SPLIT_SHARE of the
    keys or missed."""
    runs = backend.prune_sample(arrays, min(SAMPLE, total // SAMPLE_EVERY), n_threads)
    keys = runs.reshape(-1)
    if check_nan and keys.max() > inf_key:
        return False
    s, q = keys.size, k / total
    part = np.partition(keys, min(int(q * s), s - 1))
    # the sample's rank of the k-th key varies as s q (1 - q) for independent keys, more
    # where a run's neighbours share a scale (rows of their own scale): the spread of the
    # runs' counts below the estimate, times the number of runs, says by how much
    counts = np.count_nonzero(runs <= part[min(int(q * s), s - 1)], axis=1)
    spread = max(s * q * (1 - q), len(runs) * float(counts.var()))
    half = Z * spread ** 0.5 + 2
    at_lo, at_hi = math.floor(q * s - half), math.ceil(q * s + half)
    if at_lo >= 0:  # partitioned in place: the keys at_lo and above are those above lo
        part.partition(at_lo)
    lo = int(part[at_lo]) if at_lo >= 0 else 0
    if at_hi < s:
        part[max(at_lo, 0):].partition(at_hi - max(at_lo, 0))
    hi = int(part[at_hi]) if at_hi < s else 2 ** bits - 1
    if np.count_nonzero((keys >= lo) & (keys <= hi)) > s // SPLIT_SHARE:
        return None
    done, maxkey = _split(backend, arrays, masks, k, lo, hi, n_threads)
    if check_nan and maxkey > inf_key:
        return False
    return True if done else None


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
