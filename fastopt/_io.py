"""fastopt.save / fastopt.load: nested containers of arrays in one .npz file.

The structure (dicts with int or str keys, lists, tuples, numbers, strings, booleans, None)
is kept as JSON inside the archive, the arrays as its members; nothing is pickled, so
loading a file runs no code. Arrays of any framework are saved from the host; ``load``
returns NumPy arrays (``load_state_dict`` moves them to the parameters' device).
"""

import json
import math
import os
import reprlib
import zipfile
import zlib

import numpy as np

from fastopt import _check, _interop

_STRUCTURE = "__fastopt_structure__"
MAX_LOAD_BYTES = 16 * 2**30  # load's default bound on the bytes a file declares


def save(obj, path):
    """Write `obj` (for example ``opt.state_dict()``) to `path`, a single .npz file."""
    arrays = {}

    def encode(x, where="obj"):
        if isinstance(x, dict):
            return {"dict": [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")]
                             for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"list" if isinstance(x, list) else "tuple":
                    [encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if x is None or isinstance(x, (bool, int, str)):
            return {"value": x}
        if isinstance(x, float):  # float(): NumPy 2 reprs np.float64(2.0) as such
            return {"float": repr(float(x))}  # repr round-trips exactly, inf and nan too
        if isinstance(x, np.generic):
            return encode(x.item(), where)
        if _interop.framework_of(x) is not None:
            # refused, naming the entry, where it has no readable memory (torch's meta device)
            if not isinstance(x, np.ndarray):  # only read: any byte order will do
                _interop._check_array(x, f"save: {where}", dtypes=None)
            name = f"a{len(arrays)}"
            host = _interop._host(x)  # (ascontiguousarray makes a 0-d array 1-d)
            arrays[name] = np.ascontiguousarray(host).reshape(np.shape(host))
            if arrays[name].dtype.name == "bfloat16":  # .npy has no code for it: its bits
                arrays[name] = arrays[name].view(np.uint16)
                return {"bfloat16": name}
            return {"array": name}
        raise TypeError(f"save: cannot store a {type(x).__name__}; use dicts, lists, tuples, "
                        f"numbers, strings and arrays")

    structure = json.dumps(encode(obj))
    with open(os.fspath(path), "wb") as f:
        np.savez(f, **{_STRUCTURE: np.frombuffer(structure.encode(), np.uint8)}, **arrays)


def load(path, *, max_bytes=MAX_LOAD_BYTES):
    """Read what ``save`` wrote; arrays come back as NumPy arrays.

    Args:
        max_bytes: the most bytes the file may declare, summed over its members (each the
            larger of its size in the zip directory and its array's in its .npy header),
            checked before any member's data is read: by default 16 GiB
            (``fastopt._io.MAX_LOAD_BYTES``); None for no bound (a trusted file of larger
            arrays).

    A file that is not one ``save`` writes raises a ValueError naming `path`: one that is
    not an .npz archive, holds a structure ``save`` does not write, or names an array
    member that is missing or already taken (``save`` writes each array once, so each
    member is read at most once).
    """
    if max_bytes is not None:
        max_bytes = _check.integer("max_bytes", max_bytes, lo=0)
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"load: {path} was not written by fastopt.save: it is not an .npz "
                         f"archive ({e})") from e
    with archive:
        try:
            return _Reader(archive, path).load(max_bytes)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise ValueError(f"load: {path} is corrupt or not an .npz archive: {e}") from e
        except RecursionError as e:
            raise ValueError(f"load: {path} was not written by fastopt.save: its structure "
                             f"is nested too deeply") from e


class _Reader:
    """The members of one archive, each read at most once, and the structure's decoding."""

    def __init__(self, archive, path):
        self.archive, self.path = archive, path
        self.members = {info.filename.removesuffix(".npy"): info
                        for info in archive.infolist() if info.filename.endswith(".npy")}

    def fail(self, what):
        return ValueError(f"load: {self.path} was not written by fastopt.save: {what}")

    def declared_bytes(self, info):
        """The larger of the member's size in the zip directory and, read from its .npy
        header alone, the size of its array (what reading it allocates)."""
        if info.flag_bits & 0x1:
            raise self.fail(f"member {info.filename!r} is encrypted")
        if not info.filename.endswith(".npy"):
            return info.file_size
        fmt = np.lib.format
        with self.archive.open(info) as f:
            try:
                version = fmt.read_magic(f)
                if version not in ((1, 0), (2, 0), (3, 0)):
                    raise ValueError(f"unknown .npy format version {version}")
                # 3.0 differs from 2.0 only in its header's text encoding (UTF-8 field
                # names), which leaves the sizes the same
                read_header = (fmt.read_array_header_1_0 if version == (1, 0)
                               else fmt.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            except ValueError as e:
                raise self.fail(f"member {info.filename!r} has no valid .npy header "
                                f"({e})") from e
        if any(n < 0 for n in shape):
            raise self.fail(f"member {info.filename!r} declares the shape {shape}")
        return max(info.file_size, math.prod(shape) * dtype.itemsize)

    def read(self, name):
        try:
            with self.archive.open(self.members[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as e:
            raise self.fail(f"member {name!r} is not a readable array ({e})") from e

    def load(self, max_bytes):
        if _STRUCTURE not in self.members:
            raise self.fail(f"it holds no {_STRUCTURE!r} member")
        total = sum(self.declared_bytes(info) for info in self.archive.infolist())
        if max_bytes is not None and total > max_bytes:
            raise ValueError(f"load: {self.path} declares {total} bytes of members, more than "
                             f"max_bytes={max_bytes}; pass a larger max_bytes, or None, to "
                             f"read it if you trust the file")
        text = self.read(_STRUCTURE)
        if text.dtype != np.uint8 or text.ndim != 1:
            raise self.fail(f"its structure is a {text.dtype} array of shape {text.shape}, "
                            f"not the uint8 bytes of JSON")
        try:
            structure = json.loads(text.tobytes().decode())
        except ValueError as e:  # not UTF-8, not JSON, an integer of too many digits
            raise self.fail(f"its structure is not JSON ({e})") from e
        self.decode(structure, set(), lambda name: None)  # checks it all, reads nothing
        return self.decode(structure, None, self.read)

    def decode(self, node, taken, read, key=False):
        """The object `node` (a dict key if `key`) stands for, its arrays from `read`;
        when `taken` is a set, it collects the members named, and a second naming of one is
        refused."""
        if not (isinstance(node, dict) and len(node) == 1):
            raise self.fail(f"its structure holds {reprlib.repr(node)}, not a JSON object of "
                            f"one entry")
        (kind, value), = node.items()
        if kind in ("dict", "list", "tuple") and not isinstance(value, list):
            raise self.fail(f"its structure holds a {kind} of {reprlib.repr(value)}, not a list")
        if kind == "dict":
            if not all(isinstance(item, list) and len(item) == 2 for item in value):
                raise self.fail(f"its structure holds a dict of {reprlib.repr(value)}, not of "
                                f"[key, value] pairs")
            out = {}
            for k, v in value:
                k = self.decode(k, taken, read, key=True)
                try:
                    hash(k)
                except TypeError as e:
                    raise self.fail(f"its structure holds a dict key {reprlib.repr(k)}") from e
                out[k] = self.decode(v, taken, read, key)
            return out
        if kind in ("list", "tuple"):
            items = [self.decode(v, taken, read, key) for v in value]
            return items if kind == "list" else tuple(items)
        if kind == "float" and isinstance(value, str):
            try:
                return float(value)
            except ValueError as e:
                raise self.fail(f"its structure holds the float {reprlib.repr(value)}") from e
        if kind == "value" and (value is None or isinstance(value, (bool, int, str))):
            return value
        if kind in ("array", "bfloat16") and isinstance(value, str) and not key:
            if value == _STRUCTURE or value not in self.members:
                raise self.fail(f"its structure names the array member "
                                f"{reprlib.repr(value)}, which it does not hold")
            if taken is not None:
                if value in taken:
                    raise self.fail(f"its structure names the array member "
                                    f"{reprlib.repr(value)} twice (save writes each array "
                                    f"once)")
                taken.add(value)
            array = read(value)
            if kind == "bfloat16" and array is not None:
                if array.dtype != np.uint16:
                    raise self.fail(f"its bfloat16 member {value!r} holds {array.dtype}, not "
                                    f"the uint16 bits of bfloat16")
                array = array.view(_interop.bfloat16())
            return array
        raise self.fail(f"its structure holds {reprlib.repr(node)}, which save does not write")
