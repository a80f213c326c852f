"""Converting an optimizer's state between state dtypes (the ``state_dtype`` option)."""

import numpy as np

from fastopt import _interop, _rules
from fastopt._backends import _formats
from fastopt.optim._base import ABSMAX, MASTER

_TARGETS = ("float32", "bfloat16", "int8")


def convert_state(state_dict, state_dtype):
    """A copy of a ``state_dict()`` with its state arrays in `state_dtype`: ``"float32"``,
    ``"bfloat16"`` (rounded to nearest even) or ``"int8"`` (blockwise 8-bit codes and
    their ``<name>_absmax`` block scales, for arrays of 4096 elements or more of the rules
    that keep their state shaped like the parameter; the others float32), to load into an
    optimizer made with that ``state_dtype``. Master copies of the parameters
    (``"master_param"``, float32), float64 state, step counts and the param groups are kept
    as they are. Arrays come back as NumPy arrays.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.ones(3, np.float32)
        >>> opt = fastopt.Adam([w], lr=0.1)
        >>> _ = opt.step([np.ones(3, np.float32)])
        >>> sd = fastopt.convert_state(opt.state_dict(), "bfloat16")
        >>> sd["state"][0]["exp_avg"].dtype
        dtype(bfloat16)
        >>> fastopt.Adam([w], lr=0.1, state_dtype="bfloat16").load_state_dict(sd)
    """
    if state_dtype not in _TARGETS:
        raise ValueError(f"state_dtype must be 'float32', 'bfloat16' or 'int8', got "
                         f"{state_dtype!r}")
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise TypeError("state_dict: expected an optimizer's state_dict() (a dict with a "
                        "'state' dict)")
    state = {}
    for index, entry in state_dict["state"].items():
        where = f"state_dict['state'][{index!r}]"
        if not isinstance(entry, dict):
            raise TypeError(f"{where}: expected a dict, got {type(entry).__name__}")
        converted = {}
        for key, value in entry.items():
            if key.endswith(ABSMAX):  # made again with its codes, if they stay 8-bit
                continue
            if key == MASTER or _interop.framework_of(value) is None:
                converted[key] = value
                continue
            wide = _wide(key, np.asarray(_interop._host(value)), entry, where)
            if wide.dtype != np.float32:  # float64 state stays
                converted[key] = wide
            elif state_dtype == "int8" and key in _rules.QUANTIZABLE_STATE \
                    and wide.size >= _formats.MIN_QUANTIZED:
                codes = np.empty(wide.shape, np.uint8)
                absmax = np.empty(-(-wide.size // _formats.BLOCK), np.float32)
                _formats.q8_store(codes, absmax, wide, _code(key))
                converted[key], converted[key + ABSMAX] = codes, absmax
            elif state_dtype == "bfloat16":
                converted[key] = np.empty(wide.shape, _interop.bfloat16())
                _formats.store(converted[key], wide, _formats.BF16, stochastic=False)
            else:
                converted[key] = wide
        state[index] = converted
    return {**state_dict, "state": state}


def _code(key):
    return _formats.Q8S if key in _rules.SIGNED_STATE else _formats.Q8U


def _wide(key, array, entry, where):
    """State array `key` of a state entry in float32 (float64 as it is)."""
    if array.dtype == np.uint8:
        absmax = entry.get(key + ABSMAX)
        if absmax is None:
            raise ValueError(f"{where}[{key!r}]: 8-bit codes without their "
                             f"{key + ABSMAX!r} block scales")
        return _formats.q8_load(array, np.asarray(_interop._host(absmax), np.float32),
                                _code(key))
    if array.dtype.name in ("bfloat16", "float16"):
        return _formats.load(array, _formats.code_of(array.dtype))
    return array
