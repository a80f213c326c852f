"""Argument checks shared by the optimizers and schedules: errors name the argument."""

import math
import numbers

import numpy as np

from fastopt import _interop

# dtype names of the 0-d arrays `real` takes (any framework): floats and integers; not bool,
# complex or quantized (qint8)
_REAL_DTYPE_PREFIXES = ("float", "bfloat", "int", "uint")


def _scalar(name, value):
    """The float of a 0-d array of a real dtype, of any framework (torch.tensor(0.1))."""
    fw, _ = _interop._check_array(value, name, dtypes=None)
    try:
        dtype = _interop._dtype_name(value, fw)
    except TypeError:  # a dtype NumPy has no name for (JAX's PRNG keys)
        dtype = ""
    if tuple(value.shape) != () or not dtype.startswith(_REAL_DTYPE_PREFIXES):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _interval(lo, hi, lo_open, hi_open):
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def real(name, value, *, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """`value` as a float, if it is a finite real number in the given range: a Python or NumPy
    number, or a 0-d array of a real dtype of any framework; never a bool (True is not 1.0)
    nor a complex number."""
    if _interop.framework_of(value) is not None:
        value = _scalar(name, value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64's range, such as 10**400
        raise ValueError(f"{name} must be a finite number in "
                         f"{_interval(lo, hi, lo_open, hi_open)}, got a number too large "
                         f"for a float") from None
    low_ok = value > lo if lo_open else value >= lo
    high_ok = value < hi if hi_open else value <= hi
    if not (math.isfinite(value) and low_ok and high_ok):
        raise ValueError(f"{name} must be a finite number in "
                         f"{_interval(lo, hi, lo_open, hi_open)}, got {value!r}")
    return value


def integer(name, value, *, lo):
    """`value` as an int, if it is an integer >= lo."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def choice(name, value, choices):
    """The one of `choices` that `value` equals (a NumPy dtype equals its name)."""
    for option in choices:
        try:
            equal = value == option
        except (TypeError, ValueError):  # an array of a framework that refuses the comparison
            break
        if equal is True or (type(equal) is np.bool_ and equal):
            return option
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def axis(name, value, ndim):
    """`value` as a dim index in [0, ndim), if it is an int in [-ndim, ndim)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -ndim <= value < ndim:
        raise ValueError(f"{name}={value} is out of range for an array of {ndim} dims")
    return int(value) % ndim
