"""The backend registry: which backend implements which operation, where, for which dtypes.

Each backend is a module under fastopt._backends exposing the operations by their shared
name (``adam_step`` in every backend). ``resolve(op, backend, device, dtype)`` returns the
function; ``backend="auto"`` picks the first available backend in AUTO_ORDER for the device.
Availability is probed once per process and cached; nothing optional is imported before a
backend is asked for.
"""

import functools
import importlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Backend:
    name: str
    module: str
    device: str                # "cpu" or "cuda"
    dtypes: tuple
    install: str               # what to do when it is missing
    summary: str


BACKENDS = {
    b.name: b for b in (
        Backend("numpy", "fastopt._backends._numpy", "cpu", ("float32", "float64"),
                "NumPy is a dependency of fastopt; reinstall fastopt",
                "reference: plain NumPy, the spec every backend is tested against"),
        Backend("cython", "fastopt._backends._cython", "cpu", ("float32", "float64"),
                "the compiled extension is missing: reinstall fastopt from source "
                "(pip install --force-reinstall --no-binary fastopt fastopt) with a C compiler",
                "C loops (Cython + OpenMP, AVX-512/AVX2/baseline picked at load time)"),
        Backend("numba", "fastopt._backends._numba", "cpu", ("float32", "float64"),
                "pip install 'fastopt[numba]'",
                "Numba @njit(parallel=True, cache=True) kernels"),
        Backend("cupy", "fastopt._backends._cupy", "cuda", ("float32", "float64"),
                "pip install 'fastopt[cuda]' on a machine with an NVIDIA GPU and driver",
                "CUDA C++ kernels compiled at run time by CuPy (NVRTC)"),
    )
}

# operation -> backends implementing it
OPS = {
    "sgd_step": ("numpy", "cython", "numba", "cupy"),
    "adam_step": ("numpy", "cython", "numba", "cupy"),
    "adagrad_step": ("numpy", "cython", "numba", "cupy"),
    "rmsprop_step": ("numpy", "cython", "numba", "cupy"),
    "adadelta_step": ("numpy", "cython", "numba", "cupy"),
    "adamax_step": ("numpy", "cython", "numba", "cupy"),
    "nadam_step": ("numpy", "cython", "numba", "cupy"),
    "radam_step": ("numpy", "cython", "numba", "cupy"),
    "lion_step": ("numpy", "cython", "numba", "cupy"),
    "lamb_step": ("numpy", "cython", "numba", "cupy"),
    "adafactor_step": ("numpy", "cython", "numba", "cupy"),
    "norm_partials": ("numpy", "cython", "numba", "cupy"),
    "random_fill": ("numpy", "cython", "numba", "cupy"),
    "weight_norm_sums": ("numpy", "cython", "numba", "cupy"),
    "weight_norm_apply": ("numpy", "cython", "numba", "cupy"),
    "magnitude_masks": ("numpy", "cython", "numba", "cupy"),
    "quant_loop": ("numpy", "cython", "numba", "cupy"),
    "kd_rows": ("numpy", "cython", "numba", "cupy"),
}

AUTO_ORDER = {"cpu": ("cython", "numba", "numpy"), "cuda": ("cupy",)}


def check_name(backend):
    """Validate a backend argument ('auto' or a registered name)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def load(name):
    """(module, None) if the backend works in this process, else (None, reason)."""
    spec = BACKENDS[name]
    try:
        module = importlib.import_module(spec.module)
        problem = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    except ImportError as exc:
        return None, f"{exc}"
    return (None, problem) if problem else (module, None)


def available(name):
    return load(name)[0] is not None


@functools.lru_cache(maxsize=None)
def _resolve(op, backend, device, dtype):
    dtype = dtype.name
    if backend == "auto":
        for name in AUTO_ORDER.get(device, ()):
            if op in _ops_of(name) and dtype in BACKENDS[name].dtypes and available(name):
                return getattr(load(name)[0], op)
        names = AUTO_ORDER.get(device) or ("none",)
        raise RuntimeError(f"no available backend runs {op} on {device} arrays of {dtype}; "
                           f"tried {', '.join(names)}: "
                           + "; ".join(f"{n}: {BACKENDS[n].install}" for n in names if n in BACKENDS))
    spec = BACKENDS[backend]
    if op not in OPS or backend not in OPS[op]:
        raise ValueError(f"backend {backend!r} does not implement {op}")
    if spec.device != device:
        raise ValueError(f"backend {backend!r} runs on {spec.device} arrays, but the arrays are "
                         f"on {device}; use backend='auto' or a {device} backend "
                         f"({', '.join(AUTO_ORDER.get(device, ()))})")
    if dtype not in spec.dtypes:
        raise TypeError(f"backend {backend!r} does not support dtype {dtype}")
    module, reason = load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not available ({reason}); {spec.install}")
    return getattr(module, op)


def _ops_of(name):
    return [op for op, names in OPS.items() if name in names]


def resolve(op, backend, device, dtype):
    """The function implementing `op` for arrays on `device` ('cpu'/'cuda') of `dtype`."""
    return _resolve(op, backend, device, np.dtype(dtype))
