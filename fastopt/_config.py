"""Process-wide settings: how many CPU threads the kernels use, and the OpenMP runtimes'
nesting."""

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


_OPENMP_NAMES = ("libgomp", "libomp", "libiomp5")


def openmp_runtimes():
    """{path: ctypes library} of the OpenMP runtimes loaded in this process (Linux; {}
    where /proc/self/maps cannot tell)."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(maxsplit=5)[-1].strip() for line in f
                     if any(f"/{name}" in line for name in _OPENMP_NAMES)}
    except OSError:
        return {}
    runtimes = {}
    for path in sorted(paths):
        try:
            runtimes[path] = ctypes.CDLL(path)  # already loaded: the same handle
        except OSError:
            pass
    return runtimes


def keep_openmp_unnested():
    """Turn nested parallelism back off in every loaded OpenMP runtime, unless the user asked
    for it (OMP_NESTED, OMP_MAX_ACTIVE_LEVELS).

    Numba's 'omp' threading layer turns it on (omp_set_nested(1) when it launches its
    threads) in the system libgomp. When a fastopt extension has loaded that libgomp before
    torch was imported, torch binds to the same runtime, and the setting reaches it: an op
    that calls MKL's VML inside its parallel region (torch.optim's for-loop and foreach Adam
    take sqrt per tensor) then opens a nested team on every call, more threads than cores,
    and spins: 20-40x slower steps (measured: Adam on 200 tensors of 50K, 17 -> 600 ms).
    fastopt's kernels never nest."""
    if os.environ.get("OMP_NESTED") or os.environ.get("OMP_MAX_ACTIVE_LEVELS"):
        return
    for path, lib in openmp_runtimes().items():
        try:
            if "libgomp" in path:
                lib.omp_set_nested(0)  # libgomp of every age (older ones keep a nest flag)
            else:
                lib.omp_set_max_active_levels(1)  # omp_set_nested is deprecated in libomp
        except AttributeError:
            pass

