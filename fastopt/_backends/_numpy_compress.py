"""The NumPy reference of the compression kernels (pruning, quantization, distillation),
re-exported by fastopt._backends._numpy: plain NumPy, the spec the compiled backends are
tested against."""

import numpy as np

from fastopt._backends._select import key_bits


# -- pruning (kernels/include/fastopt/prune.h)

def magnitude_keys(a):
    """A float array's magnitude keys: its bits without the sign, as unsigned integers."""
    bits, _ = key_bits(a.dtype)
    utype = np.uint64 if bits == 63 else np.uint32
    return a.reshape(-1).view(utype) & utype(2 ** bits - 1)


def magnitude_masks(arrays, masks, k, *, check_nan=True, n_threads=1):
    """Keep-masks (one byte per element) pruning the k smallest magnitudes of the flat
    `arrays`: a stable sort of the keys, so ties go to the earlier element (tensor by
    tensor, then index). False, masks unwritten, if check_nan and a magnitude is NaN."""
    _, inf_key = key_bits(arrays[0].dtype)
    keys = np.concatenate([magnitude_keys(a) for a in arrays])
    if check_nan and keys.size and keys.max() > inf_key:
        return False
    keep = np.ones(keys.size, np.uint8)
    keep[np.argsort(keys, kind="stable")[:k]] = 0
    start = 0
    for m in masks:
        m[...] = keep[start:start + m.size]
        start += m.size
    return True
