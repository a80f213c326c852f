"""Process-wide settings: how many CPU threads the kernels use."""

import numbers
import os

MAX_THREADS = 2**31 - 1  # the native drivers take the count as a C int
_num_threads = None


def _default_threads():
    for var in ("FASTOPT_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def get_num_threads():
    """Threads the CPU kernels use when an optimizer is given no ``n_threads``.

    Defaults to ``FASTOPT_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the cores this
    process may run on.
    """
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n):
    """Set the default thread count of the CPU kernels (an int >= 1)."""
    global _num_threads
    _num_threads = check_threads(n, "n")


def check_threads(n, name):
    """`n` as an int, if it is an integer (Python's or NumPy's) in [1, MAX_THREADS]."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {n!r}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name} must be an integer >= 1 (at most {MAX_THREADS}), got {n!r}")
    return int(n)
