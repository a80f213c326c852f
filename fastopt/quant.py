r"""Quantization: affine int8/uint8/int4/uint4 codes, their parameters, and fake
quantization for quantization-aware training, with torch's rounding.

.. math::
    q = \mathrm{clamp}(\mathrm{round}(x / s) + z,\ q_{min},\ q_{max}),\qquad
    \hat x = (q - z)\, s

per tensor (one scale ``s`` and zero point ``z``) or per channel (one per index along
``axis``). Rounding is half to even, in the dtype of ``x`` and in torch's order of
operations, so int8/uint8 codes are bit-identical to ``torch.quantize_per_tensor`` /
``torch.quantize_per_channel`` (x86 build): with ``inv = 1 / s`` rounded to float32 first,
a float32 tensor per tensor rounds ``fma(x, inv, z)`` (FBGEMM's kernel), per channel
``x * inv + z`` with two roundings. float64 tensors (which torch refuses) use the second
form in float64. ``dequantize`` computes ``(q - z) * s`` in float64 and rounds once, with
the scale first rounded to float32 per tensor, as torch does.

A scale is checked in the dtype it is used in: ``x``'s dtype in ``quantize``, float32 in
``fake_quantize`` (as torch's kernels take it) and in a per-tensor ``dequantize`` to float32,
float64 in the other ``dequantize`` forms. One that rounds to 0 or inf there, or whose
reciprocal overflows (float32: outside [2.938737e-39, 3.4028235e+38]), is refused with a
ValueError, where torch's kernels give wrong codes (0.0 to 127) or NaN values.

Symmetric quantization is the special case ``z = 0`` (int) or the middle code (uint).
Codes are returned as plain ``int8``/``uint8`` arrays of ``x``'s framework (not torch's
quantized tensor type); 4-bit codes sit one per byte until ``pack_int4`` puts two in one.

>>> import numpy as np, fastopt
>>> x = np.array([-1.0, -0.05, 0.05, 0.15, 2.0], np.float32)
>>> q = fastopt.quant.quantize(x, 0.1, 0)
>>> q
array([-10,   0,   0,   2,  20], dtype=int8)
>>> fastopt.quant.dequantize(q, 0.1, 0)
array([-1. ,  0. ,  0. ,  0.2,  2. ], dtype=float32)
>>> fastopt.quant.unpack_int4(fastopt.quant.pack_int4(np.array([-8, 7, 3], np.int8)), 3)
array([-8,  7,  3], dtype=int8)
"""

import math

import numpy as np

from fastopt import _backends, _check, _interop
from fastopt._config import get_num_threads

__all__ = ["quantize", "dequantize", "fake_quantize", "fake_quantize_backward", "pack_int4",
           "unpack_int4", "qparams", "MovingAverageObserver", "QDTYPES"]

# name -> (qmin, qmax, code dtype)
QDTYPES = {"int8": (-128, 127, np.int8), "uint8": (0, 255, np.uint8),
           "int4": (-8, 7, np.int8), "uint4": (0, 15, np.uint8)}
MAX_GRID = 10_000  # qparams(method="mse") tries `grid` ranges, one pass over x each
EPS = float(np.finfo(np.float32).eps)  # torch's observers' smallest scale


def _dtype_name(dtype, name="dtype"):
    """The NumPy name of a dtype argument (a str is kept as it is)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:  # not something NumPy takes as a dtype
        raise TypeError(f"{name} must be a dtype or its name, got {type(dtype).__name__}") \
            from None


def _qdtype(dtype):
    name = _dtype_name(dtype)
    return QDTYPES[_check.choice("dtype", name, tuple(QDTYPES))], name


def _device(arr):
    return "cpu" if isinstance(arr, np.ndarray) else "cuda"


def _axis(axis, ndim):
    return None if axis is None else _check.axis("axis", axis, ndim)


def _geometry(shape, axis):
    """(B, C) of the array viewed as (A, B, C) around `axis` (B = 1 per tensor)."""
    if axis is None:
        return 1, max(math.prod(shape), 1)
    return shape[axis], max(math.prod(shape[axis + 1:]), 1)


def _host_values(value, name, count, axis):
    """A parameter (a number, or one per channel) as a float64/int64 host array of `count`."""
    if _interop.framework_of(value) is not None:
        # refused, naming the argument, where it has no readable memory (torch's meta device);
        # a NumPy array is only read, so any byte order will do
        if not isinstance(value, np.ndarray):
            _interop._check_array(value, name, dtypes=None)
        value = _interop._host(value)
    elif isinstance(value, complex):
        raise TypeError(f"{name}: expected a real number or an array of real numbers, got "
                        f"{value!r}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, OverflowError):  # ragged lists, 10**400
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf":  # not bool, complex, object, str
        raise TypeError(f"{name}: expected a real number or an array of real numbers, got "
                        f"{value!r:.80}")
    if axis is None:
        if arr.size != 1:
            raise ValueError(f"{name}: per-tensor quantization (axis=None) takes one value, "
                             f"got {arr.size}")
    elif arr.ndim != 1 or arr.size != count:
        raise ValueError(f"{name}: per-channel quantization along axis {axis} takes "
                         f"{count} values (one per channel), got shape {arr.shape}")
    return arr.reshape(-1)


def _smallest_invertible(dtype):
    """The least positive `dtype` value whose reciprocal is finite (a subnormal)."""
    t = dtype.type
    with np.errstate(over="ignore", divide="ignore"):
        lo = t(1) / np.finfo(t).max
        while np.isfinite(t(1) / np.nextafter(lo, t(0))):
            lo = np.nextafter(lo, t(0))
        while not np.isfinite(t(1) / lo):
            lo = np.nextafter(lo, t(1))
    return lo


# dtype -> the scales usable in it: positive, finite, with a finite reciprocal
_SCALE_RANGE = {np.dtype(t): (_smallest_invertible(np.dtype(t)), np.finfo(t).max)
               for t in (np.float32, np.float64)}


def _scales(scale, count, axis, dtype):
    """The scales as `dtype`, the dtype the arithmetic uses them in, if each lies in
    ``_SCALE_RANGE[dtype]`` there (a scale that rounds to 0 or inf in it, or whose reciprocal
    overflows, would make codes of NaN)."""
    s = _host_values(scale, "scale", count, axis)
    if np.issubdtype(s.dtype, np.bool_):
        raise TypeError("scale: expected real numbers, got bool")
    s = s.astype(np.float64)
    lo, hi = _SCALE_RANGE[dtype]
    with np.errstate(over="ignore", under="ignore"):
        used = s.astype(dtype)
    bad = ~((used >= lo) & (used <= hi))
    if bad.any():
        i = int(np.argmax(bad))
        where = "" if axis is None else f"[{i}]"
        raise ValueError(f"scale{where} must be finite and > 0 in {dtype.name}, the dtype it "
                         f"is used in, with a finite reciprocal: a value in [{lo!s}, {hi!s}], "
                         f"got {float(s[i])!r}")
    return used


def _zero_points(zero_point, count, axis, qmin, qmax):
    z = _host_values(zero_point, "zero_point", count, axis)
    if np.issubdtype(z.dtype, np.floating):
        if not (np.isfinite(z).all() and (z == np.round(z)).all()):
            raise TypeError(f"zero_point: expected integers, got {zero_point!r}")
    elif not np.issubdtype(z.dtype, np.integer) or z.dtype == np.bool_:
        raise TypeError(f"zero_point: expected integers, got {zero_point!r}")
    z = z.astype(np.int64)
    bad = (z < qmin) | (z > qmax)
    if bad.any():
        i = int(np.argmax(bad))
        where = "" if axis is None else f"[{i}]"
        raise ValueError(f"zero_point{where}={int(z[i])} is outside the code range "
                         f"[{qmin}, {qmax}]")
    return z


def _inv(scales):
    """1 / scale as torch computes it: in the dtype the scales were rounded to."""
    return scales.dtype.type(1) / scales


def _loop(backend, float_arr):
    return _backends.resolve("quant_loop", backend, _device(float_arr), float_arr.dtype)


def _refuse_nan(count, name):
    if count:
        raise ValueError(f"{name}: holds {count} NaN value(s), which have no quantized code")


def quantize(x, scale, zero_point, dtype="int8", axis=None, *, backend="auto"):
    """Codes of ``x`` (float32 or float64, any framework): ``int8``/``int4`` codes as an
    int8 array, ``uint8``/``uint4`` as uint8, of ``x``'s framework and shape.

    Args:
        scale: a positive number (per tensor) or one per index of ``x.shape[axis]``, which
            with its reciprocal stays finite and > 0 in ``x``'s dtype.
        zero_point: an integer in the code range, or one per channel.
        dtype: ``"int8"`` (default), ``"uint8"``, ``"int4"`` (codes -8..7), ``"uint4"`` (0..15).
        axis: None for per-tensor, else the channel axis.
    """
    (qmin, qmax, code), _ = _qdtype(dtype)
    _backends.check_name(backend)
    arr = _interop.import_input(x, "x").array
    axis = _axis(axis, arr.ndim)
    B, C = _geometry(arr.shape, axis)
    scales = _scales(scale, B, axis, arr.dtype)
    zps = _zero_points(zero_point, B, axis, qmin, qmax)
    out, finish = _interop.new_array(arr.shape, code, x)
    if arr.size:
        nan = _loop(backend, arr)(
            "quantize", arr, out.view(np.uint8), None, B, C, _inv(scales),
            zps.astype(arr.dtype), None, qmin, qmax,
            axis is None and arr.dtype == np.float32, qmin < 0, n_threads=get_num_threads())
        _refuse_nan(nan, "x")
    return finish()


def dequantize(q, scale, zero_point, axis=None, *, dtype="float32", backend="auto"):
    """``(q - zero_point) * scale`` of int8 or uint8 codes ``q`` (4-bit codes unpacked), as a
    new ``dtype`` (float32, default, or float64) array of ``q``'s framework; computed in
    float64 and rounded once, as ``torch.dequantize`` (a per-tensor scale rounded to float32
    first, as torch's per-tensor kernel, when the result is float32). The scale, with its
    reciprocal, must stay finite and > 0 in the dtype it is used in (see the module's
    introduction)."""
    view = _interop.import_input(q, "q", ("int8", "uint8")).array
    signed = view.dtype == np.int8
    qmin, qmax = (-128, 127) if signed else (0, 255)
    out_dtype = np.dtype(_check.choice("dtype", _dtype_name(dtype), ("float32", "float64")))
    _backends.check_name(backend)
    axis = _axis(axis, view.ndim)
    B, C = _geometry(view.shape, axis)
    # float64 arithmetic, with a per-tensor scale rounded to float32 first as torch's kernel
    used = np.dtype(np.float32 if axis is None and out_dtype == np.float32 else np.float64)
    scales = _scales(scale, B, axis, used).astype(np.float64)
    zps = _zero_points(zero_point, B, axis, qmin, qmax)
    out, finish = _interop.new_array(view.shape, out_dtype, q)
    if view.size:
        _loop(backend, out)("dequantize", view.view(np.uint8), out, None, B, C, None,
                            zps.astype(np.int32), scales, qmin, qmax, False, signed,
                            n_threads=get_num_threads())
    return finish()


def _fake_args(x, scale, zero_point, qmin, qmax, axis, backend, named):
    _backends.check_name(backend)
    qmin = _check.integer("qmin", qmin, lo=-2 ** 31, hi=2 ** 31 - 1)
    qmax = _check.integer("qmax", qmax, lo=-2 ** 31, hi=2 ** 31 - 1)
    if not qmin <= qmax:
        raise ValueError(f"qmin must be <= qmax, got qmin={qmin}, qmax={qmax}")
    views = {name: _interop.import_input(a, name).array for name, a in named.items()}
    arr = views["x"]
    for name, v in views.items():
        if v.shape != arr.shape or v.dtype != arr.dtype or _device(v) != _device(arr):
            raise ValueError(f"{name}: expected x's shape {arr.shape} and dtype {arr.dtype} "
                             f"on its device, got {v.shape}, {v.dtype}")
    axis = _axis(axis, arr.ndim)
    B, C = _geometry(arr.shape, axis)
    scales = _scales(scale, B, axis, np.dtype(np.float32))  # as torch's kernels take it
    zps = _zero_points(zero_point, B, axis, qmin, qmax)
    return views, (B, C), scales.astype(arr.dtype), zps, qmin, qmax


def fake_quantize(x, scale, zero_point, qmin, qmax, axis=None, *, backend="auto"):
    r"""Quantize and dequantize in one pass, for quantization-aware training, as
    ``torch.fake_quantize_per_tensor_affine`` (axis None) and
    ``torch.fake_quantize_per_channel_affine``:
    :math:`y = (\mathrm{clamp}(\mathrm{round}(x \cdot inv) + z, q_{min}, q_{max}) - z)\,s`,
    with the scale rounded to float32 first, as torch's kernels take it (it and its
    reciprocal must stay finite and > 0 there). Returns a new array of ``x``'s framework."""
    views, (B, C), scales, zps, qmin, qmax = _fake_args(x, scale, zero_point, qmin, qmax, axis,
                                                        backend, {"x": x})
    arr = views["x"]
    out, finish = _interop.new_array(arr.shape, arr.dtype, x)
    if arr.size:
        nan = _loop(backend, arr)("fake_quantize", arr, out, None, B, C, _inv(scales),
                                  zps.astype(arr.dtype), scales, qmin, qmax, False, False,
                                  n_threads=get_num_threads())
        _refuse_nan(nan, "x")
    return finish()


def fake_quantize_backward(grad_y, x, scale, zero_point, qmin, qmax, axis=None, *,
                           backend="auto"):
    """The gradient of ``fake_quantize`` with respect to ``x``, as torch's autograd: the
    straight-through estimator, ``grad_y`` where ``round(x * inv) + z`` lies in
    ``[qmin, qmax]``, 0 outside. Returns a new array of ``x``'s framework."""
    views, (B, C), scales, zps, qmin, qmax = _fake_args(x, scale, zero_point, qmin, qmax, axis,
                                                        backend, {"x": x, "grad_y": grad_y})
    arr = views["x"]
    out, finish = _interop.new_array(arr.shape, arr.dtype, x)
    if arr.size:
        nan = _loop(backend, arr)("fake_quantize_grad", arr, out, views["grad_y"], B, C,
                                  _inv(scales), zps.astype(arr.dtype), scales, qmin,
                                  qmax, False, False, n_threads=get_num_threads())
        _refuse_nan(nan, "x")
    return finish()


def pack_int4(q):
    """Two 4-bit codes per byte: the codes of ``q`` (int8 in [-8, 7] or uint8 in [0, 15]),
    flattened in C order, element 2i in the low nibble of byte i and 2i + 1 in the high
    one (the last high nibble is 0 for an odd count). Returns a 1-D uint8 array of
    ``ceil(q.size / 2)`` bytes of ``q``'s framework."""
    view = _interop.import_input(q, "q", ("int8", "uint8")).array
    xp = _interop.array_module(view)
    flat = view.reshape(-1)
    lo, hi = (-8, 7) if view.dtype == np.int8 else (0, 15)
    if flat.size and bool(((flat < lo) | (flat > hi)).any()):
        raise ValueError(f"q: holds values outside [{lo}, {hi}], the 4-bit codes of its dtype")
    nibbles = flat.view(np.uint8) & 0xF
    if flat.size % 2:
        nibbles = xp.concatenate([nibbles, xp.zeros(1, np.uint8)])
    out, finish = _interop.new_array((nibbles.size // 2,), np.uint8, q)
    out[...] = nibbles[0::2] | (nibbles[1::2] << 4)
    return finish()


def unpack_int4(packed, n, *, signed=True):
    """The first ``n`` 4-bit codes of ``pack_int4``'s bytes: int8 in [-8, 7] (``signed``,
    default) or uint8 in [0, 15], a 1-D array of ``packed``'s framework."""
    view = _interop.import_input(packed, "packed", ("uint8",)).array
    n = _check.integer("n", n, lo=0)
    signed = _check.flag("signed", signed)
    if n > 2 * view.size:
        raise ValueError(f"n={n} is more than the {2 * view.size} codes {view.size} bytes hold")
    xp = _interop.array_module(view)
    flat = view.reshape(-1)
    nibbles = xp.stack([flat & 0xF, flat >> 4], axis=1).reshape(-1)[:n]
    out, finish = _interop.new_array((n,), np.int8 if signed else np.uint8, packed)
    if signed:
        out[...] = ((nibbles ^ 8).astype(np.int8) - 8)
    else:
        out[...] = nibbles
    return finish()


# -- choosing the parameters

def _minmax(arr, axis):
    xp = _interop.array_module(arr)
    if axis is None:
        return xp.asarray(arr.min()).reshape(1), xp.asarray(arr.max()).reshape(1)
    moved = xp.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
    return moved.min(axis=1), moved.max(axis=1)


def _float32_range(v):
    """`v` (a range's ends) as float32, the dtype torch's observers keep ranges in, if it
    fits there."""
    with np.errstate(over="ignore"):
        f = np.asarray(v, np.float32)
    out = ~np.isfinite(f)
    if out.any():
        end = float(np.asarray(v, np.float64).reshape(-1)[np.argmax(out.reshape(-1))])
        raise ValueError(f"x: its range reaches {end:g}, beyond float32's (magnitudes up to "
                         f"{np.finfo(np.float32).max!s}), in which quantization parameters are "
                         f"computed as by torch's observers; scale x into that range first")
    return f


def _qparams_from_range(lo, hi, qmin, qmax, symmetric):
    """torch's _calculate_qparams (float32 arithmetic): (scale float64, zero_point int64).
    Where torch's ``hi - lo`` overflows (a range wider than float32's max), the two ends are
    divided first, so the scale stays finite."""
    f32 = np.float32
    lo = np.minimum(_float32_range(lo), f32(0))
    hi = np.maximum(_float32_range(hi), f32(0))
    if symmetric:
        hi = np.maximum(-lo, hi)
        scale = np.maximum(hi / f32((qmax - qmin) / 2), f32(EPS))
        zp = np.full(scale.shape, 0 if qmin < 0 else (qmin + qmax + 1) // 2, np.int64)
    else:
        n = f32(qmax - qmin)
        with np.errstate(over="ignore"):
            scale = (hi - lo) / n
        scale = np.maximum(np.where(np.isfinite(scale), scale, hi / n - lo / n), f32(EPS))
        zp = qmin - np.round(lo / scale).astype(np.int64)
        zp = np.clip(zp, qmin, qmax)
    return scale.astype(np.float64), zp


def _result(scale, zp, axis):
    if axis is None:
        return float(scale[0]), int(zp[0])
    return scale, zp


def qparams(x, dtype, axis=None, symmetric=False, method="minmax", *, percentile=99.99,
            grid=100):
    """``(scale, zero_point)`` for quantizing ``x`` to ``dtype``: floats for per tensor
    (axis None), else float64 and int64 arrays with one value per channel.

    Methods:
        ``"minmax"``: the range [min(x, 0), max(x, 0)], with torch's formulas
            (MinMaxObserver / PerChannelMinMaxObserver, float32 arithmetic, scale >= float32
            eps; symmetric: zero point 0 for signed codes, the middle code for unsigned).
            Where ``max - min`` overflows float32 (torch's scale is then inf), the two are
            divided first, so the scale is the finite one of that range.
        ``"percentile"``: the range between the ``100 - percentile`` and ``percentile``
            percentiles of x (per channel), clipping outliers.
        ``"mse"``: of ``grid`` candidate ranges, ``k / grid`` times the min-max range for
            k = 1..grid, the one whose fake-quantized x has the least squared error;
            ``grid`` is an integer in [1, 10000] (each candidate is one pass over x).

    Ranges are kept in float32, as by torch's observers: a float64 ``x`` whose range (the
    ends a method uses) reaches beyond float32's is refused with a ValueError. The scales
    returned are ones ``quantize``, ``dequantize`` and ``fake_quantize`` accept.
    """
    (qmin, qmax, _), _ = _qdtype(dtype)
    arr = _interop.import_input(x, "x").array
    if arr.size == 0:
        raise ValueError("x: empty; quantization parameters need values to observe")
    axis = _axis(axis, arr.ndim)
    method = _check.choice("method", method, ("minmax", "percentile", "mse"))
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    if not bool(_interop.array_module(arr).isfinite(arr).all()):
        raise ValueError("x: holds NaN or inf; quantization parameters need finite values")
    host = np.asarray(_interop._host(arr))
    if method == "percentile":
        p = _check.real("percentile", percentile, lo=50.0, hi=100.0)
        moved = host.reshape(1, -1) if axis is None else \
            np.moveaxis(host, axis, 0).reshape(host.shape[axis], -1)
        lo = np.percentile(moved.astype(np.float64), 100.0 - p, axis=1)
        hi = np.percentile(moved.astype(np.float64), p, axis=1)
        return _result(*_qparams_from_range(lo, hi, qmin, qmax, symmetric), axis)
    lo, hi = (np.asarray(v) for v in _minmax(host, axis))
    if method == "minmax":
        return _result(*_qparams_from_range(lo, hi, qmin, qmax, symmetric), axis)
    grid = _check.integer("grid", grid, lo=1, hi=MAX_GRID)
    lo, hi = _float32_range(lo), _float32_range(hi)  # the widest candidate's, checked first
    B, C = _geometry(host.shape, axis)
    x3 = host.reshape(-1, B, C)
    best = (np.full(B, np.inf), None, None)
    for k in range(1, grid + 1):
        scale, zp = _qparams_from_range(lo * (k / grid), hi * (k / grid), qmin, qmax, symmetric)
        s = scale.astype(np.float32).astype(host.dtype).reshape(1, B, 1)
        z = zp.astype(host.dtype).reshape(1, B, 1)
        with np.errstate(over="ignore"):  # a code's value beyond the dtype: an inf error
            y = (np.clip(np.rint(x3 * (host.dtype.type(1) / s)) + z, qmin, qmax) - z) * s
            err = ((y - x3).astype(np.float64) ** 2).sum(axis=(0, 2))
        better = err < best[0]
        best = (np.where(better, err, best[0]),
                scale if best[1] is None else np.where(better, scale, best[1]),
                zp if best[2] is None else np.where(better, zp, best[2]))
    return _result(best[1], best[2], axis)


def _toward(old, new, c):
    """``old + c (new - old)`` in float32, as torch's moving averages; where the difference
    of two ends of opposite sign overflows float32, in float64 (the average lies between
    them, so it fits float32 again)."""
    with np.errstate(over="ignore", invalid="ignore"):
        step = old + np.float32(c) * (new - old)
    wide = old.astype(np.float64) + float(np.float32(c)) * (new.astype(np.float64) - old)
    return np.where(np.isfinite(step), step, wide.astype(np.float32))


class MovingAverageObserver:
    """Calibration over batches: tracks the range of what it observes, then gives
    ``qparams()``, as torch's observers (minmax formulas, see ``qparams``).

    Args:
        dtype: the codes' dtype (``"int8"``, ``"uint8"``, ``"int4"``, ``"uint4"``).
        axis: None for one range (MovingAverageMinMaxObserver / MinMaxObserver), else the
            channel axis (MovingAveragePerChannelMinMaxObserver / PerChannelMinMaxObserver).
        symmetric: symmetric ranges (``per_tensor_symmetric`` / ``per_channel_symmetric``).
        averaging_constant: c in ``min <- min + c (batch_min - min)`` (the first batch sets
            the range); None keeps the running extremes instead (MinMaxObserver).

    >>> import numpy as np, fastopt
    >>> obs = fastopt.quant.MovingAverageObserver("uint8", averaging_constant=0.5)
    >>> obs.observe(np.array([-1.0, 3.0])); obs.observe(np.array([1.0, 5.0]))
    >>> obs.min_val, obs.max_val
    (0.0, 4.0)
    """

    def __init__(self, dtype="uint8", axis=None, symmetric=False, averaging_constant=0.01):
        (self._qmin, self._qmax, _), self.dtype = _qdtype(dtype)
        self.axis = None if axis is None else _check.integer("axis", axis, lo=-2 ** 31)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
        self.symmetric = symmetric
        self.averaging_constant = None if averaging_constant is None else _check.real(
            "averaging_constant", averaging_constant, lo=0.0, hi=1.0, lo_open=True)
        self._min = self._max = None

    def _value(self, v):
        if v is None or self.axis is not None:
            return v
        return float(v[0])

    @property
    def min_val(self):
        """The observed minimum (a float, or one float32 per channel); None before any."""
        return self._value(self._min)

    @property
    def max_val(self):
        """The observed maximum, as min_val."""
        return self._value(self._max)

    def observe(self, x):
        """Take one batch into the range (float32 arithmetic, as torch's observers; a batch
        whose range goes beyond float32's is refused, and a moving average whose float32
        difference overflows is taken in float64, where torch's turns inf)."""
        arr = _interop.import_input(x, "x").array
        if arr.size == 0:
            return
        axis = _axis(self.axis, arr.ndim)
        if not bool(_interop.array_module(arr).isfinite(arr).all()):
            raise ValueError("x: holds NaN or inf; observers need finite values")
        lo, hi = (_float32_range(_interop._host(v)) for v in _minmax(arr, axis))
        if self._min is not None and self._min.shape != lo.shape:
            raise ValueError(f"x: has {lo.size} channels along axis {self.axis}, earlier "
                             f"batches had {self._min.size}")
        c = self.averaging_constant
        if self._min is None:
            self._min, self._max = lo, hi
        elif c is None:
            self._min, self._max = np.minimum(self._min, lo), np.maximum(self._max, hi)
        else:
            self._min, self._max = _toward(self._min, lo, c), _toward(self._max, hi, c)

    def qparams(self):
        """(scale, zero_point) for the range observed so far (see ``qparams``)."""
        if self._min is None:
            raise ValueError("qparams: nothing observed yet; observe() at least one non-empty "
                             "batch first")
        return _result(*_qparams_from_range(self._min, self._max, self._qmin, self._qmax,
                                            self.symmetric), self.axis)
