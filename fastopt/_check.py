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


def integer(name, value, *, lo, hi=None):
    """`value` as an int, if it is an integer (Python's or NumPy's, not a bool) in [lo, hi]
    (hi None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {_short(value)}")
    return int(value)


MAX_COUNT = 2**53  # step and iteration counts stay exact as float64


def count(name, value, *, lo=0):
    """`value` as an int, if it is a step or iteration count: an integer in [lo, 2**53]
    (larger ones would not be exact as the floats the schedules compute with)."""
    return integer(name, value, lo=lo, hi=MAX_COUNT)


def number(name, value):
    """`value` as a float, if it is a real number (inf and NaN included): a Python or NumPy
    number or a 0-d array of a real dtype; never a bool nor a complex number."""
    if _interop.framework_of(value) is not None:
        return _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64's range, such as 10**400
        raise ValueError(f"{name} must be a real number in float64's range, got a number "
                         f"too large for a float") from None


def flag(name, value):
    """`value` as a bool, if it is one (Python's or NumPy's); 1, "yes" or arrays are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")


def _short(value):
    """repr of an int, shortened where it is huge (10**400)."""
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:10]}...({len(text)} digits)"


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
