"""Storage formats on the Numba backend (fastopt._backends._numba.optim, ``formats=``):
bfloat16, float16 and float32 parameters, gradients and state around the float32 kernels,
converted inside each chunk, must give the same bits as fastopt._backends._formats.around
(whole arrays loaded, the float32 NumPy reference run, the written ones stored back rounded).

Every elementwise kernel of the rule table runs several storage combinations (rotated over
the kernels, so that each combination meets several kernels): params, grads and state in
each format, master weights with a low-precision shadow, stochastic and nearest rounding,
each in place and out of place, on 1 and 2 threads, over a few steps, on tensors of odd
sizes; then NaN, inf, float16 subnormals and values out of float16's range (a NaN may come
out as another NaN there, see run_both), and the conversions on their own, bit for bit, on
every 16-bit pattern and on float32 values around every rounding boundary. Blockwise 8-bit
state (codes and block scales carried from step to step) meets every kernel with state in
the same way, alone and beside other state formats, with NaN and inf in some blocks; its
quantizer gives q8_store's code on each side of every step of the code and of every bucket
of its lookup table. One driver per kernel serves every combination, so the grid costs one
compilation per kernel.
"""

from typing import NamedTuple

import format_cases
import numpy as np
import pytest
from cases import RULE_OF, kernel_hyper
from format_cases import (
    DTYPES,
    Q8,
    Q8_SIZES,
    SIZES,
    SPECIALS,
    STEPS,
    assert_same,
    copy,
    problem,
    record,
    state_format,
    values,
)

pytest.importorskip("numba")
nb = pytest.importorskip("fastopt._backends._numba.optim")

from fastopt import _rules  # noqa: E402
from fastopt._backends import _formats, _layout, _steps, resolve  # noqa: E402


class Config(NamedTuple):
    param: str       # the parameter's storage (the shadow's, with master weights)
    grad: str        # "param" (the parameter's format) or a format
    state: str       # a format (or Q8), or several, comma-separated, for state 0, 1, ...
    master: bool     # float32 params (the master copy) and a shadow in `param`
    stochastic: bool

    def __str__(self):
        grad = self.param if self.grad == "param" else self.grad
        return (f"{'master-' if self.master else ''}{self.param}-g{grad}-s{self.state}-"
                f"{'sr' if self.stochastic else 'rne'}")


CONFIGS = (
    Config("bfloat16", "param", "float32", False, True),
    Config("bfloat16", "float32", "bfloat16", False, False),
    Config("float16", "param", "float16", False, True),
    Config("float16", "float32", "float32", False, False),
    Config("float32", "param", "bfloat16", False, True),
    Config("float32", "param", "float16", False, False),
    Config("bfloat16", "param", "bfloat16", True, True),
    Config("float16", "param", "float32", True, False),
    Config("bfloat16", "param", "bfloat16", False, False),
    Config("float16", "float32", "bfloat16", True, True),
    Config("bfloat16", "float32", "float16", False, True),
    Config("float16", "param", "bfloat16", False, False),
)
PER_KERNEL = 4  # configs per kernel in the grid
Q8_CONFIGS = (
    Config("float32", "param", Q8, False, False),
    Config("bfloat16", "param", Q8, True, True),
    Config("float16", "float32", Q8, True, False),
    Config("bfloat16", "param", f"{Q8},bfloat16", False, True),
    Config("float32", "param", f"float32,{Q8}", False, False),
    Config("float16", "param", f"bfloat16,{Q8}", True, True),
)


def _compiled(kernel, operands, record_, masks):
    nb.elementwise(kernel, operands, record_, 1)


def reference(kernel, hyper_):
    """The float32 reference step (format_cases.reference), the Numba kernel for Lamb's
    update pass (a pass of a multi-pass rule, without a reference of its own)."""
    return format_cases.reference(kernel, hyper_, _compiled)


def run_both(kernel, config, sizes, seed, in_place, n_threads, special=0.0):
    """Steps of `kernel` with formats on Numba and through _formats.around over the
    reference, from equal operands and block scales (fresh gradients each step; out of
    place, the result becomes the next step's input): equal after every step. With special
    values (this fraction of them), a NaN may come out as a NaN of another sign or payload:
    which of two NaN operands an operation passes on depends on how the compiler ordered it
    (NumPy, LLVM, and two Numba compilations of one element function differ there);
    test_conversions holds the conversions themselves to the reference, NaN bits included
    (8-bit state has one NaN: code 0, or a NaN block scale)."""
    operands, formats, _ = problem(kernel, config, sizes, seed, in_place, special)
    got, want = copy(operands), copy(operands)
    got_scales, want_scales = copy(formats.scales), copy(formats.scales)
    g_type = operands[2][0].dtype
    rng = np.random.default_rng(seed + 1)
    for step in STEPS:
        h = kernel_hyper(kernel, step)
        formats = formats._replace(step=step)
        grads = [values(rng, n, g_type, special=special) for n in sizes]
        got, want = ((ops[:2] + ([g.copy() for g in grads],) + ops[3:]) for ops in (got, want))
        nb.elementwise(kernel, got, record(kernel, h), n_threads,
                       formats=formats._replace(scales=got_scales))
        _formats.around(reference(kernel, h), want, formats._replace(scales=want_scales))
        what = f"{kernel} {config} {'in place' if in_place else 'out of place'} step {step}"
        assert_same(got + got_scales, want + want_scales, what, nan_sign=not special)
        if not in_place:
            got, want = ((ops[1], ops[0]) + ops[2:] for ops in (got, want))


def _grid():
    cases = []
    for i, kernel in enumerate(sorted(RULE_OF)):
        for j in range(PER_KERNEL):
            config = CONFIGS[(PER_KERNEL * i + j) % len(CONFIGS)]
            cases.append(pytest.param(kernel, config, id=f"{kernel}-{config}"))
    return cases


def test_every_config_meets_several_kernels():
    counts = {config: 0 for config in CONFIGS}
    for case in _grid():
        counts[case.values[1]] += 1
    assert min(counts.values()) >= 3


@pytest.mark.parametrize("kernel,config", _grid())
def test_formats_match_around_the_reference(kernel, config):
    """Each case in place on 2 threads and out of place on 1 (one driver serves both)."""
    seed = sorted(RULE_OF).index(kernel)
    run_both(kernel, config, SIZES, seed, in_place=True, n_threads=2)
    run_both(kernel, config, SIZES, seed, in_place=False, n_threads=1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("kernel", sorted(RULE_OF))
def test_special_values(kernel):
    """NaN (either sign), inf, zeros of either sign, float16 subnormals, float32 values
    below float16's range and beyond it, in every operand."""
    for config, in_place in ((Config("float16", "param", "float16", False, True), True),
                             (Config("bfloat16", "float32", "bfloat16", False, False), False),
                             (Config("float16", "float32", "float32", True, False), True)):
        run_both(kernel, config, (1, 9, 1100), seed=7, in_place=in_place, n_threads=1,
                 special=0.2)


def _q8_grid():
    """For each kernel with state, the two configs of Q8_CONFIGS that waited longest among
    those that leave it some 8-bit state."""
    cases, queue = [], list(Q8_CONFIGS)
    for kernel in sorted(RULE_OF):
        n_state = len(_rules.KERNELS[kernel].state)
        fitting = [config for config in queue
                   if any(state_format(config, k) == Q8 for k in range(n_state))]
        for config in fitting[:2]:
            queue.remove(config)
            queue.append(config)
            cases.append(pytest.param(kernel, config, id=f"{kernel}-{config}"))
    return cases


def test_every_q8_config_meets_several_kernels():
    counts = {config: 0 for config in Q8_CONFIGS}
    for case in _q8_grid():
        counts[case.values[1]] += 1
    assert min(counts.values()) >= 3


@pytest.mark.parametrize("kernel,config", _q8_grid())
def test_int8_state_matches_around_the_reference(kernel, config):
    """Codes and block scales too, in place on 2 threads and out of place on 1."""
    seed = sorted(RULE_OF).index(kernel)
    run_both(kernel, config, Q8_SIZES, seed, in_place=True, n_threads=2)
    run_both(kernel, config, Q8_SIZES, seed, in_place=False, n_threads=1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("kernel", [k for k in sorted(RULE_OF) if _rules.KERNELS[k].state])
def test_int8_state_special_values(kernel):
    """Special values in a few elements: blocks with NaN (a NaN block scale), with inf (an
    infinite one: the block's finite values at the code of 0), and clean ones beside them."""
    for config, in_place in ((Config("float32", "param", Q8, False, False), True),
                             (Config("bfloat16", "float32", f"{Q8},bfloat16", True, True),
                              False)):
        run_both(kernel, config, (1, 9, 1100, 4096), seed=8, in_place=in_place, n_threads=1,
                 special=0.002)


def _q8_cases(code):
    """Values x in blocks whose scale is 1 (255 values and 1.0, so q = x): each side of every
    step of the code (its least q, nb._Q8_KEYS) and of every bucket of the lookup table; then
    blocks of every magnitude (those below 1e-12 divided by SCALE_MIN), of zeros, some with
    a NaN or an inf, and a partial block at the end."""
    top = (np.arange(nb._Q8_SIDE, dtype=np.int64) << 16) + nb._Q8_FLOOR
    buckets = np.concatenate([top, -1 - (top | 0xFFFF)])  # their least keys, as _q8_table's
    keys = np.concatenate([nb._Q8_KEYS[code], buckets])[:, None] + np.arange(-2, 3)
    bits = np.where(keys < 0, (-1 - keys) | 0x80000000, keys).astype(np.uint32)
    q = bits.view(np.float32).ravel()
    q = np.concatenate([q[(q >= -1) & (q <= 1)], np.float32([0.0, -0.0, 1.0, -1.0, 1e-45])])
    q = np.pad(q, (0, -q.size % 255))
    ones = np.concatenate([q.reshape(-1, 255), np.ones((q.size // 255, 1), np.float32)],
                          axis=1)
    rng = np.random.default_rng(code)
    scaled = (rng.standard_normal((80, 256)) * np.logspace(-45, 38, 80)[:, None]
              ).astype(np.float32)
    scaled[:4] = 0.0
    for row, special in zip(scaled[10::9], (np.nan, -np.nan, np.inf, -np.inf) * 2):
        row[rng.integers(256)] = special
    return np.concatenate([ones.ravel(), scaled.ravel(),
                           rng.standard_normal(300).astype(np.float32)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("code", [_formats.Q8S, _formats.Q8U], ids=["signed", "unsigned"])
def test_int8_quantizer(code):
    """The chunks' 8-bit stores and loads against _formats.q8_store and q8_load, bit for bit:
    the quantizer's lookup on _q8_cases (it was checked against q8_store's binary search on
    all 2^32 float32 values when written), every code loaded with block scales of every
    kind; blocks never straddle chunks."""
    assert _layout.CHUNK % _formats.BLOCK == 0
    x = _q8_cases(code)
    got = np.empty(x.size, np.uint8), np.empty(-(-x.size // _formats.BLOCK), np.float32)
    want = np.empty_like(got[0]), np.empty_like(got[1])
    nb._store_q8(x, *got, code)
    _formats.q8_store(*want, x, code)
    assert_same([got], [want], "q8_store")
    codes = np.tile(np.arange(256, dtype=np.uint8), 8)
    absmax = np.array([1.0, 1e-12, 3e38, 0.37, np.inf, np.nan, 6e-39, 2.5], np.float32)
    assert_same([[nb._load_q8(codes, absmax, code)]], [[_formats.q8_load(codes, absmax, code)]],
                "q8_load")


def test_master_weights_shadow_is_the_rounded_parameter():
    operands, formats, _ = problem("adam", CONFIGS[6], (1100,), seed=3, in_place=True)
    nb.elementwise("adam", operands, record("adam", kernel_hyper("adam", 1)), 1,
                   formats=formats._replace(step=1))
    params, shadow = operands[0][0], operands[-1][0]
    assert shadow.dtype == DTYPES["bfloat16"] and params.dtype == np.float32
    # stochastic rounding: each value is one of the two bfloat16 neighbours, both occur
    down = params.view(np.uint32) & np.uint32(0xFFFF0000)
    bits = shadow.view(np.uint16).astype(np.uint32) << np.uint32(16)
    assert np.all((bits == down) | (bits == down + np.uint32(0x10000)))
    assert 0 < np.count_nonzero(bits == down) < params.size


@pytest.mark.parametrize("lo, stream, step", [(0, 0, 1), (8 << 32, 3, (1 << 33) + 5)])
def test_round_bits_are_the_references(lo, stream, step):
    """The chunks' random bits (Philox in 32-bit words) against _formats.round_bits, with
    a block counter and a step past 32 bits."""
    key = np.array(_formats.tensor_key(5, 2), np.uint32)
    got = nb._round_bits(lo, 1003, stream, np.uint64(step), key)[:1003]
    want = _formats.round_bits(1003, stream, step, key, lo=lo)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config, sizes, masked", [
    (CONFIGS[6], SIZES, False),
    (Config("bfloat16", "param", f"{Q8},{Q8},bfloat16", True, True), Q8_SIZES, False),
    (Config("float16", "param", Q8, True, False), Q8_SIZES, True)])
def test_through_the_generic_step(config, sizes, masked):
    """_steps.rule_step hands formats to this module's elementwise (FORMATS: the storage
    codes it converts): its Adam step with AMSGrad and master weights equals the NumPy
    one, which runs through _formats.around; with pruning masks too."""
    assert nb.FORMATS == {_formats.F32, _formats.BF16, _formats.F16, _formats.Q8S,
                          _formats.Q8U}
    operands, formats, _ = problem("adam_amsgrad", config, sizes, seed=11, in_place=True)
    got, want = copy(operands), copy(operands)
    got_scales, want_scales = copy(formats.scales), copy(formats.scales)
    rng = np.random.default_rng(12)
    masks = [(rng.random(n) < 0.7).astype(np.uint8) for n in sizes] if masked else None
    h = kernel_hyper("adam_amsgrad", 2)
    formats = formats._replace(step=2)
    _steps.rule_step(nb, _rules.BY_NAME["Adam"], *got[:6], n_threads=2, masks=masks,
                     formats=formats._replace(scales=got_scales), shadow=got[6], **h)
    resolve("adam_step", "numpy", "cpu", np.float32)(
        *want[:6], n_threads=1, masks=masks, formats=formats._replace(scales=want_scales),
        shadow=want[6], **h)
    assert_same(got + got_scales, want + want_scales, "adam_step")


def conversion_cases(rng, n=100_000):
    """float32 values for the stores: any bit pattern; float16's subnormal range and around
    it; ties of bfloat16, of float16's normal range and of its subnormals (k + 1/2) 2^-24;
    every float16 value and its float32 neighbours; the special values."""
    u32 = np.uint32
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(u32)
    near = (bits & u32(0x807FFFFF)) | (rng.integers(95, 116, n).astype(u32) << u32(23))
    bf16_ties = (bits & u32(0xFFFF0000)) | u32(0x8000)
    f16_ties = ((bits & u32(0x807FE000)) | u32(0x1000)
                | (rng.integers(103, 143, n).astype(u32) << u32(23)))
    k = np.arange(1024, dtype=np.float32)
    sub_ties = np.concatenate([k + np.float32(0.5), -(k + np.float32(0.5))]) \
        * np.float32(2.0 ** -24)
    f16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    f16 = f16.astype(np.float32).view(u32)
    f16 = f16[~np.isnan(f16.view(np.float32))]
    return np.concatenate([bits, near, bf16_ties, f16_ties, sub_ties.view(u32), f16 - u32(1),
                           f16, f16 + u32(1), SPECIALS.view(u32)]).view(np.float32)


@pytest.mark.parametrize("code", [_formats.BF16, _formats.F16], ids=["bfloat16", "float16"])
def test_conversions(code):
    """The chunks' loads (every 16-bit pattern) and stores (to nearest, and stochastic with
    the chunks' random bits) against _formats.load and store, bit for bit."""
    name = {_formats.BF16: "bf16", _formats.F16: "f16"}[code]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = _formats.load(h, code)
    np.testing.assert_array_equal(getattr(nb, f"_load_{name}")(h).view(np.uint32),
                                  want.view(np.uint32))
    x = conversion_cases(np.random.default_rng(code))
    key, step, stream = np.array([0x1234567, 0x89ABCDEF], np.uint32), 7, 2
    for stochastic in (False, True):
        got, want = np.empty(x.size, np.uint16), np.empty(x.size, np.uint16)
        r = nb._round_bits(0, x.size, stream, np.uint64(step), key) if stochastic else got
        getattr(nb, f"_store_{name}_{'sr' if stochastic else 'rne'}")(x, got, r)
        _formats.store(want, x, code, stochastic, step, key, stream)
        differ = np.flatnonzero(got != want)
        assert differ.size == 0, (f"{differ.size} differ, first {x[differ[0]]!r} "
                                  f"({x[differ[0]:differ[0] + 1].view(np.uint32)[0]:#x}): "
                                  f"{got[differ[0]]:#x} != {want[differ[0]]:#x}")


def _call(kernel="adam", n_aux=0, record_dtype=np.float32, state="float32", **changes):
    operands, formats, _ = problem("adam", Config("bfloat16", "param", state, False, True),
                                (5, 300), seed=0, in_place=True)
    operands = changes.pop("operands", operands)
    args = _rules.KERNELS["adam"].args
    rec = args.record(record_dtype, {f: 0 for f in args.fields})
    nb.elementwise(kernel, operands, rec, 1, n_aux=n_aux, formats=formats._replace(**changes))


@pytest.mark.parametrize("call, match", [
    (lambda: _call(kernel="scaled_apply"), "not an elementwise kernel"),
    (lambda: _call(kernel="adafactor_vector"), "not an elementwise kernel"),
    (lambda: _call(n_aux=1), "not an elementwise kernel"),
    (lambda: _call(storage=(1,) * 5), "float32, bfloat16 and float16"),
    (lambda: _call(storage=(2, 2, 2, 0, 6)), "float32, bfloat16 and float16"),
    (lambda: _call(storage=(4, 2, 2, 0, 0)), "state also 8-bit"),
    (lambda: _call(storage=(2, 2, 5, 0, 0)), "state also 8-bit"),
    (lambda: _call(storage=(2, 2, 2, 0, 4)), "elements of 1 bytes"),
    (lambda: _call(state=Q8, scales=()), "0 lists of block scales for 2"),
    (lambda: _call(state=Q8, storage=(2, 2, 2, 4, 0)), "elements of 4 bytes"),
    (lambda: _call(state=Q8, scales=([np.zeros(1, np.float32)] * 2,) * 2),
     "operand 3's block scales"),
    (lambda: _call(state=Q8, scales=([np.zeros(1, np.float32), np.zeros(2, np.float64)],) * 2),
     "elements of 4 bytes"),
    (lambda: _call(storage=(2, 2, 2, 0)), "takes 5 operands"),
    (lambda: _call(shadow=True), "takes 6 operands"),
    (lambda: _call(storage=(2, 2, 0, 0, 0)), "elements of 4 bytes"),
    (lambda: _call(storage=(2, 2, 2, 0, 2)), "elements of 2 bytes"),
    (lambda: _call(keys=np.zeros((1, 2), np.uint32)), "keys"),
    (lambda: _call(record_dtype=np.float64), "not float32"),
])
def test_refused(call, match):
    """What the chunks could not run safely is refused (before the driver runs)."""
    with pytest.raises(ValueError, match=match):
        call()
