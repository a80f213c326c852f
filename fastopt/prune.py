r"""Pruning: masks that remove weights, with torch.nn.utils.prune's amounts and semantics.

A mask is a ``bool`` (or ``uint8``) array of the weight's framework, device and shape: 1
keeps a weight, 0 prunes it. ``apply_mask_`` zeroes the pruned weights; an optimizer given
``masks=`` keeps them (and their optimizer state) at exactly zero after every step.

**Amounts** are as in torch: a float in ``[0, 1]`` is a fraction, rounded to a count with
Python's ``round`` (half to even): ``round(amount * n)``; an int is the count itself
(``0 <= amount <= n``).

**Exact counts and ties.** Exactly that many weights are pruned, and every pruned magnitude
is ``<=`` every kept one. Among equal magnitudes at the threshold, the weight earlier in
order is pruned first: C order inside a tensor, and tensor by tensor in the order given
(``global_magnitude_masks``). torch breaks such ties by ``topk``'s unspecified order, so
its masks agree with these wherever magnitudes are distinct.

**Selection in linear time.** From 2**18 weights (compiled backend with the split pass:
Cython), a sample of the magnitudes brackets the threshold and one pass over the weights
writes every mask outside the bracket and collects the few weights inside, whose select
finishes on them alone. Otherwise, or if the bracket missed, the threshold is found by a
radix select over the magnitudes' bits (``kernels/include/fastopt/prune.h``): counting
passes of 16-bit digits, most significant first (2 passes for float32, 4 for float64),
then one pass writes the masks. Both run in parallel across any number of tensors without
concatenating them, and give the same masks. NaN weights are refused (they have no
magnitude order); inf is the largest magnitude.

>>> import numpy as np, fastopt
>>> w = np.array([0.5, -0.1, 0.3, -0.7, 0.2], np.float32)
>>> fastopt.prune.magnitude_mask(w, 0.4)
array([ True, False,  True,  True, False])
>>> fastopt.prune.nm_mask(np.array([[1., -4., 3., 2.]]), n=2, m=4)
array([[False,  True,  True, False]])
"""

import math
import numbers

import numpy as np

from fastopt import _backends, _check, _interop
from fastopt._backends._layout import BITS
from fastopt._config import get_num_threads

__all__ = ["magnitude_mask", "global_magnitude_masks", "random_mask", "ln_structured_mask",
           "nm_mask", "apply_mask_", "apply_mask", "polynomial_sparsity"]

MASK_DTYPES = ("bool", "uint8")
RANDOM_STREAM = 2  # the Philox stream of random_mask's keys (init uses 0 and 1)


def n_to_prune(amount, n, name="amount"):
    """How many of `n` entries `amount` prunes (torch's rule): a count, or a fraction
    rounded half to even."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"{name} must be an int (a count) or a float in [0, 1] (a fraction), "
                        f"got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if not 0 <= amount <= n:
            raise ValueError(f"{name}={amount} is a count, and must be in [0, {n}] (the "
                             f"number of entries); pass a float for a fraction")
        return int(amount)
    amount = _check.real(name, amount, lo=0.0, hi=1.0)
    return round(amount * n)


def _mask_dtype(dtype):
    return np.dtype(_check.choice("dtype", dtype, MASK_DTYPES))


def _device(arr):
    return "cpu" if isinstance(arr, np.ndarray) else "cuda"


def _weights(ws, name):
    """Kernel views of a list of weights: one dtype and device."""
    views = [_interop.import_input(w, f"{name}[{i}]") for i, w in enumerate(ws)]
    for i, v in enumerate(views):
        if v.device != views[0].device or v.array.dtype != views[0].array.dtype:
            raise ValueError(f"{name}[{i}]: expected {views[0].array.dtype} on "
                             f"{views[0].device[0]} like {name}[0], got {v.array.dtype} on "
                             f"{v.device[0]}")
    return [v.array for v in views]


def _new_masks(arrays, ws, dtype):
    made = [_interop.new_array(a.shape, dtype, w) for a, w in zip(arrays, ws)]
    return [buf for buf, _ in made], [finish for _, finish in made]


def global_magnitude_masks(ws, amount, *, dtype="bool", backend="auto"):
    """Masks pruning the ``amount`` smallest magnitudes across all of ``ws`` together (one
    threshold), as ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``.

    Args:
        ws: a list of float32 or float64 arrays of one dtype and device, any framework.
        amount: a count of weights or a fraction of their total (see the module docstring).
        dtype: ``"bool"`` (default) or ``"uint8"``, the masks' dtype.
        backend: ``"auto"`` or a backend name.

    Returns a list of masks, one per weight, of its framework, device and shape.
    """
    if _interop.framework_of(ws) is not None or isinstance(ws, (dict, set)):
        raise TypeError("ws: expected a list of arrays")
    ws = list(ws)
    if not ws:
        raise ValueError("ws: expected at least one array")
    _backends.check_name(backend)
    mask_dtype = _mask_dtype(dtype)
    arrays = _weights(ws, "ws")
    k = n_to_prune(amount, sum(a.size for a in arrays))
    bufs, finish = _new_masks(arrays, ws, mask_dtype)
    flat = [a.reshape(-1) for a in arrays if a.size]
    if flat:
        select = _backends.resolve("magnitude_masks", backend, _device(flat[0]), flat[0].dtype)
        ok = select(flat, [b.reshape(-1).view(np.uint8) for b in bufs if b.size], k,
                    check_nan=True, n_threads=get_num_threads())
        if not ok:
            bad = next(i for i, a in enumerate(arrays) if bool(_isnan_any(a)))
            raise ValueError(f"ws[{bad}]: holds NaN, which has no magnitude to rank; "
                             f"replace it before pruning")
    return [f() for f in finish]


def _isnan_any(a):
    return _interop.array_module(a).isnan(a).any()


def magnitude_mask(w, amount, *, dtype="bool", backend="auto"):
    """The mask pruning the ``amount`` smallest magnitudes of ``w`` (L1 unstructured, as
    ``torch.nn.utils.prune.l1_unstructured``); see ``global_magnitude_masks``.

    >>> import numpy as np, fastopt
    >>> fastopt.prune.magnitude_mask(np.array([3.0, -1.0, 2.0, 1.0]), 2)
    array([ True, False,  True, False])
    """
    _interop.import_input(w, "w")  # names the argument in errors
    return global_magnitude_masks([w], amount, dtype=dtype, backend=backend)[0]


def random_mask(w, amount, *, seed, dtype="bool", backend="auto"):
    """A mask pruning ``amount`` weights of ``w`` chosen uniformly at random, exactly that
    many (torch.nn.utils.prune.random_unstructured). The choice depends only on ``seed``
    (an int in [0, 2**64)) and ``w``'s size: each weight gets a 31-bit Philox key (stream 2
    of ``fastopt.init``'s generator), and the smallest keys are pruned, ties to the earlier
    weight; the same on every backend and thread count."""
    arr = _interop.import_input(w, "w").array
    seed = _check.integer("seed", seed, lo=0)
    if seed >= 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    _backends.check_name(backend)
    mask_dtype = _mask_dtype(dtype)
    k = n_to_prune(amount, arr.size)
    buf, finish = _interop.new_array(arr.shape, mask_dtype, w)
    if arr.size:
        device = _device(arr)
        keys = _interop.empty_like(arr, (arr.size,), np.uint32)
        fill = _backends.resolve("random_fill", backend, device, np.uint32)
        fill(keys, BITS, (0.0,) * 7, seed, RANDOM_STREAM, n_threads=get_num_threads())
        select = _backends.resolve("magnitude_masks", backend, device, np.float32)
        select([keys.view(np.float32)], [buf.reshape(-1).view(np.uint8)], k, check_nan=False,
               n_threads=get_num_threads())
    return finish()


def _norm_kind(n):
    if n == "fro":
        return 2.0
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"n must be a positive number, inf, -inf or 'fro', got {n!r}")
    try:
        n = float(n)
    except OverflowError:  # an int beyond float64's range, such as 10**400
        raise ValueError("n must be a positive number, inf, -inf or 'fro', got a number too "
                         "large for a float") from None
    if math.isnan(n) or (n <= 0 and n != -math.inf):
        raise ValueError(f"n must be a positive number, inf, -inf or 'fro', got {n!r}")
    return n


def _finite(arr, name):
    if not bool(_interop.array_module(arr).isfinite(arr).all()):
        raise ValueError(f"{name}: holds NaN or inf; pruning ranks finite magnitudes")


def ln_structured_mask(w, amount, n, dim, *, dtype="bool", backend="auto"):
    r"""The mask pruning whole slices ``w[..., i, ...]`` along ``dim`` (channels, rows) with
    the smallest L\ :sub:`n` norms, as ``torch.nn.utils.prune.ln_structured``: ``amount``
    counts slices (of ``w.shape[dim]``); ``n`` is the norm's order (a positive number,
    ``inf``, ``-inf`` or ``"fro"``), taken in float64 over every other dim. Equal norms:
    the lower index is pruned first. The mask has ``w``'s shape. For ``n`` 1, 2 and
    ``"fro"`` the norms come from one compiled pass (the slice sums of weight
    normalization, :math:`\sum x^2` or :math:`\sum x \operatorname{sign}(x)`; ``backend``:
    ``"auto"`` or a backend name), for the other orders from array code.

    >>> import numpy as np, fastopt
    >>> w = np.array([[1., 1.], [3., 0.], [0., 0.5]])
    >>> fastopt.prune.ln_structured_mask(w, 1, n=1, dim=0)
    array([[ True,  True],
           [ True,  True],
           [False, False]])
    """
    arr = _interop.import_input(w, "w").array
    if arr.ndim < 1:
        raise ValueError("w: structured pruning needs an array with 1 or more dims")
    p = _norm_kind(n)
    dim = _check.axis("dim", dim, arr.ndim)
    _backends.check_name(backend)
    mask_dtype = _mask_dtype(dtype)
    k = n_to_prune(amount, arr.shape[dim])
    xp = _interop.array_module(arr)
    if arr.size == 0:  # no slices, or slices of no entries: every norm 0
        norms = np.zeros(arr.shape[dim])
    elif p in (1.0, 2.0):
        x = xp.ascontiguousarray(arr)
        sums = _backends.resolve("weight_norm_sums", backend, _device(x), x.dtype)
        geometry = (math.prod(arr.shape[:dim]), arr.shape[dim], math.prod(arr.shape[dim + 1:]))
        norms = sums(x, x if p == 2.0 else xp.sign(x), geometry, n_threads=get_num_threads())
        norms = np.sqrt(norms) if p == 2.0 else norms
        if not np.isfinite(norms).all():  # NaN or inf in w (or a float64 sum overflowed)
            _finite(arr, "w")
    else:
        _finite(arr, "w")
        moved = xp.abs(xp.moveaxis(arr, dim, 0).reshape(arr.shape[dim], -1))
        if p == math.inf:  # exact in the weights' dtype
            norms = moved.max(axis=1).astype(np.float64)
        elif p == -math.inf:
            norms = moved.min(axis=1).astype(np.float64)
        else:
            norms = (moved.astype(np.float64) ** p).sum(axis=1) ** (1.0 / p)
        norms = _interop._host(norms)
    keep = np.ones(arr.shape[dim], bool)
    keep[np.argsort(norms, kind="stable")[:k]] = False
    shape = [1] * arr.ndim
    shape[dim] = arr.shape[dim]
    buf, finish = _interop.new_array(arr.shape, mask_dtype, w)
    buf[...] = xp.broadcast_to(xp.asarray(keep).reshape(shape), arr.shape)
    return finish()


def nm_mask(w, n=2, m=4, dim=-1, *, dtype="bool", backend="auto"):
    """The N:M semi-structured mask: of every ``m`` consecutive weights along ``dim``, keep
    the ``n`` largest magnitudes (2:4 is what sparse tensor cores run). ``w.shape[dim]``
    must be a multiple of ``m``. Equal magnitudes: the lower index is pruned first.
    ``backend``: ``"auto"`` or a backend name."""
    arr = _interop.import_input(w, "w").array
    if arr.ndim < 1:
        raise ValueError("w: N:M pruning needs an array with 1 or more dims")
    m = _check.integer("m", m, lo=1)
    n = _check.integer("n", n, lo=0)
    if n > m:
        raise ValueError(f"n must be <= m, got n={n}, m={m}")
    dim = _check.axis("dim", dim, arr.ndim)
    if arr.shape[dim] % m:
        raise ValueError(f"w: its dim {dim} has {arr.shape[dim]} entries, not a multiple of "
                         f"m={m}")
    _backends.check_name(backend)
    mask_dtype = _mask_dtype(dtype)
    buf, finish = _interop.new_array(arr.shape, mask_dtype, w)
    if arr.size:
        # groups of m rows of C elements: C the product of the dims after `dim`
        x = _interop.array_module(arr).ascontiguousarray(arr).reshape(-1)
        select = _backends.resolve("nm_masks", backend, _device(x), x.dtype)
        top = select(x, buf.reshape(-1).view(np.uint8), n, m, math.prod(arr.shape[dim + 1:]),
                     n_threads=get_num_threads())
        if not math.isfinite(top):  # the largest magnitude
            _finite(arr, "w")
    return finish()


def _mask_for(mask, arr, name="mask"):
    view = _interop.import_input(mask, name, MASK_DTYPES).array
    if tuple(view.shape) != tuple(arr.shape):
        raise ValueError(f"{name}: shape {tuple(view.shape)} does not match the weight's "
                         f"{tuple(arr.shape)}")
    if _device(view) != _device(arr):
        raise ValueError(f"{name}: on {_device(view)}, but the weight is on {_device(arr)}")
    return view


def apply_mask_(w, mask):
    """Zero the pruned weights of ``w`` in place (``w[mask == 0] = 0``, exactly +0 even where
    ``w`` holds NaN or inf) and return ``w``; for NumPy, PyTorch (a parameter that requires
    grad is written outside autograd) and CuPy arrays. JAX and TensorFlow arrays are
    immutable: use ``apply_mask``."""
    fw = _interop.framework_of(w)
    if fw in ("jax", "tensorflow"):
        raise TypeError(f"w: {fw} arrays are immutable; use fastopt.prune.apply_mask(w, mask), "
                        f"which returns a new array")
    target = w.detach() if fw == "torch" and w.requires_grad else w
    arr = _interop.import_array(target, "w").array
    keep = _mask_for(mask, arr)
    _interop.array_module(arr).copyto(arr, 0, where=keep.view(np.uint8) == 0)
    return w


def apply_mask(w, mask):
    """A new array of ``w``'s framework: ``w`` with the pruned weights set to +0."""
    arr = _interop.import_input(w, "w").array
    keep = _mask_for(mask, arr)
    buf, finish = _interop.new_array(arr.shape, arr.dtype, w)
    xp = _interop.array_module(arr)
    buf[...] = xp.where(keep.view(np.uint8) != 0, arr, xp.zeros((), arr.dtype))
    return finish()


def polynomial_sparsity(step, initial, final, begin, end, power=3):
    r"""The gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune":

    .. math::
        s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_b}{t_e - t_b}\right)^{p}

    for ``begin <= step <= end``; ``initial`` before ``begin``, ``final`` after ``end``.
    Sparsities are fractions in [0, 1]; ``power`` (default 3) > 0; ``begin < end`` (or
    ``begin == end``: a jump to ``final`` at ``begin``).

    >>> import fastopt
    >>> round(fastopt.prune.polynomial_sparsity(50, 0.0, 0.8, 0, 100), 6)
    0.7
    """
    step = _check.integer("step", step, lo=0)
    initial = _check.real("initial", initial, lo=0.0, hi=1.0)
    final = _check.real("final", final, lo=0.0, hi=1.0)
    begin = _check.integer("begin", begin, lo=0)
    end = _check.integer("end", end, lo=0)
    power = _check.real("power", power, lo=0.0, lo_open=True)
    if end < begin:
        raise ValueError(f"end must be >= begin, got begin={begin}, end={end}")
    if step >= end:
        return final
    if step <= begin:
        return initial
    return final + (initial - final) * (1.0 - (step - begin) / (end - begin)) ** power
