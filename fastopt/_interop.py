"""Arrays in and out: which framework an array is from, zero-copy views for the kernels.

The kernels see NumPy arrays (CPU) or CuPy arrays (NVIDIA GPU). Arrays of the other
frameworks come in through DLPack (or torch's own zero-copy ``Tensor.numpy()`` on the CPU,
which is 2.5x cheaper per tensor than ``np.from_dlpack`` here) and go back the same way.

- NumPy, PyTorch and CuPy arrays are mutable: parameters are updated in place.
- JAX and TensorFlow arrays are immutable (they export read-only DLPack): results are
  written to new 64-byte-aligned buffers and handed back as new arrays of that framework.
  fastopt never writes into a buffer it has handed to them.

No framework is imported here; an array's framework is read off its type's module.
"""

import bisect
import math
import sys
import threading
from typing import NamedTuple

import numpy as np

try:
    from fastopt._cpu import _runtime
except ImportError:  # not built: the checks that use it go through Python
    _runtime = None

FLOAT_DTYPES = ("float32", "float64")
PARAM_DTYPES = FLOAT_DTYPES + ("bfloat16", "float16")  # optimizer parameters and gradients
ALIGN = 64  # TF aborts on DLPack buffers with less alignment; 64 also suits AVX-512
_ROOTS = {"torch": "torch", "jax": "jax", "jaxlib": "jax", "tensorflow": "tensorflow",
          "keras": "tensorflow", "cupy": "cupy"}
MUTABLE = ("numpy", "torch", "cupy")


class View(NamedTuple):
    """A kernel-ready array (NumPy or CuPy) for one user array, and where it came from."""
    array: object
    framework: str
    device: tuple  # ("cpu", 0) or ("cuda", ordinal)


# View(...) without NamedTuple's Python-level __new__, for the per-tensor fast paths of a
# step: _new_view(View, (array, framework, device)) costs 0.1 instead of 0.4 us
_new_view = tuple.__new__


_TYPE_FRAMEWORK = {}  # type -> framework_of's answer for its instances, once asked


def framework_of(x):
    """'numpy', 'torch', 'jax', 'tensorflow' or 'cupy' for an array of that framework (an
    np.ndarray, torch.Tensor, jax.Array or JAX tracer, tf.Tensor or tf.Variable,
    cupy.ndarray, of any layout: _check_array refuses those the kernels cannot read); None
    for anything else, such as a torch.nn.Module, a torch.Size, a tf.SparseTensor or a list."""
    if isinstance(x, np.ndarray):
        return "numpy"
    cls = type(x)
    fw = _TYPE_FRAMEWORK.get(cls, False)
    if fw is False:
        fw = _ROOTS.get(cls.__module__.partition(".")[0])
        module = sys.modules.get(fw)  # None for a Keras 3 object on another backend
        arrays = (() if module is None
                  else (module.Tensor, module.Variable) if fw == "tensorflow"
                  else (module.Array, module.core.Tracer) if fw == "jax"
                  else module.Tensor if fw == "torch" else module.ndarray)
        fw = _TYPE_FRAMEWORK[cls] = fw if issubclass(cls, arrays) else None
    return fw


def _device(x, fw):
    if fw == "numpy":
        return ("cpu", 0)
    if fw == "cupy":
        return ("cuda", x.device.id)
    if fw == "torch":
        return (x.device.type, x.device.index or 0)
    if fw == "jax":
        dev = next(iter(x.devices()))
        return ("cuda" if dev.platform == "gpu" else dev.platform, dev.id)
    kind, _, index = x.device.rpartition("device:")[2].partition(":")  # tensorflow
    return ("cuda" if kind == "GPU" else kind.lower(), int(index or 0))


_DTYPE_NAMES = {}  # NumPy dtype -> its name (dtype.name is computed in Python, ~2 us)


def _dtype_name(x, fw):
    if fw == "torch":
        return str(x.dtype).removeprefix("torch.")
    if fw == "tensorflow":
        return x.dtype.name
    name = _DTYPE_NAMES.get(x.dtype)
    if name is None:
        name = _DTYPE_NAMES[x.dtype] = np.dtype(x.dtype).name
    return name


_NP_FLOATS = frozenset((np.dtype(np.float32), np.dtype(np.float64)))
_CPU = ("cpu", 0)
_torch_floats = None  # {torch.float32: False, torch.float64: True}, once torch is in use


def torch_floats():
    """{torch.float32: False, torch.float64: True}: the torch dtypes the kernels take as
    they are, and whether each is float64 (torch imported)."""
    global _torch_floats
    if _torch_floats is None:
        torch = sys.modules["torch"]
        _torch_floats = {torch.float32: False, torch.float64: True}
    return _torch_floats


def _plain_cpu_torch(x, kept=True):
    """The NumPy view of torch tensor x if it is the common case, a contiguous
    float32/float64 CPU tensor without lazy bits that does not require grad, checked with
    torch's cheapest attributes (about 0.6 us instead of 3); else None (also for anything
    that is not a dense tensor: a torch.Size; sparse, MKL-DNN, nested: refused later).
    ``kept=False``: the view is used only during the call (a gradient), so it may be made
    in C over x's memory (_runtime.tensor_view: 0.8 us less than x.numpy())."""
    floats = torch_floats()
    try:
        if (not x.requires_grad and x.is_cpu and x.dtype in floats
                and x.is_contiguous() and not x.is_neg() and not x.is_conj()):
            view = None
            if not kept and _runtime is not None:
                shape = tuple(x.shape)
                if 0 not in shape:
                    view = _runtime.tensor_view(x, floats[x.dtype], shape)
            return x.numpy() if view is None else view
    except (AttributeError, RuntimeError, TypeError):
        pass
    return None


def describe(x):
    """A short description of x for error messages."""
    fw = framework_of(x)
    if fw is None:
        return type(x).__name__
    return f"{fw} array of shape {tuple(x.shape)} and dtype {_dtype_name(x, fw)}"


def _check_array(x, name, dtypes=FLOAT_DTYPES):
    """(framework, device) of array argument `name`, if the kernels can read it: a dense
    array of one of `dtypes` (names; None for any) in CPU or CUDA memory. Anything else is
    refused with a TypeError (ValueError for a deleted JAX array) naming the argument, and
    saying how to convert it where there is a way."""
    fw = framework_of(x)
    if fw is None:
        cls = type(x)
        fix = None
        if cls.__module__.startswith("tensorflow."):
            fix = {"SparseTensor": "densify it first: tf.sparse.to_dense(x)",
                   "RaggedTensor": "make it dense first: x.to_tensor()",
                   "IndexedSlices": "densify it first: tf.convert_to_tensor(x)"}.get(cls.__name__)
        elif cls.__module__.startswith("keras.") and cls.__name__ == "Variable":
            fix = "pass the variable's value (x.value) instead"
        elif hasattr(x, "todense"):  # JAX's BCOO, SciPy's and CuPy's sparse matrices
            fix = f"densify it first: {'x.toarray()' if hasattr(x, 'toarray') else 'x.todense()'}"
        raise TypeError(f"{name}: expected an array (NumPy, PyTorch, JAX, TensorFlow or CuPy), "
                        f"got {cls.__name__}" + ("" if fix is None else f"; {fix}"))
    if fw == "numpy":
        if not x.dtype.isnative:
            raise TypeError(f"{name}: byte order of dtype {x.dtype.str!r} is not this "
                            f"machine's; convert it first: arr.astype(arr.dtype.newbyteorder('='))")
        if isinstance(x, np.matrix):
            raise TypeError(f"{name}: np.matrix is not supported (its operators are matrix "
                            f"algebra); pass np.asarray(x), a plain array of the same memory")
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{name}: masked arrays are not supported (the mask would be "
                            f"ignored); pass x.filled(value), or np.asarray(x) to use every entry")
    elif fw == "torch":
        torch = sys.modules["torch"]
        if x.is_nested:
            raise TypeError(f"{name}: nested torch tensors are not supported; pad it first: "
                            f"torch.nested.to_padded_tensor(x, 0.0)")
        if x.layout is not torch.strided:
            raise TypeError(f"{name}: torch tensors of layout {x.layout} are not supported; "
                            f"densify it first: x.to_dense()")
        if type(x).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
            raise TypeError(f"{name}: torch tensor subclass {type(x).__name__} is not "
                            f"supported (it has no plain memory); pass a plain torch.Tensor")
        try:
            x.data_ptr()
        except (RuntimeError, ValueError) as e:
            raise TypeError(f"{name}: this torch tensor has no memory to read (a tensor traced "
                            f"by torch.func or vmap, or an uninitialized lazy parameter); "
                            f"pass a materialized tensor, outside such transforms") from e
    elif fw == "jax":
        if isinstance(x, sys.modules["jax"].core.Tracer):
            raise TypeError(f"{name}: a traced JAX value (inside jax.jit, grad or vmap); "
                            f"fastopt needs concrete arrays, so call it outside the transform")
        if x.is_deleted():
            raise ValueError(f"{name}: this JAX array has been deleted (donated to a jitted "
                             f"function, or x.delete())")
        if len(x.devices()) != 1:
            raise TypeError(f"{name}: JAX arrays spread over several devices are not "
                            f"supported; put it on one: jax.device_put(x, jax.devices()[0])")
    elif fw == "tensorflow" and sys.modules["tensorflow"].is_symbolic_tensor(x):
        raise TypeError(f"{name}: a symbolic TensorFlow tensor (inside tf.function); fastopt "
                        f"needs eager tensors, so call it outside tf.function")
    try:
        dtype = _dtype_name(x, fw)
    except TypeError:  # a dtype NumPy has no name for (JAX's PRNG keys)
        dtype = str(x.dtype)
    if dtypes is not None and dtype not in dtypes:
        raise TypeError(f"{name}: dtype {dtype} is not supported here; expected "
                        f"{' or '.join(dtypes)}")
    device = _device(x, fw)
    if device[0] not in ("cpu", "cuda"):
        raise TypeError(f"{name}: arrays on device {device[0]} are not supported; "
                        f"use CPU or NVIDIA GPU (CUDA) arrays")
    return fw, device


def _from_dlpack(x, device):
    if device[0] == "cuda":
        import cupy
        return cupy.from_dlpack(x)
    return np.from_dlpack(x)


def import_param(x, role, index):
    """View of ``role[index]`` (a parameter) for the kernels, checked; writable if its
    framework is mutable. Error messages name the argument as ``role[index]``."""
    # the common cases first, kept cheap: no message is built
    if type(x) is np.ndarray:
        flags = x.flags
        if x.dtype in _NP_FLOATS and flags.c_contiguous and flags.writeable:
            return _new_view(View, (x, "numpy", _CPU))
    elif type(x).__module__ == "torch":
        arr = _plain_cpu_torch(x)
        if arr is not None:
            return _new_view(View, (arr, "torch", _CPU))
    return import_array(x, f"{role}[{index}]", PARAM_DTYPES)


def import_array(x, name, dtypes=FLOAT_DTYPES):
    """View of array argument `name` (of one of `dtypes`) for the kernels, checked;
    writable if its framework is mutable."""
    fw, device = _check_array(x, name, dtypes)
    if fw == "torch":
        if x.requires_grad:
            raise TypeError(f"{name}: torch tensor requires grad; pass p.detach() (or p.data) "
                            f"so fastopt can update it in place, outside autograd")
        if x.is_neg() or x.is_conj():
            raise ValueError(f"{name}: torch tensor carries a lazy negation/conjugation bit, "
                             f"which DLPack cannot carry; call .resolve_neg() first")
        if not x.is_contiguous():
            raise ValueError(f"{name}: torch tensor is not contiguous, so it cannot be updated "
                             f"in place; make the parameter contiguous first")
        arr = _torch_view(x, device, name)
    elif fw in ("numpy", "cupy"):
        arr = x
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name}: array is not C-contiguous, so it cannot be updated in "
                             f"place; use a contiguous copy (np.ascontiguousarray) as the "
                             f"parameter")
        if fw == "numpy" and not arr.flags.writeable:  # CuPy arrays are always writable
            raise ValueError(f"{name}: array is read-only, so it cannot be updated in place; "
                             f"pass a writable array (arr.copy())")
    else:
        arr = _immutable_view(x, fw, device, name)
    return View(arr, fw, device)


def bfloat16():
    """NumPy's bfloat16 dtype (ml_dtypes', as JAX's)."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _bfloat16(x, fw):
    return _dtype_name(x, fw) == "bfloat16"


def _no_cuda_bfloat16(name):
    return TypeError(f"{name}: bfloat16 arrays on CUDA are not supported yet (CuPy has no "
                     f"bfloat16); keep them on the CPU or use float16/float32")


def _torch_view(x, device, name):
    """The NumPy (CPU) or CuPy view of a dense torch tensor; bfloat16, which NumPy has no
    DLPack code for, as ml_dtypes' bfloat16 over the same memory."""
    if _bfloat16(x, "torch"):
        if device[0] != "cpu":
            raise _no_cuda_bfloat16(name)
        return x.view(sys.modules["torch"].int16).numpy().view(bfloat16())
    return x.numpy() if device[0] == "cpu" else _from_dlpack(x, device)


def _immutable_view(x, fw, device, name):
    """A read-only view of a JAX or TensorFlow array (bfloat16: a host copy may be made)."""
    if _bfloat16(x, fw):
        if device[0] != "cpu":
            raise _no_cuda_bfloat16(name)
        return np.asarray(x.numpy() if fw == "tensorflow" else x)
    return _from_dlpack(_tf_tensor(x) if fw == "tensorflow" else x, device)


def import_grad(x, role, index):
    """View of ``role[index]`` (a gradient) for the kernels, read only; contiguous, copying
    only if it is not."""
    if type(x) is np.ndarray:
        if x.dtype in _NP_FLOATS and x.flags.c_contiguous:
            return _new_view(View, (x, "numpy", _CPU))
    elif type(x).__module__ == "torch":
        arr = _plain_cpu_torch(x, kept=False)
        if arr is not None:
            return _new_view(View, (arr, "torch", _CPU))
    return import_input(x, f"{role}[{index}]", PARAM_DTYPES)


def plain_grad(x, framework):
    """The kernel view of gradient x if it is the common case of `framework` that
    import_grad takes without a copy (a C-contiguous ndarray; a plain torch CPU tensor, see
    _plain_cpu_torch), else None; its dtype is not checked."""
    if framework == "numpy":
        return x if type(x) is np.ndarray and x.flags.c_contiguous else None
    if framework == "torch" and type(x).__module__ == "torch":
        return _plain_cpu_torch(x, kept=False)
    return None


def import_input(x, name, dtypes=FLOAT_DTYPES):
    """View of array argument `name` (of one of `dtypes`) for the kernels, read only;
    contiguous, copying only if it is not."""
    fw, device = _check_array(x, name, dtypes)
    if fw == "torch":
        x = x.detach()
        if x.is_neg() or x.is_conj():
            x = x.resolve_neg().resolve_conj()
        arr = _torch_view(x, device, name)
    elif fw in ("numpy", "cupy"):
        arr = x
    else:
        arr = _immutable_view(x, fw, device, name)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return View(arr, fw, device)


def view_token(x, view):
    """What a checked view of array x (of a mutable framework) depends on: everything a
    fresh import would check that can change while x stays the same object (in place:
    ``w.shape = ...``, ``w.dtype = ...``; for torch also ``p.data = ...``, ``p.t_()``,
    ``p.as_strided_(...)``)."""
    if view.framework == "torch":
        return (x.data_ptr(), x.shape, x.stride(), x.dtype)
    if view.framework == "cupy":
        return (x.data.ptr, x.shape, x.strides, x.dtype)
    return (x.shape, x.dtype)  # numpy: the memory of an array object cannot move


def view_still_valid(x, view, token, writable=True, leaf=False):
    """Whether a view checked at an earlier step still stands for array x: the checks a
    fresh import would make, at a tenth of its cost (0.1-0.4 us instead of 0.5-2).
    `leaf`: a torch x may require grad (fastopt.torch updates autograd leaves in place)."""
    fw = view.framework
    if fw == "numpy":
        if not writable:  # a read-only view of x's memory: in-place changes of x leave it
            return True
        # carray: C-contiguous, aligned, writable (an unaligned parameter is imported anew)
        return x.shape == token[0] and x.dtype is token[1] and x.flags.carray
    if fw == "torch":
        return ((leaf or not writable or not x.requires_grad) and x.data_ptr() == token[0]
                and x.shape == token[1] and x.stride() == token[2] and x.dtype is token[3])
    if fw == "cupy":
        return (x.data.ptr == token[0] and x.shape == token[1] and x.strides == token[2]
                and x.dtype is token[3])
    return False


def extent(x):
    """[lo, hi): the bytes array x (NumPy, PyTorch or CuPy, any strides) spans in memory,
    or None if it holds no elements or cannot be written in place (JAX, TensorFlow)."""
    fw = framework_of(x)
    if fw == "numpy":
        ptr, strides, itemsize = x.__array_interface__["data"][0], x.strides, x.itemsize
    elif fw == "torch":
        torch = sys.modules["torch"]
        if (x.layout != torch.strided or x.is_nested
                or type(x).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__):
            return None  # no plain memory: the import refuses it
        try:
            itemsize = x.element_size()
            ptr, strides = x.data_ptr(), [s * itemsize for s in x.stride()]
        except (RuntimeError, ValueError):  # no memory (traced, lazy): the import refuses it
            return None
    elif fw == "cupy":
        ptr, strides, itemsize = x.data.ptr, x.strides, x.itemsize
    else:
        return None
    if math.prod(x.shape) == 0:
        return None
    lo = hi = ptr
    for n, stride in zip(x.shape, strides):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + itemsize


class WrittenSpans:
    """The memory a call writes, sorted, for checking call after call the arrays it reads
    against it: in C where the compiled helper is built and the arrays are NumPy's (about
    0.01 us per array), else by bisection in Python."""

    def __init__(self, written, allowed=()):
        """written: (extent, name) of each array the call writes (extent as from
        ``extent``; None is skipped); ``clash`` is the names of the first two that overlap,
        or None. allowed: for each array the calls read, the written name whose memory it
        may share exactly (a gradient its own parameter)."""
        spans = sorted((e[0], e[1], name) for e, name in written if e is not None)
        self.clash = next(((a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1]),
                          None)
        self.written = written
        self.los = [s[0] for s in spans]
        self.his = [s[1] for s in spans]
        self.names = [s[2] for s in spans]
        index = {name: j for j, name in enumerate(self.names)}
        self.allowed_names = list(allowed)
        self.allowed = [index.get(name, -1) for name in allowed]
        self._arrays = (np.array(self.los, np.int64), np.array(self.his, np.int64),
                        np.array(self.allowed, np.int64))

    def _search(self, e, allowed):
        """Index of a written span that extent e overlaps other than exactly span
        `allowed`, else None (the spans are disjoint, so their ends are sorted too)."""
        j = bisect.bisect_left(self.los, e[1])  # spans [0, j) start before e ends
        while j > 0 and self.his[j - 1] > e[0]:
            j -= 1
            if not (j == allowed and (self.los[j], self.his[j]) == e):
                return j
        return None

    def overlapped(self, e, allowed_name):
        """The name of written memory that extent e may not overlap but does, else None."""
        if e is None:
            return None
        j = self._search(e, self.names.index(allowed_name) if allowed_name in self.names
                         else -1)
        return None if j is None else self.names[j]

    def first_bad_read(self, arrays, host):
        """The index of the first of `arrays` (kernel views, in the order of `allowed`;
        host: NumPy arrays) that overlaps written memory it may not, else None."""
        if host and _runtime is not None:
            k = _runtime.first_read_overlap(*self._arrays[:2], arrays, self._arrays[2])
            return None if k < 0 else k
        for k, a in enumerate(arrays):
            e = extent(a)
            if e is not None and self._search(e, self.allowed[k]) is not None:
                return k
        return None


def _tf_tensor(x):
    # a tf.Variable has no __dlpack__; its value is a tensor sharing the buffer
    return x if hasattr(x, "__dlpack__") else x.read_value()


def array_module(arr):
    """numpy for a NumPy kernel view, cupy for a CuPy one."""
    if isinstance(arr, np.ndarray):
        return np
    import cupy
    return cupy


# host buffers this large are recycled where new_array is asked to (reuse=True): smaller
# ones the C allocator reuses itself, but each larger one is fresh pages from the OS, which
# it clears on first touch (25-45 ms per 524 MB here, a first call up to ~800 ms when it
# must compact memory for huge pages)
REUSE_MIN_BYTES = 32 << 20


class _Recycler:
    """The last `slots` large host buffers handed out with reuse=True, each handed out
    again once nothing but this list refers to it. The arrays made from a buffer are views
    that keep it alive, and so are the framework tensors made from those (torch.from_numpy,
    a DLPack capsule): a buffer is free only when all of them are gone."""

    def __init__(self, slots=2):
        self.slots = slots
        self._lock = threading.Lock()
        self._buffers = []  # the most recently handed out last

    def take(self, nbytes):
        with self._lock:
            for i in range(len(self._buffers)):
                # free: referred to by this list and getrefcount's argument only
                free = sys.getrefcount(self._buffers[i]) == 2
                if free and self._buffers[i].size == nbytes:
                    raw = self._buffers.pop(i)
                    break
            else:
                raw = np.empty(nbytes, np.uint8)
            self._buffers.append(raw)
            del self._buffers[:-self.slots]
            return raw

    def clear(self):
        with self._lock:
            self._buffers.clear()


_RECYCLER = _Recycler()


def empty_cache():
    """Release the large host buffers fastopt keeps for reuse.

    ``fastopt.distill.kd_loss`` hands out its gradient in a buffer it takes again on a
    later call once every array and tensor viewing it is gone, so that a training loop
    does not pay for fresh pages from the OS on every step (for 4096 x 32000 float32
    logits, 25-45 ms of a ~100 ms call here). It keeps the last two buffers of 32 MiB or
    more: a loop that holds one gradient while computing the next needs both. This drops
    them; the next call allocates afresh."""
    _RECYCLER.clear()


def aligned_empty(shape, dtype, reuse=False):
    """np.empty whose data starts on a 64-byte boundary; reuse: in a recycled buffer where
    it has REUSE_MIN_BYTES or more (empty_cache)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
    if reuse and nbytes >= REUSE_MIN_BYTES:
        raw = _RECYCLER.take(nbytes + ALIGN)
    else:
        raw = np.empty(nbytes + ALIGN, np.uint8)
    offset = -raw.ctypes.data % ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def empty_like(arr, shape=None, dtype=None):
    """Uninitialized array like a kernel view, of its shape and dtype or `shape` and
    `dtype` (NumPy: 64-byte aligned; CuPy: on its device)."""
    shape = arr.shape if shape is None else shape
    dtype = arr.dtype if dtype is None else dtype
    if isinstance(arr, np.ndarray):
        return aligned_empty(shape, dtype)
    import cupy
    with arr.device:
        return cupy.empty(shape, dtype)


def copy_to_like(value, like, shape=None, dtype=None):
    """A new buffer like `like` (same device, `shape` and `dtype` if given), holding array
    `value`."""
    out = empty_like(like, shape, dtype)
    if isinstance(out, np.ndarray):
        out[...] = value if isinstance(value, np.ndarray) else np.asarray(_host(value))
    else:
        import cupy
        out[...] = cupy.asarray(value)
    return out


def _host(value):
    """A host (NumPy-readable) form of an array of any framework."""
    if framework_of(value) == "cupy":
        return value.get()
    if framework_of(value) == "torch":
        return _torch_view(value.detach().cpu().contiguous(), _CPU, "value")
    return value


def full_like(arr, value, shape=None, dtype=None):
    out = empty_like(arr, shape, dtype)
    out.fill(value)
    return out


def export(arr, framework):
    """Hand a buffer fastopt will not write again to an immutable framework, zero-copy."""
    if framework == "jax":
        import jax.dlpack
        if arr.dtype.name == "bfloat16":  # no NumPy DLPack code: a copy
            return jax.numpy.asarray(arr)
        return jax.dlpack.from_dlpack(arr)
    if framework == "tensorflow":
        import tensorflow as tf
        if arr.dtype.name == "bfloat16":
            return tf.convert_to_tensor(arr)
        capsule = arr.__dlpack__() if isinstance(arr, np.ndarray) else arr.toDlpack()
        return tf.experimental.dlpack.from_dlpack(capsule)
    raise ValueError(f"export: {framework} arrays are updated in place, not exported")


FRAMEWORKS = ("numpy", "torch", "jax", "tensorflow", "cupy")


def new_array(shape, dtype, like, reuse=False):
    """(buffer, finish) for a new array of `shape` and `dtype` (a NumPy dtype) in the
    framework and on the device of `like` (an array, a framework name, or None for NumPy):
    fill the kernel-ready `buffer`, then ``finish()`` hands it over as that framework's
    array, zero-copy. reuse: a large host buffer may be a recycled one (empty_cache)."""
    if like is None or isinstance(like, str):
        fw = {"tf": "tensorflow", None: "numpy"}.get(like, like)
        if fw not in FRAMEWORKS:
            raise ValueError(f"like must be an array or one of {', '.join(FRAMEWORKS)}, "
                             f"got {like!r}")
        device = ("cuda", 0) if fw == "cupy" else _CPU
    else:
        fw, device = _check_array(like, "like", dtypes=None)
    if device[0] == "cuda":
        import cupy
        with cupy.cuda.Device(device[1]):
            buf = cupy.empty(shape, dtype)
    else:
        buf = aligned_empty(shape, dtype, reuse)
    if fw in ("numpy", "cupy"):
        return buf, lambda: buf
    if fw == "torch":
        import torch
        return buf, lambda: torch.from_numpy(buf) if device[0] == "cpu" else torch.from_dlpack(buf)
    return buf, lambda: export(buf, fw)


def loaded_frameworks():
    """The optional frameworks already imported in this process."""
    return [m for m in ("torch", "jax", "tensorflow", "cupy", "numba") if m in sys.modules]
