"""Muon's Newton-Schulz orthogonalization, on the array library's own BLAS (NumPy's, CuPy's),
shared by the NumPy reference and the compiled backends' Muon driver.

The elementwise passes around it are fastopt kernels (bit-identical on every backend); the
matrix products are the library's GEMM, whose summation order is its own: the CPU backends
share NumPy's and so agree bit for bit, CuPy's cuBLAS agrees to rounding.
"""

import numpy as np

from fastopt import _scalars
from fastopt._backends._layout import CHUNK

_BF16_MASK = np.uint32(0xFFFF0000)


def round_bf16(x):
    """float32 array `x` rounded to the nearest bfloat16 (ties to even), kept as float32: what
    torch's bfloat16 operations store. NaN stays NaN."""
    xp = _xp(x)
    bits = x.view(xp.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) & _BF16_MASK
    return xp.where(xp.isnan(x), x, rounded.view(xp.float32))


def ns_input(u, ns_dtype):
    """Matrix `u` in the dtype the iteration runs in: ``ns_dtype`` None keeps `u`'s,
    "float32" casts to float32, "bfloat16" rounds to bfloat16 values (kept as float32)."""
    if ns_dtype is None:
        return u
    x = u.astype(np.float32, copy=False)
    return round_bf16(x) if ns_dtype == "bfloat16" else x


def newton_schulz(x, norm, coefficients, steps, eps, bf16, dtype):
    """The orthogonalized update of matrix `x` (from ns_input), as a new C-contiguous array
    of `dtype`, as torch.optim.Muon computes it: transposed when it has more rows than
    columns, divided by its Frobenius norm `norm` (at least `eps`), then `steps` iterations
    of X <- a X + (b A + c A A) X with A = X X^T. With `bf16` every operation's result is
    rounded to bfloat16, as torch's bfloat16 run (torch's only one) stores it; its products
    are float32 GEMMs of bfloat16 values (exact products, float32 sums)."""
    xp = _xp(x)
    s = x.dtype.type
    a, b, c = (s(k) for k in coefficients)

    def stored(y):
        return round_bf16(y) if bf16 else y

    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = stored(x / stored(xp.asarray(max(s(norm), s(eps)))))
    for _ in range(steps):
        gram = stored(x @ x.T)
        gram = stored(b * gram + c * (gram @ gram))
        x = stored(a * x + gram @ x)
    return xp.ascontiguousarray((x.T if tall else x).astype(dtype, copy=False))


def orthogonalized(updates, norm_partials, coefficients, steps, eps, ns_dtype):
    """Each of `updates` (matrices) through newton_schulz in `ns_dtype`, back in its own
    dtype, divided by its Frobenius norm in the fixed summation order: `norm_partials(arrays)`
    is the backend's per-chunk sums of squares (the NumPy reference's, or a compiled
    backend's, which give the same)."""
    inputs = [ns_input(u, ns_dtype) for u in updates]
    norms = _scalars.tensor_norms(norm_partials(inputs), [x.size for x in inputs], CHUNK)
    return [newton_schulz(x, norm, coefficients, steps, eps, ns_dtype == "bfloat16", u.dtype)
            for u, x, norm in zip(updates, inputs, norms)]


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy
    return cupy
