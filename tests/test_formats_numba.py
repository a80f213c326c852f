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
every 16-bit pattern and on float32 values around every rounding boundary. One driver per
kernel serves every combination, so the grid costs one compilation per kernel.
"""

from typing import NamedTuple

import numpy as np
import pytest

pytest.importorskip("numba")
nb = pytest.importorskip("fastopt._backends._numba.optim")

from fastopt import _rules  # noqa: E402
from fastopt._backends import _formats, _steps, resolve  # noqa: E402

# 66433 elements: two threads' worth (a thread takes 32768 at least), and tensors that end
# inside a group of 8, a chunk, and after several chunks
SIZES = (0, 1, 7, 8, 9, 1023, 16385, 40000, 9000)
STEPS = (1, 2, 9)  # SGD's and ADOPT's first step, RAdam without and with its rectification
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": _formats.bfloat16(),
          "float16": np.dtype(np.float16)}
# each kernel's rule (Lamb's update pass: a pass of a multi-pass rule, no reference of its own)
RULE_OF = {k.name: rule for rule in _rules.RULES for k in rule.kernels
           if k.name in _rules.KERNELS}


class Config(NamedTuple):
    param: str       # the parameter's storage (the shadow's, with master weights)
    grad: str        # "param" (the parameter's format) or a format
    state: str
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


def hyper(kernel, step):
    """Hyperparameters of `kernel`'s rule (as its reference and scalars take them) at
    `step`, with the gradient prologue's clip and scale on."""
    state = _rules.KERNELS[kernel].state
    adam = dict(step=step, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    by_op = {
        "sgd_step": dict(lr=0.05, momentum=0.9 if state else 0.0, dampening=0.1,
                         weight_decay=0.01, nesterov=bool(state), maximize=False,
                         first=step == 1),
        "adam_step": dict(adam, decoupled=kernel == "adam", maximize=False),
        "adagrad_step": dict(step=step, lr=0.05, lr_decay=0.01, weight_decay=0.01, eps=1e-10,
                             maximize=True),
        "rmsprop_step": dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.01,
                             momentum=0.9 if "momentum_buffer" in state else 0.0,
                             centered="grad_avg" in state, maximize=False),
        "adadelta_step": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01, maximize=False),
        "adamax_step": dict(adam, maximize=False),
        "nadam_step": dict(adam, mu_product=0.5, momentum_decay=4e-3, decoupled=False,
                           maximize=True),
        "radam_step": dict(adam, decoupled=True, maximize=False),
        "adopt_step": dict(adam, eps=1e-6, decoupled=True, clip_value=1.5, maximize=False),
        "lion_step": dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.01, maximize=False),
        "lamb_step": dict(adam, eps=1e-6, maximize=False),
    }
    return dict(by_op[RULE_OF[kernel].op], grad_scale=0.9, grad_clip=2.5)


def record(kernel, hyper_):
    scalars = RULE_OF[kernel].scalars(np.float32, **hyper_)
    if RULE_OF[kernel].driver is not None:  # (update pass, apply pass)
        scalars = scalars[0]
    return _rules.KERNELS[kernel].args.record(np.float32, scalars)


def reference(kernel, hyper_):
    """The float32 step over whole arrays that _formats.around wraps: the rule's NumPy
    reference (the kernel's state put in the rule's order), or for Lamb's update pass (a
    pass of a multi-pass rule, without a reference of its own) the float32 Numba kernel,
    which test_optim_parity holds to the reference through Lamb's steps."""
    rule = RULE_OF[kernel]
    if rule.driver is not None:
        def step(*ops, masks=None):
            nb.elementwise(kernel, ops, record(kernel, hyper_), 1)
        return step
    numpy_step = resolve(rule.op, "numpy", "cpu", np.float32)
    names = _rules.KERNELS[kernel].state

    def step(params, out, grads, *states, masks=None):
        by_name = dict(zip(names, states))
        numpy_step(params, out, grads, *(by_name.get(name) for name in rule.state),
                   masks=masks, n_threads=1, **hyper_)
    return step


SPECIALS = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 6e-8, -3e-5, 6.1e-5, 1e-30,
                     -1e-40, 65504.0, 65520.0, -7e4, 3e38], np.float32)


def values(rng, n, dtype, scale=1.0, positive=False, special=False, low=0.0):
    x = rng.standard_normal(n).astype(np.float32) * np.float32(scale)
    if positive:
        x = np.abs(x) + np.float32(low)
    if special and n:
        at = rng.random(n) < 0.2
        x[at] = rng.choice(SPECIALS, int(at.sum()))
    return x.astype(dtype)


def problem(kernel, config, sizes, seed, in_place, special=False):
    """The operands of `kernel` stored as `config` says, and their Formats (step 0)."""
    rng = np.random.default_rng(seed)
    p_type = DTYPES["float32" if config.master else config.param]
    g_type = DTYPES[config.param if config.grad == "param" else config.grad]
    s_type = DTYPES[config.state]
    params = [values(rng, n, p_type, special=special) for n in sizes]
    out = params if in_place else [np.zeros(n, p_type) for n in sizes]
    grads = [values(rng, n, g_type, special=special) for n in sizes]
    # a centered RMSprop's grad_avg small beside its square_avg: real square roots
    states = tuple([values(rng, n, s_type, 0.1 if name == "grad_avg" else 0.5, positive=True,
                           special=special, low=0.2 if name == "square_avg" else 0.0)
                    for n in sizes]
                   for name in _rules.KERNELS[kernel].state)
    operands = (params, out, grads) + states
    types = (p_type, p_type, g_type) + (s_type,) * len(states)
    if config.master:
        operands += ([np.zeros(n, DTYPES[config.param]) for n in sizes],)
        types += (DTYPES[config.param],)
    keys = np.array([_formats.tensor_key(seed, t) for t in range(len(sizes))], np.uint32)
    formats = _formats.Formats(tuple(_formats.code_of(t) for t in types), config.stochastic,
                               0, keys, config.master)
    return operands, formats


def copy(operands):
    """A deep copy that keeps operand 1 the same arrays as operand 0 when it is."""
    copies = [[a.copy() for a in arrays] for arrays in operands]
    if operands[1] is operands[0]:
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


def run_both(kernel, config, sizes, seed, in_place, n_threads, special=False):
    """Steps of `kernel` with formats on Numba and through _formats.around over the
    reference, from equal operands (fresh gradients each step; out of place, the result
    becomes the next step's input): equal after every step. With special values, a NaN may
    come out as a NaN of another sign or payload: which of two NaN operands an operation
    passes on depends on how the compiler ordered it (NumPy, LLVM, and two Numba
    compilations of one element function differ there); test_conversions holds the
    conversions themselves to the reference, NaN bits included."""
    operands, formats = problem(kernel, config, sizes, seed, in_place, special)
    got, want = copy(operands), copy(operands)
    g_type = operands[2][0].dtype
    rng = np.random.default_rng(seed + 1)
    for step in STEPS:
        h = hyper(kernel, step)
        formats = formats._replace(step=step)
        grads = [values(rng, n, g_type, special=special) for n in sizes]
        got, want = ((ops[:2] + ([g.copy() for g in grads],) + ops[3:]) for ops in (got, want))
        nb.elementwise(kernel, got, record(kernel, h), n_threads, formats=formats)
        _formats.around(reference(kernel, h), want, formats)
        what = f"{kernel} {config} {'in place' if in_place else 'out of place'} step {step}"
        assert_same(got, want, what, nan_sign=not special)
        if not in_place:
            got, want = ((ops[1], ops[0]) + ops[2:] for ops in (got, want))


def _grid():
    cases = []
    for i, kernel in enumerate(sorted(_rules.KERNELS)):
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
    seed = sorted(_rules.KERNELS).index(kernel)
    run_both(kernel, config, SIZES, seed, in_place=True, n_threads=2)
    run_both(kernel, config, SIZES, seed, in_place=False, n_threads=1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("kernel", sorted(_rules.KERNELS))
def test_special_values(kernel):
    """NaN (either sign), inf, zeros of either sign, float16 subnormals, float32 values
    below float16's range and beyond it, in every operand."""
    for config, in_place in ((Config("float16", "param", "float16", False, True), True),
                             (Config("bfloat16", "float32", "bfloat16", False, False), False),
                             (Config("float16", "float32", "float32", True, False), True)):
        run_both(kernel, config, (1, 9, 1100), seed=7, in_place=in_place, n_threads=1,
                 special=True)


def test_master_weights_shadow_is_the_rounded_parameter():
    operands, formats = problem("adam", CONFIGS[6], (1100,), seed=3, in_place=True)
    nb.elementwise("adam", operands, record("adam", hyper("adam", 1)), 1,
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


def test_through_the_generic_step():
    """_steps.rule_step hands formats to this module's elementwise (FORMATS: the storage
    codes it converts): its Adam step with AMSGrad and master weights equals the NumPy
    one, which runs through _formats.around."""
    assert nb.FORMATS == {_formats.F32, _formats.BF16, _formats.F16}
    operands, formats = problem("adam_amsgrad", CONFIGS[6], SIZES, seed=11, in_place=True)
    got, want = copy(operands), copy(operands)
    h = hyper("adam_amsgrad", 2)
    formats = formats._replace(step=2)
    _steps.rule_step(nb, _rules.BY_NAME["Adam"], *got[:6], n_threads=2, formats=formats,
                     shadow=got[6], **h)
    resolve("adam_step", "numpy", "cpu", np.float32)(*want[:6], n_threads=1, formats=formats,
                                                      shadow=want[6], **h)
    assert_same(got, want, "adam_step")


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


def _call(kernel="adam", n_aux=0, record_dtype=np.float32, **changes):
    operands, formats = problem("adam", Config("bfloat16", "param", "float32", False, True),
                                (5, 9), seed=0, in_place=True)
    operands = changes.pop("operands", operands)
    args = _rules.KERNELS["adam"].args
    rec = args.record(record_dtype, {f: 0 for f in args.fields})
    nb.elementwise(kernel, operands, rec, 1, n_aux=n_aux, formats=formats._replace(**changes))


@pytest.mark.parametrize("call, match", [
    (lambda: _call(kernel="scaled_apply"), "not an elementwise kernel"),
    (lambda: _call(kernel="adafactor_vector"), "not an elementwise kernel"),
    (lambda: _call(n_aux=1), "not an elementwise kernel"),
    (lambda: _call(storage=(1,) * 5), "float32, bfloat16 and float16"),
    (lambda: _call(storage=(2, 2, 2, 0, 4)), "float32, bfloat16 and float16"),
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
