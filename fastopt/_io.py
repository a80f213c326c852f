"""fastopt.save / fastopt.load: nested containers of arrays in one .npz file.

The structure (dicts with int or str keys, lists, tuples, numbers, strings, booleans, None)
is kept as JSON inside the archive, the arrays as its members; nothing is pickled, so
loading a file runs no code. Arrays of any framework are saved from the host; ``load``
returns NumPy arrays (``load_state_dict`` moves them to the parameters' device).
"""

import json
import os

import numpy as np

from fastopt import _interop

_STRUCTURE = "__fastopt_structure__"


def save(obj, path):
    """Write `obj` (for example ``opt.state_dict()``) to `path`, a single .npz file."""
    arrays = {}

    def encode(x):
        if isinstance(x, dict):
            return {"dict": [[encode(k), encode(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"list" if isinstance(x, list) else "tuple": [encode(v) for v in x]}
        if x is None or isinstance(x, (bool, int, str)):
            return {"value": x}
        if isinstance(x, float):
            return {"float": repr(x)}  # repr round-trips exactly, inf and nan included
        if isinstance(x, np.generic):
            return encode(x.item())
        if _interop.framework_of(x) is not None:
            name = f"a{len(arrays)}"
            arrays[name] = np.ascontiguousarray(_interop._host(x))
            return {"array": name}
        raise TypeError(f"save: cannot store a {type(x).__name__}; use dicts, lists, tuples, "
                        f"numbers, strings and arrays")

    structure = json.dumps(encode(obj))
    with open(os.fspath(path), "wb") as f:
        np.savez(f, **{_STRUCTURE: np.frombuffer(structure.encode(), np.uint8)}, **arrays)


def load(path):
    """Read what ``save`` wrote; arrays come back as NumPy arrays."""
    with np.load(os.fspath(path), allow_pickle=False) as archive:
        if _STRUCTURE not in archive.files:
            raise ValueError(f"load: {path} was not written by fastopt.save")
        structure = json.loads(archive[_STRUCTURE].tobytes().decode())

        def decode(x):
            (kind, value), = x.items()
            if kind == "dict":
                return {decode(k): decode(v) for k, v in value}
            if kind in ("list", "tuple"):
                items = [decode(v) for v in value]
                return items if kind == "list" else tuple(items)
            if kind == "float":
                return float(value)
            if kind == "array":
                return archive[value]
            return value

        return decode(structure)
