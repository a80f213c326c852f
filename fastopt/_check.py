"""Argument checks shared by the optimizers and schedules: errors name the argument."""

import math
import numbers


def real(name, value, *, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """`value` as a float, if it is a finite real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    low_ok = value > lo if lo_open else value >= lo
    high_ok = value < hi if hi_open else value <= hi
    if not (math.isfinite(value) and low_ok and high_ok):
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo:g}, "
                         f"{hi:g}{')' if hi_open else ']'}, got {value!r}")
    return value


def integer(name, value, *, lo):
    """`value` as an int, if it is an integer >= lo."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def axis(name, value, ndim):
    """`value` as a dim index in [0, ndim), if it is an int in [-ndim, ndim)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -ndim <= value < ndim:
        raise ValueError(f"{name}={value} is out of range for an array of {ndim} dims")
    return int(value) % ndim
