"""Storage formats on the Cython backend (kernels/cpu/format_loops.h): bfloat16, float16 and
float32 parameters, gradients and state around the float32 kernels, converted inside each
chunk, must give the same bits as fastopt._backends._formats.around (whole arrays loaded,
the float32 NumPy reference run, the written ones stored back rounded).

Every elementwise kernel of the rule table runs a few storage combinations (rotated over
the kernels so that each combination meets several kernels): params, grads and state in
each format, master weights with a low-precision shadow, stochastic and nearest rounding,
in place and out of place, with and without pruning masks, on 1 and 2 threads, over
several steps, on tensors of odd sizes; then NaN, inf, float16 subnormals and values out of
float16's range.
"""

from typing import NamedTuple, Optional

import numpy as np
import pytest

from fastopt import _rules
from fastopt._backends import _formats, resolve

cy = pytest.importorskip("fastopt._backends._cython.optim")

# 66433 elements: two threads' worth (the plan gives a thread 32768 at least), and tensors
# that end inside a group of 8, a block and a chunk
SIZES = (0, 1, 7, 8, 9, 1023, 16385, 40000, 9000)
STEPS = (1, 2, 9)  # SGD's first step, and RAdam without and with its rectification
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": _formats.bfloat16(),
          "float16": np.dtype(np.float16)}
# each kernel's rule: the kernels of a rule with a multi-pass driver (Lamb's update pass)
# have no NumPy reference of their own
RULE_OF = {k.name: rule for rule in _rules.RULES for k in rule.kernels
           if k.name in _rules.KERNELS}


class Config(NamedTuple):
    param: str            # the parameter's storage (the shadow's, with master weights)
    grad: str             # "param" (the parameter's format) or a format
    state: str
    master: bool          # float32 params (the master copy) and a shadow in `param`
    stochastic: bool
    in_place: bool
    masks: bool
    n_threads: int

    def __str__(self):
        grad = self.param if self.grad == "param" else self.grad
        return (f"{'master-' if self.master else ''}{self.param}-g{grad}-s{self.state}-"
                f"{'sr' if self.stochastic else 'rne'}-{'inplace' if self.in_place else 'out'}-"
                f"{'masks-' if self.masks else ''}{self.n_threads}t")


CONFIGS = (
    Config("bfloat16", "param", "float32", False, True, True, False, 2),
    Config("bfloat16", "float32", "bfloat16", False, False, False, True, 1),
    Config("float16", "param", "float16", False, True, False, True, 2),
    Config("float16", "float32", "float32", False, False, True, False, 1),
    Config("float32", "param", "bfloat16", False, True, True, True, 1),
    Config("float32", "param", "float16", False, False, False, False, 2),
    Config("bfloat16", "param", "bfloat16", True, True, True, True, 2),
    Config("float16", "param", "float32", True, False, False, False, 1),
    Config("bfloat16", "param", "bfloat16", False, False, True, False, 2),
    Config("float16", "float32", "bfloat16", True, True, True, False, 1),
    Config("float32", "param", "float16", False, True, False, True, 2),
)


def hyper(kernel, step):
    """Hyperparameters of `kernel`'s rule (as its reference and scalars take them) at
    `step`, with the gradient prologue's clip and scale on."""
    state = _rules.KERNELS[kernel].state
    common = dict(grad_scale=0.9, grad_clip=2.5)
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
    return dict(by_op[RULE_OF[kernel].op], **common)


def record(kernel, hyper_):
    scalars = RULE_OF[kernel].scalars(np.float32, **hyper_)
    if RULE_OF[kernel].driver is not None:  # (update pass, apply pass)
        scalars = scalars[0]
    return _rules.KERNELS[kernel].args.record(np.float32, scalars)


def reference(kernel, hyper_, numpy=True):
    """The float32 step over whole arrays that _formats.around wraps: the rule's NumPy
    reference (the kernel's state put in the rule's order), else (or for a pass of a
    multi-pass rule, which has no reference of its own) the float32 Cython kernel, which
    test_optim_parity holds to the reference."""
    rule = RULE_OF[kernel]
    if not numpy or rule.driver is not None:
        def step(*ops, masks=None):
            cy.elementwise(kernel, ops, record(kernel, hyper_), 1, masks=masks)
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


class Problem(NamedTuple):
    operands: tuple       # param in, param out, grad, state... (, shadow)
    formats: _formats.Formats
    masks: Optional[list]


def problem(kernel, config, sizes, seed, special=False):
    """The operands of `kernel` stored as `config` says, and their Formats (step 0)."""
    rng = np.random.default_rng(seed)
    p_type = DTYPES["float32" if config.master else config.param]
    g_type = DTYPES[config.param if config.grad == "param" else config.grad]
    s_type = DTYPES[config.state]
    params = [values(rng, n, p_type, special=special) for n in sizes]
    out = params if config.in_place else [np.zeros(n, p_type) for n in sizes]
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
    masks = ([(rng.random(n) < 0.7).astype(np.uint8) for n in sizes] if config.masks
             else None)
    return Problem(operands, formats, masks)


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
                f"{what}: operand {op}, tensor {t}: {mismatch.size} of {g.size} differ, first at "
                f"{mismatch[0]}: {g[mismatch[0]]!r} != {w[mismatch[0]]!r}")


def run_both(kernel, config, sizes, seed, special=False):
    """Steps of `kernel` on the Cython backend and through _formats.around over the
    reference, from equal operands (fresh gradients each step; out of place, the result
    becomes the next step's input): equal after every step. With special values, the
    reference's NaN may have the other sign (the float32 C loops and the NumPy reference
    order a NaN's operations differently), and the bits are held to around over the
    float32 C kernel as well."""
    prob = problem(kernel, config, sizes, seed, special)
    runs = [copy(prob.operands) for _ in range(2 + special)]  # got, want (, want in C)
    g_type = prob.operands[2][0].dtype
    rng = np.random.default_rng(seed + 1)
    for step in STEPS:
        h = hyper(kernel, step)
        formats = prob.formats._replace(step=step)
        grads = [values(rng, n, g_type, special=special) for n in sizes]
        runs = [ops[:2] + ([g.copy() for g in grads],) + ops[3:] for ops in runs]
        cy.elementwise(kernel, runs[0], record(kernel, h), config.n_threads, masks=prob.masks,
                       formats=formats)
        for i, ops in enumerate(runs[1:]):
            _formats.around(reference(kernel, h, numpy=i == 0), ops, formats, masks=prob.masks)
        what = f"{kernel} {config} step {step}"
        assert_same(runs[0], runs[1], what, nan_sign=not special)
        if special:
            assert_same(runs[0], runs[2], f"{what} (C float32 kernel)")
        if not config.in_place:
            runs = [(ops[1], ops[0]) + ops[2:] for ops in runs]


def _grid():
    cases = []
    for i, kernel in enumerate(sorted(_rules.KERNELS)):
        for j in range(3):
            config = CONFIGS[(3 * i + j) % len(CONFIGS)]
            cases.append(pytest.param(kernel, config, id=f"{kernel}-{config}"))
    return cases


def test_every_config_meets_several_kernels():
    counts = {config: 0 for config in CONFIGS}
    for case in _grid():
        counts[case.values[1]] += 1
    assert min(counts.values()) >= 3


@pytest.mark.parametrize("kernel,config", _grid())
def test_formats_match_around_the_reference(kernel, config):
    run_both(kernel, config, SIZES, seed=sorted(_rules.KERNELS).index(kernel))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("kernel", sorted(_rules.KERNELS))
@pytest.mark.parametrize("config", [
    Config("float16", "param", "float16", False, True, True, True, 1),
    Config("bfloat16", "float32", "bfloat16", False, False, False, False, 1),
    Config("float16", "float32", "float32", True, False, True, False, 1),
], ids=str)
def test_special_values(kernel, config):
    """NaN (either sign), inf, zeros of either sign, float16 subnormals, float32 values
    below float16's range and beyond it, in every operand."""
    run_both(kernel, config, (1, 9, 1100), seed=7, special=True)


def test_master_weights_shadow_is_the_rounded_parameter():
    prob = problem("adam", CONFIGS[6], (1100,), seed=3)
    h = hyper("adam", 1)
    cy.elementwise("adam", prob.operands, record("adam", h), 1, masks=prob.masks,
                   formats=prob.formats._replace(step=1))
    params, shadow = prob.operands[0][0], prob.operands[-1][0]
    assert shadow.dtype == DTYPES["bfloat16"] and params.dtype == np.float32
    # stochastic rounding: each value is one of the two bfloat16 neighbours
    down = params.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    bits = shadow.view(np.uint16).astype(np.uint32) << np.uint32(16)
    assert np.all((bits == down) | (bits == down + np.uint32(0x10000)))
    assert np.all(params[prob.masks[0] == 0] == 0)


def test_through_the_generic_step():
    """_steps.rule_step hands formats to the backend's elementwise (FORMATS): the Cython
    Adam step equals the NumPy one, which runs through _formats.around."""
    assert cy.FORMATS == {_formats.F32, _formats.BF16, _formats.F16}
    prob = problem("adam_amsgrad", CONFIGS[6], SIZES, seed=11)
    got, want = copy(prob.operands), copy(prob.operands)
    h = hyper("adam_amsgrad", 2)
    formats = prob.formats._replace(step=2)
    for backend, ops in (("cython", got), ("numpy", want)):
        fn = resolve("adam_step", backend, "cpu", np.float32)
        fn(*ops[:6], n_threads=2, masks=prob.masks, formats=formats, shadow=ops[6], **h)
    assert_same(got, want, "adam_step")


_ADAM_BF16 = Config("bfloat16", "param", "float32", False, True, True, False, 1)


@pytest.mark.parametrize("changes, match", [
    (dict(kernel="scaled_apply"), "not an elementwise kernel"),
    (dict(kernel="adafactor_vector"), "not an elementwise kernel"),
    (dict(n_aux=1), "not an elementwise kernel"),
    (dict(storage=(1,) * 5), "float32"),
    (dict(storage=(2, 2, 2, 0, 5)), "no storage format"),
    (dict(storage=(2, 2, 2, 0)), "storage format per operand"),
    (dict(storage=(2, 2, 0, 0, 0)), "elements of 4 bytes"),
    (dict(storage=(2, 2, 2, 0, 2)), "elements of 2 bytes"),
    (dict(keys=np.zeros((1, 2), np.uint32)), "keys"),
    (dict(shadow=True), "takes 5 operands, got 4"),
    (dict(shadow=True, storage=(2, 2, 2, 0, 0, 0), shadow_type="float32"),
     "the shadow: expected bfloat16 or float16"),
    (dict(kernel="adafactor_factored", storage=(0,) * 7), "not an elementwise kernel"),
], ids=repr)
def test_refused(changes, match):
    """What the chunks could not run (or not safely) is refused before anything is
    written."""
    prob = problem("adam", _ADAM_BF16, (5, 9), seed=0)
    changes = dict(changes)
    kernel, n_aux = changes.pop("kernel", "adam"), changes.pop("n_aux", 0)
    operands = prob.operands
    if "shadow_type" in changes:
        shadow_type = changes.pop("shadow_type")
        operands += ([np.ones(n, DTYPES[shadow_type]) for n in (5, 9)],)
    before = copy(operands)
    with pytest.raises(ValueError, match=match):
        cy.elementwise(kernel, operands, record("adam", hyper("adam", 1)), 1, n_aux=n_aux,
                       formats=prob.formats._replace(**changes))
    assert_same(operands, before, "refused")
