r"""Weight initializers with torch.nn.init's names, fans, gains and defaults.

Every random initializer draws from a counter-based generator (Philox-4x32-10, see
``kernels/include/fastopt/random.h``) keyed by the ``seed`` you pass: the same seed gives
bit-identical weights on every backend (Cython, Numba, CuPy, the NumPy reference), on CPU
and GPU, for any number of threads. Nothing depends on global random state, so ``seed`` is
required; give each layer its own (``seed=base + i``). Values are computed in float64 and
rounded once to the array's dtype.

Two forms of each initializer:

- in place, with a trailing underscore, for mutable arrays (NumPy, PyTorch, CuPy; a torch
  parameter that requires grad is written without recording autograd history, as in
  torch.nn.init): ``xavier_uniform_(w, seed=0)`` fills ``w`` and returns it;
- functional, without the underscore, for any framework: ``xavier_uniform((256, 128),
  "float32", like="jax", seed=0)`` returns a new array of ``like``'s framework (an array,
  whose device is used too, or one of "numpy", "torch", "jax", "tensorflow", "cupy");
  its hyperparameters are keywords.

Fans follow torch: for a weight of shape ``(out, in, *kernel)``, ``fan_in = in * prod(kernel)``
and ``fan_out = out * prod(kernel)``; fan-based initializers need 2 or more dims.

>>> import numpy as np, fastopt
>>> w = np.empty((256, 128), np.float32)
>>> _ = fastopt.init.kaiming_uniform_(w, nonlinearity="relu", seed=0)
>>> bool(np.abs(w).max() <= np.sqrt(6 / 128))
True
>>> fastopt.init.xavier_normal((3, 4), seed=7).shape
(3, 4)
"""

import inspect
import math
import numbers
import sys

import numpy as np

from fastopt import _backends, _check, _interop
from fastopt._backends._layout import BITS, NORMAL, TRUNC_NORMAL, UNIFORM
from fastopt._config import get_num_threads

__all__ = [
    "calculate_gain", "uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
    "trunc_normal_", "orthogonal_", "sparse_", "lecun_uniform_", "lecun_normal_",
    "uniform", "normal", "constant", "ones", "zeros", "eye", "dirac", "xavier_uniform",
    "xavier_normal", "kaiming_uniform", "kaiming_normal", "trunc_normal", "orthogonal",
    "sparse", "lecun_uniform", "lecun_normal",
]

# JAX's correction of a standard normal truncated to [-2, 2] back to unit variance
_TRUNC2_STD = 0.87962566103423978

_GAINS = {"linear": 1.0, "conv1d": 1.0, "conv2d": 1.0, "conv3d": 1.0,
          "conv_transpose1d": 1.0, "conv_transpose2d": 1.0, "conv_transpose3d": 1.0,
          "sigmoid": 1.0, "tanh": 5.0 / 3, "relu": math.sqrt(2.0), "selu": 3.0 / 4}


def calculate_gain(nonlinearity, param=None):
    r"""The recommended gain for a nonlinearity, as torch.nn.init.calculate_gain.

    linear, conv*, conv_transpose*, sigmoid: 1; tanh: 5/3; relu: :math:`\sqrt 2`;
    leaky_relu: :math:`\sqrt{2 / (1 + s^2)}` with negative slope ``param`` (default 0.01);
    selu: 3/4.
    """
    if not isinstance(nonlinearity, str):
        raise TypeError(f"nonlinearity must be a str (one of {', '.join(sorted(_GAINS))}, "
                        f"leaky_relu), got {type(nonlinearity).__name__}")
    if nonlinearity in _GAINS:
        return _GAINS[nonlinearity]
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else _check.real("param", param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    raise ValueError(f"nonlinearity must be one of {', '.join(sorted(_GAINS))}, leaky_relu; "
                     f"got {nonlinearity!r}")


MAX_ELEMENTS = 2**62  # beyond any memory; np.empty's own limit is 2**63 bytes


def _shape(shape):
    """A shape argument (an int, or a tuple or list of them) as a tuple of ints."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__}")
    shape = tuple(_check.integer(f"shape[{i}]", n, lo=0, hi=MAX_ELEMENTS)
                  for i, n in enumerate(shape))
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"shape {shape} has more than 2**62 elements")
    return shape


def _fans(shape):
    """(fan_in, fan_out) of a weight shaped (out, in, *kernel), as torch."""
    if len(shape) < 2:
        raise ValueError(f"tensor: fan in and fan out need 2 or more dims, got shape "
                         f"{tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fan(shape, mode):
    fan_in, fan_out = _fans(shape)
    return fan_in if _check.choice("mode", mode, ("fan_in", "fan_out")) == "fan_in" else fan_out


def _random_target(tensor, seed, backend):
    """(kernel view, seed) of a random initializer's arguments, checked."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    _backends.check_name(backend)
    return _target(tensor), int(seed)


def _target(tensor):
    """The writable kernel view (NumPy or CuPy) of an in-place initializer's tensor."""
    fw = _interop.framework_of(tensor)
    if fw in ("jax", "tensorflow"):
        raise TypeError(f"tensor: {fw} arrays are immutable; use the functional form, e.g. "
                        f"fastopt.init.xavier_uniform(shape, like=tensor, seed=...)")
    if fw == "torch" and tensor.requires_grad:
        tensor = tensor.detach()  # write the parameter's memory, outside autograd
    return _interop.import_array(tensor, "tensor").array


def _fill(arr, kind, reals, seed, backend, stream=0):
    device = "cpu" if isinstance(arr, np.ndarray) else "cuda"
    fill = _backends.resolve("random_fill", backend, device, arr.dtype)
    fill(arr, kind, tuple(reals) + (0.0,) * (7 - len(reals)), seed, stream,
         n_threads=get_num_threads())


def _draw_uniform(arr, low, high, seed, backend):
    _fill(arr, UNIFORM, (low, high - low), seed, backend)


def _draw_normal(arr, mean, std, seed, backend):
    _fill(arr, NORMAL, (mean, std), seed, backend)


def _draw_trunc_normal(arr, mean, std, a, b, seed, backend):
    lo, hi = (a - mean) / std, (b - mean) / std
    p_lo = 0.5 * math.erfc(-lo / math.sqrt(2))  # Phi(lo) and 1 - Phi(lo), each accurate
    q_lo = 0.5 * math.erfc(lo / math.sqrt(2))
    width = (0.5 * math.erfc(-hi / math.sqrt(2)) - p_lo if lo < 0
             else q_lo - 0.5 * math.erfc(hi / math.sqrt(2)))
    _fill(arr, TRUNC_NORMAL, (mean, std, a, b, p_lo, q_lo, width), seed, backend)


def uniform_(tensor, a=0.0, b=1.0, *, seed, backend="auto"):
    r"""Fill with :math:`\mathcal U(a, b)`, as ``torch.nn.init.uniform_`` (``a <= b``)."""
    arr, seed = _random_target(tensor, seed, backend)
    a, b = _check.real("a", a), _check.real("b", b)
    if a > b:
        raise ValueError(f"a must be <= b, got a={a}, b={b}")
    _draw_uniform(arr, a, b, seed, backend)
    return tensor


def normal_(tensor, mean=0.0, std=1.0, *, seed, backend="auto"):
    r"""Fill with :math:`\mathcal N(\text{mean}, \text{std}^2)`, as ``torch.nn.init.normal_``
    (Box-Muller on Philox uniforms)."""
    arr, seed = _random_target(tensor, seed, backend)
    _draw_normal(arr, _check.real("mean", mean), _check.real("std", std, lo=0), seed, backend)
    return tensor


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, *, seed, backend="auto"):
    r"""Fill with :math:`\mathcal N(\text{mean}, \text{std}^2)` truncated to ``[a, b]``, as
    ``torch.nn.init.trunc_normal_`` (``a`` and ``b`` are absolute bounds, not in units of std).

    Inverse-CDF sampling: :math:`x = \text{mean} + \text{std}\,\Phi^{-1}(u)` with ``u``
    uniform in :math:`[\Phi(\alpha), \Phi(\beta)]`, :math:`\alpha = (a - \text{mean}) /
    \text{std}`, :math:`\beta = (b - \text{mean}) / \text{std}`, clamped to ``[a, b]``.
    :math:`\Phi^{-1}` is Acklam's rational approximation (relative error < 1.2e-9).
    """
    arr, seed = _random_target(tensor, seed, backend)
    mean = _check.real("mean", mean)
    std = _check.real("std", std, lo=0, lo_open=True)
    a, b = _check.real("a", a), _check.real("b", b)
    if not a < b:
        raise ValueError(f"a must be < b, got a={a}, b={b}")
    _draw_trunc_normal(arr, mean, std, a, b, seed, backend)
    return tensor


def constant_(tensor, val):
    """Fill with the constant ``val``, as ``torch.nn.init.constant_``."""
    arr = _target(tensor)
    arr.fill(_check.real("val", val))
    return tensor


def ones_(tensor):
    """Fill with 1, as ``torch.nn.init.ones_``."""
    return constant_(tensor, 1.0)


def zeros_(tensor):
    """Fill with 0, as ``torch.nn.init.zeros_``."""
    return constant_(tensor, 0.0)


def eye_(tensor):
    """The identity matrix (a 2-D tensor; ones on the diagonal of non-square ones), as
    ``torch.nn.init.eye_``."""
    arr = _target(tensor)
    if arr.ndim != 2:
        raise ValueError(f"tensor: eye_ takes a 2-D tensor, got shape {tuple(arr.shape)}")
    arr.fill(0)
    n = min(arr.shape)
    arr.reshape(-1)[:n * (arr.shape[1] + 1):arr.shape[1] + 1] = 1
    return tensor


def dirac_(tensor, groups=1):
    """The Dirac delta (a 3-, 4- or 5-D convolution weight that preserves its input's
    channels, in ``groups`` groups), as ``torch.nn.init.dirac_``."""
    arr = _target(tensor)
    if arr.ndim not in (3, 4, 5):
        raise ValueError(f"tensor: dirac_ takes a 3-, 4- or 5-D tensor, got shape "
                         f"{tuple(arr.shape)}")
    groups = _check.integer("groups", groups, lo=1)
    if arr.shape[0] % groups:
        raise ValueError(f"groups: dim 0 of the tensor ({arr.shape[0]}) must be divisible "
                         f"by groups ({groups})")
    per_group = arr.shape[0] // groups
    arr.fill(0)
    d = _xp(arr).arange(min(per_group, arr.shape[1]))
    center = tuple(k // 2 for k in arr.shape[2:])
    for g in range(groups):
        arr[(g * per_group + d, d) + center] = 1
    return tensor


def xavier_uniform_(tensor, gain=1.0, *, seed, backend="auto"):
    r"""Glorot & Bengio (2010), as ``torch.nn.init.xavier_uniform_``: :math:`\mathcal U(-b, b)`,
    :math:`b = \text{gain}\sqrt{6 / (\text{fan\_in} + \text{fan\_out})}`."""
    arr, seed = _random_target(tensor, seed, backend)
    fan_in, fan_out = _fans(arr.shape)
    bound = _check.real("gain", gain) * math.sqrt(6.0 / max(fan_in + fan_out, 1))
    _draw_uniform(arr, -bound, bound, seed, backend)
    return tensor


def xavier_normal_(tensor, gain=1.0, *, seed, backend="auto"):
    r"""Glorot & Bengio (2010), as ``torch.nn.init.xavier_normal_``: :math:`\mathcal N(0,
    \sigma^2)`, :math:`\sigma = \text{gain}\sqrt{2 / (\text{fan\_in} + \text{fan\_out})}`."""
    arr, seed = _random_target(tensor, seed, backend)
    fan_in, fan_out = _fans(arr.shape)
    std = _check.real("gain", gain) * math.sqrt(2.0 / max(fan_in + fan_out, 1))
    _draw_normal(arr, 0.0, std, seed, backend)
    return tensor


def _kaiming_std(shape, a, mode, nonlinearity):
    fan = _fan(shape, mode)
    return calculate_gain(nonlinearity, a) / math.sqrt(max(fan, 1))


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", *, seed,
                     backend="auto"):
    r"""He et al. (2015), as ``torch.nn.init.kaiming_uniform_``: :math:`\mathcal U(-b, b)`,
    :math:`b = \text{gain}\sqrt{3 / \text{fan}}`, fan = fan_in or fan_out (``mode``), gain
    = calculate_gain(nonlinearity, a) (``a``: leaky_relu's negative slope)."""
    arr, seed = _random_target(tensor, seed, backend)
    bound = math.sqrt(3.0) * _kaiming_std(arr.shape, a, mode, nonlinearity)
    _draw_uniform(arr, -bound, bound, seed, backend)
    return tensor


def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu", *, seed,
                    backend="auto"):
    r"""He et al. (2015), as ``torch.nn.init.kaiming_normal_``: :math:`\mathcal N(0,
    \sigma^2)`, :math:`\sigma = \text{gain} / \sqrt{\text{fan}}`."""
    arr, seed = _random_target(tensor, seed, backend)
    _draw_normal(arr, 0.0, _kaiming_std(arr.shape, a, mode, nonlinearity), seed, backend)
    return tensor


def lecun_uniform_(tensor, *, seed, backend="auto"):
    r"""LeCun uniform (variance 1 / fan_in), as jax.nn.initializers.lecun_uniform with
    torch's fans: :math:`\mathcal U(-b, b)`, :math:`b = \sqrt{3 / \text{fan\_in}}`."""
    arr, seed = _random_target(tensor, seed, backend)
    bound = math.sqrt(3.0 / max(_fans(arr.shape)[0], 1))
    _draw_uniform(arr, -bound, bound, seed, backend)
    return tensor


def lecun_normal_(tensor, *, seed, backend="auto"):
    r"""LeCun normal (variance 1 / fan_in), as jax.nn.initializers.lecun_normal with torch's
    fans: a normal truncated at two of its standard deviations :math:`\sigma = \sqrt{1 /
    \text{fan\_in}} / 0.8796...`, which brings the variance back to 1 / fan_in."""
    arr, seed = _random_target(tensor, seed, backend)
    std = math.sqrt(1.0 / max(_fans(arr.shape)[0], 1)) / _TRUNC2_STD
    _draw_trunc_normal(arr, 0.0, std, -2 * std, 2 * std, seed, backend)
    return tensor


def orthogonal_(tensor, gain=1.0, *, seed, backend="auto"):
    r"""A (semi-)orthogonal matrix, as ``torch.nn.init.orthogonal_`` (Saxe et al. 2013): the
    tensor viewed as (rows, cols) = (shape[0], rest) is :math:`\text{gain}\, Q` from the QR
    decomposition of a standard-normal matrix (of its transpose when rows < cols), with
    :math:`Q`'s columns signed so that :math:`R` has a positive diagonal. The normals come
    from the backend; the QR runs on the host in float64 (NumPy), so GPU and CPU agree.
    """
    arr, seed = _random_target(tensor, seed, backend)
    if arr.ndim < 2:
        raise ValueError(f"tensor: orthogonal_ needs 2 or more dims, got shape "
                         f"{tuple(arr.shape)}")
    gain = _check.real("gain", gain)
    if arr.size == 0:
        return tensor
    rows, cols = arr.shape[0], arr.size // arr.shape[0]
    normals = _interop.empty_like(arr, (rows, cols))
    _draw_normal(normals, 0.0, 1.0, seed, backend)
    flat = np.asarray(_interop._host(normals), np.float64)
    q, r = np.linalg.qr(flat.T if rows < cols else flat)
    q *= np.sign(np.diag(r))
    q = (q.T if rows < cols else q) * gain
    arr[...] = _xp(arr).asarray(q.astype(arr.dtype).reshape(arr.shape))
    return tensor


def sparse_(tensor, sparsity, std=0.01, *, seed, backend="auto"):
    r"""A sparse 2-D matrix, as ``torch.nn.init.sparse_`` (Martens 2010): :math:`\mathcal N(0,
    \text{std}^2)` entries, then in each column ``ceil(sparsity * rows)`` entries set to 0.
    The zeroed rows of a column are those with the smallest Philox keys (stream 1; ties
    broken by row), so they too depend on the seed alone."""
    arr, seed = _random_target(tensor, seed, backend)
    if arr.ndim != 2:
        raise ValueError(f"tensor: sparse_ takes a 2-D tensor, got shape {tuple(arr.shape)}")
    sparsity = _check.real("sparsity", sparsity, lo=0, hi=1)
    std = _check.real("std", std, lo=0)
    rows, cols = arr.shape
    n_zeros = math.ceil(sparsity * rows)
    _draw_normal(arr, 0.0, std, seed, backend)
    if n_zeros == 0 or arr.size == 0:
        return tensor
    keys = _interop.empty_like(arr, arr.shape, np.uint32)
    _fill(keys, BITS, (), seed, backend, stream=1)
    order = (np.asarray(_interop._host(keys)).astype(np.uint64) << np.uint64(32)) \
        | np.arange(rows, dtype=np.uint64)[:, None]
    zero_rows = np.argpartition(order, n_zeros - 1, axis=0)[:n_zeros]
    xp = _xp(arr)
    arr[xp.asarray(zero_rows), xp.arange(cols)] = 0
    return tensor


def _xp(arr):
    """The array module of a kernel view: numpy, or cupy for GPU arrays."""
    return np if isinstance(arr, np.ndarray) else sys.modules["cupy"]


def _functional(inplace):
    """The functional form of in-place initializer `inplace`: a new array of `shape` and
    `dtype` (default: like's dtype, else float32) in like's framework."""
    name = inplace.__name__.rstrip("_")
    takes_seed = "seed" in inspect.signature(inplace).parameters

    def functional(shape, dtype=None, *, like=None, **kwargs):
        shape = _shape(shape)
        if dtype is None:
            dtype = like.dtype if _interop.framework_of(like) else "float32"
        buf, finish = _interop.new_array(shape, _float_dtype(dtype), like)
        inplace(buf, **kwargs)
        return finish()

    functional.__name__ = functional.__qualname__ = name
    functional.__doc__ = (
        f"Functional form of :func:`{inplace.__name__}`: a new array of ``shape`` and "
        f"``dtype`` (default: ``like``'s, else float32) of ``like``'s framework and device "
        f"(an array, or 'numpy', 'torch', 'jax', 'tensorflow', 'cupy'; default NumPy), "
        f"filled as ``{inplace.__name__}`` fills it"
        + (" (``seed`` required)" if takes_seed else "") + "; hyperparameters by keyword.\n\n"
        + inspect.cleandoc(inplace.__doc__ or ""))
    return functional


def _float_dtype(dtype):
    name = str(dtype).removeprefix("torch.") if type(dtype).__module__ == "torch" else None
    try:
        name = name or np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).name
    except TypeError:
        name = repr(dtype)
    if name not in _interop.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {name}")
    return name


uniform, normal, trunc_normal, constant, ones, zeros, eye, dirac = map(_functional, (
    uniform_, normal_, trunc_normal_, constant_, ones_, zeros_, eye_, dirac_))
xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal = map(_functional, (
    xavier_uniform_, xavier_normal_, kaiming_uniform_, kaiming_normal_))
lecun_uniform, lecun_normal, orthogonal, sparse = map(_functional, (
    lecun_uniform_, lecun_normal_, orthogonal_, sparse_))
