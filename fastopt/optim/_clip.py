"""Gradient clipping (torch.nn.utils.clip_grad_norm_ / clip_grad_value_ semantics).

The total norm is one reduction pass over all gradients, in a fixed summation order that
every backend shares (fastopt/reduce.h), so it is the same number on every backend and for
any thread count. Optimizers fold the resulting coefficient into their update pass
(``max_grad_norm=``), which then costs one extra read of the gradients; the functions here
clip the gradient arrays themselves, in place.
"""

import math

import numpy as np

from fastopt import _backends, _interop
from fastopt._check import flag, number, real
from fastopt._config import check_threads, get_num_threads

_KINDS = {1.0: 1, 2.0: 2, math.inf: 0}  # norm type -> kind in fastopt/reduce.h


def norm_kind(norm_type, name="norm_type"):
    """The reduction kind of a norm type: 1, 2 or inf (a real number, or the string "inf");
    never a bool (True is not the 1-norm) nor a complex number."""
    if isinstance(norm_type, str):
        try:
            value = float(norm_type)
        except ValueError:
            value = math.nan
        if value != math.inf:
            raise ValueError(f"{name} must be 1, 2 or inf, got {norm_type!r}")
    else:
        try:
            value = number(name, norm_type)
        except TypeError:
            raise TypeError(f"{name} must be 1, 2 or inf, got {norm_type!r:.80}") from None
        except ValueError:  # 10**400
            raise ValueError(f"{name} must be 1, 2 or inf, got a number too large for a "
                             f"float") from None
    if value not in _KINDS:
        raise ValueError(f"{name} must be 1, 2 or inf, got {norm_type!r:.80}")
    return _KINDS[value]


def total_norm(arrays_by_dtype, kind, backend, device, n_threads, reduce=None):
    """The norm over every array, from each backend's per-chunk partials added in order.
    `reduce(total, kind)`, if given, combines this process's total (of absolute values, of
    squares, or the largest absolute value for kind 0) with those of the others holding
    shards of the same arrays (fastopt.torch under FSDP2)."""
    partials = [_backends.resolve("norm_partials", backend, device, dtype)(
                    arrays, kind, n_threads=n_threads)
                for dtype, arrays in arrays_by_dtype.items()]
    partials = np.concatenate(partials) if partials else np.zeros(0)
    if kind == 0:
        total = float(np.max(partials)) if partials.size else 0.0
    else:  # left to right, not pairwise
        total = float(np.cumsum(partials)[-1]) if partials.size else 0.0
    if reduce is not None:
        total = reduce(total, kind)
    return math.sqrt(total) if kind == 2 else total


def clip_coefficient(max_norm, norm, dtype):
    """torch's min(1, max_norm / (norm + 1e-6)), computed in the gradients' dtype."""
    s = np.dtype(dtype).type
    return float(min(s(max_norm) / (s(norm) + s(1e-6)), s(1.0)))


def _mutable_grads(grads, what):
    # a single array (nested torch tensors included) is refused before list() iterates it
    if _interop.framework_of(grads) is not None or isinstance(grads, (dict, set)):
        raise TypeError(f"{what}: expected a list of arrays, got {type(grads).__name__}")
    views = []
    for i, g in enumerate(list(grads)):
        view = _interop.import_param(g, "grads", i)
        if view.framework not in _interop.MUTABLE:
            raise TypeError(f"grads[{i}]: {view.framework} arrays are immutable and cannot be "
                            f"clipped in place; pass max_grad_norm= / max_grad_value= to the "
                            f"optimizer instead")
        if views and (view.device != views[0].device):
            raise ValueError(f"grads[{i}] is on {view.device[0]}, grads[0] on "
                             f"{views[0].device[0]}; put all gradients on one device")
        views.append(view)
    return views


def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False, *,
                    backend="auto", n_threads=None):
    r"""Scale gradients in place so that their total norm is at most ``max_norm``.

    Follows ``torch.nn.utils.clip_grad_norm_``: with :math:`N = \|(\|g_1\|, \ldots,
    \|g_k\|)\|_p` over all gradients, every gradient is multiplied by
    :math:`\min(1, \text{max\_norm} / (N + 10^{-6}))`.

    Args:
        grads: list of mutable arrays (NumPy, PyTorch, CuPy), changed in place.
        max_norm (float): the largest total norm, > 0.
        norm_type: 1, 2 (default) or ``inf``.
        error_if_nonfinite (bool): raise if the total norm is NaN or infinite.
        backend, n_threads: as for the optimizers.

    Returns:
        float: the total norm before clipping.

    Example:
        >>> import numpy as np, fastopt
        >>> g = [np.array([3.0, 4.0])]
        >>> fastopt.clip_grad_norm_(g, max_norm=1.0)
        5.0
        >>> g[0].round(6)
        array([0.6, 0.8])
    """
    kind = norm_kind(norm_type)
    max_norm = _positive(max_norm, "max_norm")
    error_if_nonfinite = flag("error_if_nonfinite", error_if_nonfinite)
    n_threads = get_num_threads() if n_threads is None else check_threads(n_threads, "n_threads")
    _backends.check_name(backend)
    views = _mutable_grads(grads, "grads")
    if not views:
        return 0.0
    by_dtype = {}
    for v in views:
        by_dtype.setdefault(v.array.dtype, []).append(v.array)
    norm = total_norm(by_dtype, kind, backend, views[0].device[0], n_threads)
    if error_if_nonfinite and not math.isfinite(norm):
        order = {1: 1.0, 2: 2.0, 0: math.inf}[kind]
        raise RuntimeError(f"The total norm of order {order} of the gradients is "
                           f"non-finite, so it cannot be clipped; pass "
                           f"error_if_nonfinite=False to clip anyway")
    for dtype, arrays in by_dtype.items():
        coefficient = np.dtype(dtype).type(clip_coefficient(max_norm, norm, dtype))
        for a in arrays:
            a *= coefficient
    return norm


def clip_grad_value_(grads, clip_value):
    """Clamp gradients in place to ``[-clip_value, clip_value]`` (torch's
    ``clip_grad_value_``; NaN stays NaN).

    Example:
        >>> import numpy as np, fastopt
        >>> g = [np.array([-3.0, 0.5, 2.0])]
        >>> fastopt.clip_grad_value_(g, 1.0)
        >>> g[0]
        array([-1. ,  0.5,  1. ])
    """
    clip_value = _positive(clip_value, "clip_value")
    for v in _mutable_grads(grads, "grads"):
        s = v.array.dtype.type
        v.array.clip(s(-clip_value), s(clip_value), out=v.array)


def _positive(value, name):
    """`value` as a float, if it is a finite real number > 0 (see fastopt._check.real)."""
    try:
        number = real(name, value)
    except ValueError:  # NaN, inf, or an int too large for a float such as 10**400
        number = math.nan
    if not number > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number
