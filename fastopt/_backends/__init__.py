"""The backend registry: which backend implements which operation, where, for which dtypes.

Each backend is a module under fastopt._backends. What it implements is read from the module
itself, never listed by hand:

- an operation that is not an optimizer rule (``norm_partials``, ``random_fill``,
  ``magnitude_masks``, ...) is a function of that name in the module;
- an optimizer rule of the rule table (fastopt._rules) runs on a compiled backend (one with
  an ``elementwise`` entry point: fastopt._backends._contracts.Compiled) when the backend
  has every kernel the rule lists (its ``KERNELS``), through the generic step of
  fastopt._backends._steps (or the rule's multi-pass driver in _twopass); on the NumPy
  reference, through the reference function named after the rule's operation
  (``adam_step``).

Each operation runs on the backend's dtypes (``Backend.dtypes``), except those that
OP_DTYPES lists (the random fills also write raw uint32 bits), and a backend package may
narrow or widen an operation's dtypes in its own ``DTYPES`` (op -> dtypes).

``resolve(op, backend, device, dtype)`` returns the function; ``backend="auto"`` picks the
first available backend in AUTO_ORDER for the device. ``OPS`` maps each operation to the
backends that implement it. Availability is probed once per process and cached; nothing
optional is imported before a backend is asked for.
"""

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fastopt import _rules
from fastopt._backends import _formats, _steps, _twopass


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

# the operations that are not optimizer rules
OPERATIONS = ("norm_partials", "random_fill", "weight_norm_sums", "weight_norm_apply",
              "magnitude_masks", "nm_masks", "quant_loop", "kd_rows")

# operations whose dtypes are not the backend's floats
OP_DTYPES = {"random_fill": ("float32", "float64", "uint32")}

AUTO_ORDER = {"cpu": ("cython", "numba", "numpy"), "cuda": ("cupy",)}


def check_name(backend):
    """Validate a backend argument ('auto' or a registered name)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be 'auto' or one of {sorted(BACKENDS)} (a str), got "
                        f"{type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def _module(name):
    """The backend's module, imported (it may still be unavailable here), or None."""
    try:
        return importlib.import_module(BACKENDS[name].module)
    except ImportError:
        return None


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
def _implementation(name, op):
    """The function of backend `name` that implements `op`, or None."""
    module = _module(name)
    if module is None:
        return None
    rule = _rules.BY_OP.get(op)
    utility = _rules.UTILITY_OPS.get(op)
    if utility is not None and hasattr(module, "elementwise"):
        kernel, scalars = utility
        return (functools.partial(_steps.utility_step, module, kernel.name, scalars)
                if kernel.name in module.KERNELS else None)
    if rule is None or not hasattr(module, "elementwise"):
        return getattr(module, op, None)
    needed = rule.kernels + tuple(k for c in rule.cautious for k in (c.count, c.step))
    if any(k.name not in module.KERNELS for k in needed):
        return None
    if rule.driver is not None:  # storage formats: whole arrays converted around the passes
        return _formats.formatted(functools.partial(getattr(_twopass, f"{rule.driver}_step"),
                                                    module))
    return functools.partial(_steps.rule_step, module, rule)


def takes_ema(fn):
    """Whether `fn` (a rule's step from resolve) takes ``ema=`` (the weight EMA in its
    update pass): the generic step of the compiled backends does."""
    return getattr(fn, "func", None) is _steps.rule_step


def dtypes(name, op):
    """The dtypes backend `name` runs `op` on."""
    module = _module(name)
    return getattr(module, "DTYPES", {}).get(op, OP_DTYPES.get(op, BACKENDS[name].dtypes))


class _Operations(Mapping):
    """operation -> the backends implementing it (read from the modules on first use)."""

    def __iter__(self):
        return iter(tuple(_rules.BY_OP) + OPERATIONS)

    def __len__(self):
        return len(_rules.BY_OP) + len(OPERATIONS)

    def __getitem__(self, op):
        if op not in _rules.BY_OP and op not in OPERATIONS:
            raise KeyError(op)
        return tuple(name for name in BACKENDS if _implementation(name, op) is not None)


OPS = _Operations()


@functools.lru_cache(maxsize=None)
def _resolve(op, backend, device, dtype):
    dtype = dtype.name
    if backend == "auto":
        for name in AUTO_ORDER.get(device, ()):
            if available(name) and _implementation(name, op) is not None \
                    and dtype in dtypes(name, op):
                return _implementation(name, op)
        names = AUTO_ORDER.get(device) or ("none",)
        hints = "; ".join(f"{n}: {BACKENDS[n].install}" for n in names if n in BACKENDS)
        raise RuntimeError(f"no available backend runs {op} on {device} arrays of {dtype}; "
                           f"tried {', '.join(names)}: {hints}")
    spec = BACKENDS[backend]
    if spec.device != device:
        raise ValueError(f"backend {backend!r} runs on {spec.device} arrays, but the arrays are "
                         f"on {device}; use backend='auto' or a {device} backend "
                         f"({', '.join(AUTO_ORDER.get(device, ()))})")
    module, reason = load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not available ({reason}); {spec.install}")
    fn = _implementation(backend, op)
    if fn is None:
        raise ValueError(f"backend {backend!r} does not implement {op}")
    if dtype not in dtypes(backend, op):
        raise TypeError(f"backend {backend!r} does not support dtype {dtype} for {op}; it "
                        f"takes {', '.join(dtypes(backend, op))}")
    return fn


def resolve(op, backend, device, dtype):
    """The function implementing `op` for arrays on `device` ('cpu'/'cuda') of `dtype`."""
    return _resolve(op, backend, device, np.dtype(dtype))
