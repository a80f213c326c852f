"""What the storage-format tests of the compiled backends share (test_formats_cython.py,
test_formats_numba.py): the formats and sizes, the operands of a kernel stored in a
configuration's formats, the float32 reference step that fastopt._backends._formats.around
wraps, and the bitwise comparison."""

from typing import NamedTuple, Optional

import numpy as np
from cases import RULE_OF

from fastopt import _rules
from fastopt._backends import _formats, resolve

# 66433 elements: two threads' worth (a thread takes 32768 at least), and tensors that end
# inside a group of 8, a block and a chunk
SIZES = (0, 1, 7, 8, 9, 1023, 16385, 40000, 9000)
STEPS = (1, 2, 9)  # SGD's and ADOPT's first step, RAdam without and with its rectification
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": _formats.bfloat16(),
          "float16": np.dtype(np.float16)}
# a state format of a configuration: blockwise 8-bit, with the signed map for first moments
# and momenta (_rules.SIGNED_STATE), else the unsigned one
Q8 = "int8"
# tensors of 8-bit state: none, in one partial block, a block and around it, around
# MIN_QUANTIZED, past a chunk (ending in a partial block); 74290 elements, two threads' worth
Q8_SIZES = (0, 1, 255, 256, 257, 4095, 4096, 16385, 40000, 9000)
SPECIALS = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 6e-8, -3e-5, 6.1e-5, 1e-30,
                     -1e-40, 65504.0, 65520.0, -7e4, 3e38], np.float32)


def state_format(config, k):
    """The format of state operand k: config.state's formats, in turn."""
    formats = config.state.split(",")
    return formats[k % len(formats)]


def record(kernel, hyper_):
    scalars = RULE_OF[kernel].scalars(np.float32, **hyper_)
    if RULE_OF[kernel].driver is not None:  # (update pass, apply pass)
        scalars = scalars[0]
    return _rules.KERNELS[kernel].args.record(np.float32, scalars)


def reference(kernel, hyper_, compiled, numpy=True):
    """The float32 step over whole arrays that _formats.around wraps: the rule's NumPy
    reference (the kernel's state put in the rule's order), else (or for a pass of a
    multi-pass rule, which has no reference of its own) the backend's float32 kernel,
    ``compiled(kernel, operands, record, masks)``, which test_optim_parity holds to the
    reference."""
    rule = RULE_OF[kernel]
    if not numpy or rule.driver is not None:
        def step(*ops, masks=None):
            compiled(kernel, ops, record(kernel, hyper_), masks)
        return step
    numpy_step = resolve(rule.op, "numpy", "cpu", np.float32)
    names = _rules.KERNELS[kernel].state

    def step(params, out, grads, *states, masks=None):
        by_name = dict(zip(names, states))
        numpy_step(params, out, grads, *(by_name.get(name) for name in rule.state),
                   masks=masks, n_threads=1, **hyper_)
    return step


def values(rng, n, dtype, scale=1.0, positive=False, special=0.0, low=0.0):
    """Normal values (their magnitudes plus `low` when `positive`), a `special` fraction of
    them SPECIALS."""
    x = rng.standard_normal(n).astype(np.float32) * np.float32(scale)
    if positive:
        x = np.abs(x) + np.float32(low)
    if special and n:
        at = rng.random(n) < special
        x[at] = rng.choice(SPECIALS, int(at.sum()))
    return x.astype(dtype)


class Problem(NamedTuple):
    operands: tuple       # param in, param out, grad, state... (, shadow)
    formats: _formats.Formats
    masks: Optional[list]


def quantized(wide, code):
    """Float32 arrays `wide` as 8-bit state of map `code`: (codes, block scales)."""
    codes = [np.empty(x.size, np.uint8) for x in wide]
    absmax = [np.empty(-(-x.size // _formats.BLOCK), np.float32) for x in wide]
    for c, a, x in zip(codes, absmax, wide):
        _formats.q8_store(c, a, x, code)
    return codes, absmax


def problem(kernel, config, sizes, seed, in_place, masks=False, special=0.0):
    """The operands of `kernel` stored as `config` says (its param, grad, state, master and
    stochastic), their Formats (step 0) and, with `masks`, pruning masks."""
    rng = np.random.default_rng(seed)
    p_type = DTYPES["float32" if config.master else config.param]
    g_type = DTYPES[config.param if config.grad == "param" else config.grad]
    params = [values(rng, n, p_type, special=special) for n in sizes]
    out = params if in_place else [np.zeros(n, p_type) for n in sizes]
    grads = [values(rng, n, g_type, special=special) for n in sizes]
    codes = [_formats.code_of(p_type)] * 2 + [_formats.code_of(g_type)]
    states, scales = (), ()
    for k, name in enumerate(_rules.KERNELS[kernel].state):
        fmt = state_format(config, k)
        signed = fmt == Q8 and name in _rules.SIGNED_STATE
        # a centered RMSprop's grad_avg small beside its square_avg: real square roots
        wide = [values(rng, n, np.float32 if fmt == Q8 else DTYPES[fmt],
                       0.1 if name == "grad_avg" else 0.5, positive=not signed,
                       special=special, low=0.2 if name == "square_avg" else 0.0)
                for n in sizes]
        if fmt == Q8:
            codes.append(_formats.Q8S if signed else _formats.Q8U)
            wide, absmax = quantized(wide, codes[-1])
            scales += (absmax,)
        else:
            codes.append(_formats.code_of(wide[0].dtype))
        states += (wide,)
    operands = (params, out, grads) + states
    if config.master:
        operands += ([np.zeros(n, DTYPES[config.param]) for n in sizes],)
        codes.append(_formats.code_of(DTYPES[config.param]))
    keys = np.array([_formats.tensor_key(seed, t) for t in range(len(sizes))], np.uint32)
    formats = _formats.Formats(tuple(codes), config.stochastic, 0, keys, config.master,
                               scales)
    pruned = [(rng.random(n) < 0.7).astype(np.uint8) for n in sizes] if masks else None
    return Problem(operands, formats, pruned)


def copy(operands):
    """A deep copy that keeps operand 1 the same arrays as operand 0 when it is."""
    copies = [[a.copy() for a in arrays] for arrays in operands]
    if len(operands) > 1 and operands[1] is operands[0]:
        copies[1] = copies[0]
    return tuple(copies)


def assert_same(got, want, what, nan_sign=True):
    """Equal bits; without `nan_sign`, a NaN may stand for a NaN of the other sign."""
    for op, (g_list, w_list) in enumerate(zip(got, want)):
        for t, (g, w) in enumerate(zip(g_list, w_list)):
            assert g.dtype == w.dtype
            bits = np.dtype(f"u{g.dtype.itemsize}")
            differ = g.view(bits) != w.view(bits)
            if not nan_sign:
                differ &= ~(np.isnan(g.astype(np.float32)) & np.isnan(w.astype(np.float32)))
            mismatch = np.flatnonzero(differ)
            assert mismatch.size == 0, (
                f"{what}: operand {op}, tensor {t}: {mismatch.size} of {g.size} differ, first "
                f"at {mismatch[0]}: {g[mismatch[0]]!r} != {w[mismatch[0]]!r}")
