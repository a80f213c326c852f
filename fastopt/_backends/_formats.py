"""Storage formats: low-precision parameters, gradients and state around float32 kernels.

A rule's kernel computes in its compute dtype (float64 for float64 parameters, else
float32). Each operand of a kernel call (param in, param out, grad, state...) is stored in
one of the formats of CODES; the backends load each one into the compute dtype, run the
kernel, and store the written ones back (param out, state), rounded to nearest even or
stochastically (fastopt/lowp.h has the bit-level definitions, which this module spells
out on NumPy arrays: the reference every backend is tested against).

With master weights, operands 0 and 1 are the float32 master copy (a state array) and a
last converted operand, the *shadow*, receives the rounded new parameter.

A compiled backend that converts formats inside its chunks lists the storage codes it
handles in ``FORMATS`` and takes ``formats=`` in ``elementwise``; every other path (the NumPy
reference, the multi-pass rules, a code the backend does not list) goes through
:func:`around`: whole arrays converted before and after the step.
"""

import functools
from typing import NamedTuple

import numpy as np

from fastopt._backends import _qmaps
from fastopt._backends._refmath import M32, philox_rounds
from fastopt._interop import bfloat16  # noqa: F401 - the formats' dtype, here with them

F32, F64, BF16, F16 = 0, 1, 2, 3  # fastopt/lowp.h's FO_FMT_*
Q8S, Q8U = 4, 5  # blockwise 8-bit: codes of the signed / unsigned dynamic map (_qmaps)
CODES = {"float32": F32, "float64": F64, "bfloat16": BF16, "float16": F16}
BLOCK = 256  # elements per absmax of 8-bit state
MIN_QUANTIZED = 4096  # smaller tensors keep float32 state (as bitsandbytes and torchao)
SCALE_MIN = np.float32(1e-12)  # an absmax is at least this (torchao's clip)
QMAPS = {Q8S: _qmaps.SIGNED, Q8U: _qmaps.UNSIGNED}
_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def code_of(dtype):
    return CODES[np.dtype(dtype).name]


class Formats(NamedTuple):
    """How the operands of one kernel call are stored.

    storage: a CODES value per converted operand (param in, param out, grad, state...,
    and the shadow when there is one); stochastic: stochastic rounding of the written ones
    (else to nearest even); step: the step count in the random bits; keys: (n_tensors, 2)
    uint32, each tensor's Philox key (tensor_key); shadow: whether the last converted
    operand receives the rounded parameter (master weights); scales: for each operand of
    8-bit state (Q8S, Q8U) in order, its list of float32 absmax arrays (one per BLOCK
    elements), read and written with its codes."""
    storage: tuple
    stochastic: bool
    step: int
    keys: np.ndarray
    shadow: bool = False
    scales: tuple = ()

    @property
    def compute(self):
        return np.dtype(np.float64 if self.storage[0] == F64 else np.float32)

    def stream(self, op):
        """The random stream of written operand `op`: 0 the parameter (operand 1 or the
        shadow), k for state operand 2 + k."""
        return 0 if op == 1 or (self.shadow and op == len(self.storage) - 1) else op - 2


def _splitmix64(x):
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def tensor_key(seed, index):
    """The Philox key (k0, k1) of parameter `index` (flat over param groups) for `seed`."""
    key = _splitmix64((seed + index * _GOLDEN) & _M64)
    return key & 0xFFFFFFFF, key >> 32


# -- fastopt/lowp.h on NumPy arrays

def round_bits(n, stream, step, key, lo=0):
    """The 16 random bits (uint32) of elements lo .. lo + n - 1 of array `stream`."""
    i = np.arange(lo, lo + n, dtype=np.uint64)
    b = i >> np.uint64(3)
    c1 = (b >> np.uint64(32)) | np.uint64(stream << 24)
    step = np.uint64(step)
    words = philox_rounds(b & M32, c1, step & M32, step >> np.uint64(32),
                          np.uint64(key[0]), np.uint64(key[1]))
    word = np.choose(((i >> np.uint64(1)) & np.uint64(3)).astype(np.intp), words)
    return np.where(i & np.uint64(1), word >> np.uint64(16), word & np.uint64(0xFFFF)
                    ).astype(np.uint32)


def load(a, code):
    """Array `a` of storage format `code` as float32: a new array for bfloat16 and float16
    (float32 and float64 arrays are returned as they are)."""
    if code in (F32, F64):
        return a
    h = a.reshape(-1).view(np.uint16).astype(np.uint32)  # 1-d: operators keep arrays
    if code == BF16:
        return (h << np.uint32(16)).view(np.float32).reshape(a.shape)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e, m = (h >> np.uint32(10)) & np.uint32(0x1F), h & np.uint32(0x3FF)
    sub = (m.astype(np.float32) * np.float32(2.0 ** -24)).view(np.uint32) | sign
    special = sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    normal = sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))
    return np.where(e == 0, sub, np.where(e == 31, special, normal)).view(np.float32
                                                                          ).reshape(a.shape)


def _bf16(bits, r, stochastic):
    add = r if stochastic else np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40),
                    (bits + add) >> np.uint32(16)).astype(np.uint16)


def _f16(bits, r, stochastic):
    a = bits & np.uint32(0x7FFFFFFF)
    sign = ((bits >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16)
    e = a >> np.uint32(23)
    # float16's normal range and above: 13 bits go
    h = a - np.uint32(112 << 23)
    add = r >> np.uint32(3) if stochastic else np.uint32(0xFFF) + ((h >> np.uint32(13))
                                                                   & np.uint32(1))
    q = np.where(e >= 143, np.uint32(0x7C00), (h + add) >> np.uint32(13))
    normal = np.minimum(q, np.uint32(0x7C00))
    # below: units of 2^-24, s >= 14 bits go (s > 40 rounds to zero either way)
    m = np.where(e > 0, (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000), a).astype(np.uint64)
    s = np.minimum(np.where(e > 0, np.int64(126) - e.astype(np.int64), 125), 41
                   ).astype(np.uint64)
    if stochastic:
        r64 = r.astype(np.uint64)
        up = np.where(s >= 16, r64 << (np.maximum(s, 16) - np.uint64(16)),
                      r64 >> (np.uint64(16) - np.minimum(s, 16)))
    else:
        up = (np.uint64(1) << (s - np.uint64(1))) - np.uint64(1) + ((m >> s) & np.uint64(1))
    sub = np.where(s > 40, np.uint64(0), (m + up) >> s)
    out = np.where(e >= 113, normal, sub.astype(np.uint32))
    out = np.where(a > np.uint32(0x7F800000), np.uint32(0x7E00), out)
    return out.astype(np.uint16) | sign


def store(dst, x, code, stochastic, step=0, key=(0, 0), stream=0):
    """Write float32 `x` into `dst` of storage format `code` (a plain copy for float32 and
    float64), rounded to nearest even or stochastically with the bits of round_bits."""
    if code in (F32, F64):
        if dst is not x:
            dst[...] = x
        return
    bits = np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint32)
    r = round_bits(bits.size, stream, step, key) if stochastic else None
    rounded = (_bf16 if code == BF16 else _f16)(bits, r, stochastic)
    dst.reshape(-1).view(np.uint16)[...] = rounded


def q8_load(codes, absmax, code):
    """8-bit state as float32: each code's map value times its block's absmax."""
    flat = QMAPS[code][codes.reshape(-1)]
    return (flat * np.repeat(absmax, BLOCK)[:flat.size]).reshape(codes.shape)


def q8_store(codes, absmax, x, code):
    """Quantize float32 `x` into `codes` and `absmax` (torchao's quantize_8bit_with_qmap):
    per block, the absmax (at least SCALE_MIN; NaN propagates), each element divided by it,
    then the nearest map value, found by a branch-free binary search; from half the gap up
    the upper code."""
    qmap = QMAPS[code]
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    padded = np.zeros(-(-flat.size // BLOCK) * BLOCK, np.float32)
    padded[:flat.size] = flat
    blocks = np.abs(padded.reshape(-1, BLOCK))
    scale = np.maximum(np.where(np.isnan(blocks).any(axis=1), np.float32(np.nan),
                                blocks.max(axis=1)), SCALE_MIN)
    absmax[...] = scale
    q = flat / np.repeat(scale, BLOCK)[:flat.size]
    c = np.where(q >= qmap[128], 128, 0)
    for step in (64, 32, 16, 8, 4, 2, 1):
        c += np.where(q >= qmap[c + step], step, 0)
    up = np.minimum(c + 1, 255)
    c = np.where(q - qmap[c] >= (qmap[up] - qmap[c]) * np.float32(0.5), up, c)
    codes.reshape(-1)[...] = c


def around(fn, operands, formats, *, masks=None, rest=(), **kwargs):
    """Run `fn` (a step function of the compute dtype over whole arrays, taking ``masks=``)
    on `operands` (param in, param out, grad, state lists, None for a state that is off;
    the shadow last if formats.shadow) stored as `formats` says (one code per operand that
    is not None): every operand loaded into the compute dtype, the step run (with the
    `rest` of its operands after the states, as they are), the written ones stored back
    rounded. Returns what `fn` returns."""
    main = operands[:-1] if formats.shadow else operands
    codes = iter(formats.storage)
    scales = iter(formats.scales)
    wide, written = [], []  # written: (arrays, their wide arrays, code, stream, absmax)
    for op, arrays in enumerate(main):
        if arrays is None:
            wide.append(None)
            continue
        code = next(codes)
        absmax = next(scales) if code in (Q8S, Q8U) else None
        if op == 1:  # the parameter itself when updated in place
            ws = [w if o is p else o if code in (F32, F64) else np.empty_like(w)
                  for o, p, w in zip(arrays, main[0], wide[0])]
        elif absmax is not None:
            ws = [q8_load(a, s, code) for a, s in zip(arrays, absmax)]
        else:
            ws = [_loaded(a, code) for a in arrays]
        wide.append(ws)
        if op == 1 or op > 2:
            written.append((arrays, ws, code, 0 if op == 1 else len(written), absmax))
    result = fn(*wide, *rest, masks=masks, **kwargs)
    if formats.shadow:
        written.append((operands[-1], wide[1], next(codes), 0, None))
    for arrays, ws, code, stream, absmax in written:
        if code in (F32, F64) and arrays is not ws:
            continue  # written in place
        for t, (dst, x) in enumerate(zip(arrays, ws)):
            if absmax is not None:
                q8_store(dst, absmax[t], x, code)
            elif dst is not None and dst is not x:
                store(dst, x, code, formats.stochastic, formats.step, formats.keys[t], stream)
    return result


def _loaded(a, code):
    """Array a (or None) in the compute dtype: a new array for a low-precision one."""
    return a if a is None or code in (F32, F64) else load(a, code)


def formatted(step):
    """`step` (a rule's step over whole arrays of its compute dtype) also taking
    ``formats=`` and ``shadow=`` (the low-precision parameters of master weights, whose
    float32 copies are then the params and out): through :func:`around`."""
    @functools.wraps(step)
    def run(params, out, grads, *states, formats=None, shadow=None, masks=None, **kwargs):
        if formats is None:
            return step(params, out, grads, *states, masks=masks, **kwargs)
        n_main = len(formats.storage) - formats.shadow - 3  # converted states, None skipped
        k = 0
        while n_main > 0:
            n_main -= states[k] is not None
            k += 1
        operands = (params, out, grads) + states[:k] + ((shadow,) if formats.shadow else ())
        return around(step, operands, formats, masks=masks, rest=states[k:], **kwargs)
    return run
