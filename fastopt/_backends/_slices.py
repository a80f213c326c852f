"""Work items of the weight-norm slice sums (fastopt/wnorm.h), shared by the compiled
backends: item (b0, b1, k) computes the partials P[k, b0:b1]."""

import numpy as np

from fastopt._backends._layout import CHUNK

MIN_WORK = 16384  # elements per item, so that an item is worth a thread's while
MIN_RUN = 64  # contiguous elements per row of an item (a cache line of float32 or more)


def items(A, B, C):
    """(n, 3) int64 rows (b0, b1, k) covering every slice b and chunk k once."""
    K = max(-(-C // CHUNK), 1)
    length = min(C, CHUNK)
    width = min(B, max(-(-MIN_WORK // max(A * length, 1)), -(-MIN_RUN // length), 1))
    b0 = np.arange(0, B, width, dtype=np.int64)
    b0, k = np.repeat(b0, K), np.tile(np.arange(K, dtype=np.int64), len(b0))
    return np.stack([b0, np.minimum(b0 + width, B), k], axis=1)


def total(partials):
    """The partials (K, B) added in k order."""
    return np.add.accumulate(partials, axis=0)[-1]
