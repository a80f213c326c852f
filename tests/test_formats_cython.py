"""Storage formats on the Cython backend (kernels/cpu/format_loops.h): bfloat16, float16 and
float32 parameters, gradients and state, and blockwise 8-bit state, around the float32
kernels, converted inside each chunk, must give the same bits as
fastopt._backends._formats.around (whole arrays loaded, the float32 NumPy reference run,
the written ones stored back rounded or quantized).

Every elementwise kernel of the rule table runs a few storage combinations (rotated over
the kernels so that each combination meets several kernels): params, grads and state in
each format, master weights with a low-precision shadow, stochastic and nearest rounding,
in place and out of place, with and without pruning masks, on 1 and 2 threads, over
several steps, on tensors of odd sizes; then NaN, inf, float16 subnormals and values out of
float16's range. 8-bit state (codes and block scales carried from step to step) meets every
kernel with state in the same way, alone and beside other state formats, and its
quantizer's lookup gives the binary search's code next to every step of the code.
"""

import functools
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
    STEPS,
    assert_same,
    copy,
    quantized,
    record,
    state_format,
    values,
)

from fastopt import _rules
from fastopt._backends import _formats, resolve

cy = pytest.importorskip("fastopt._backends._cython.optim")


class Config(NamedTuple):
    param: str            # the parameter's storage (the shadow's, with master weights)
    grad: str             # "param" (the parameter's format) or a format
    state: str            # a format (or Q8), or several, comma-separated, for state 0, 1, ...
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
Q8_CONFIGS = (
    Config("float32", "param", Q8, False, False, True, False, 2),
    Config("bfloat16", "param", Q8, True, True, True, True, 2),
    Config("bfloat16", "param", f"{Q8},bfloat16", False, True, True, False, 1),
    Config("float32", "param", Q8, False, True, False, True, 1),
    Config("float16", "param", Q8, True, False, False, False, 2),
    Config("bfloat16", "param", Q8, False, True, True, True, 2),
    Config("float32", "float16", f"bfloat16,{Q8}", False, False, True, True, 2),
    Config("float16", "float32", f"{Q8},float32", True, True, False, True, 1),
)


def _compiled(kernel, operands, record_, masks):
    cy.elementwise(kernel, operands, record_, 1, masks=masks)


def reference(kernel, hyper_, numpy=True):
    """The float32 reference step (format_cases.reference), the Cython kernel where the
    rule has no NumPy reference of its own."""
    return format_cases.reference(kernel, hyper_, _compiled, numpy)


def problem(kernel, config, sizes, seed, special=0.0):
    """format_cases.problem with the configuration's placement and masks."""
    return format_cases.problem(kernel, config, sizes, seed, config.in_place, config.masks,
                                special)


def run_both(kernel, config, sizes, seed, special=0.0):
    """Steps of `kernel` on the Cython backend and through _formats.around over the
    reference, from equal operands and block scales (fresh gradients each step; out of
    place, the result becomes the next step's input): equal after every step. With special
    values (this fraction of them), the reference's NaN may have the other sign (the float32
    C loops and the NumPy reference order a NaN's operations differently), and the bits are
    held to around over the float32 C kernel as well. Returns the Cython run's operands and
    block scales."""
    prob = problem(kernel, config, sizes, seed, special)
    # got, want (, want in C): (operands, block scales)
    runs = [(copy(prob.operands), copy(prob.formats.scales)) for _ in range(2 + bool(special))]
    g_type = prob.operands[2][0].dtype
    rng = np.random.default_rng(seed + 1)
    for step in STEPS:
        h = kernel_hyper(kernel, step)
        grads = [values(rng, n, g_type, special=special) for n in sizes]
        runs = [(ops[:2] + ([g.copy() for g in grads],) + ops[3:], scales)
                for ops, scales in runs]
        for i, (ops, scales) in enumerate(runs):
            formats = prob.formats._replace(step=step, scales=scales)
            if i == 0:
                cy.elementwise(kernel, ops, record(kernel, h), config.n_threads,
                               masks=prob.masks, formats=formats)
            else:
                _formats.around(reference(kernel, h, numpy=i == 1), ops, formats,
                                masks=prob.masks)
        what = f"{kernel} {config} step {step}"
        got = runs[0][0] + runs[0][1]
        assert_same(got, runs[1][0] + runs[1][1], what, nan_sign=not special)
        if special:
            assert_same(got, runs[2][0] + runs[2][1], f"{what} (C float32 kernel)")
        if not config.in_place:
            runs = [((ops[1], ops[0]) + ops[2:], scales) for ops, scales in runs]
    return runs[0]


def _grid():
    cases = []
    for i, kernel in enumerate(sorted(RULE_OF)):
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
    run_both(kernel, config, SIZES, seed=sorted(RULE_OF).index(kernel))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("kernel", sorted(RULE_OF))
@pytest.mark.parametrize("config", [
    Config("float16", "param", "float16", False, True, True, True, 1),
    Config("bfloat16", "float32", "bfloat16", False, False, False, False, 1),
    Config("float16", "float32", "float32", True, False, True, False, 1),
], ids=str)
def test_special_values(kernel, config):
    """NaN (either sign), inf, zeros of either sign, float16 subnormals, float32 values
    below float16's range and beyond it, in every operand."""
    run_both(kernel, config, (1, 9, 1100), seed=7, special=0.2)


def test_master_weights_shadow_is_the_rounded_parameter():
    prob = problem("adam", CONFIGS[6], (1100,), seed=3)
    h = kernel_hyper("adam", 1)
    cy.elementwise("adam", prob.operands, record("adam", h), 1, masks=prob.masks,
                   formats=prob.formats._replace(step=1))
    params, shadow = prob.operands[0][0], prob.operands[-1][0]
    assert shadow.dtype == DTYPES["bfloat16"] and params.dtype == np.float32
    # stochastic rounding: each value is one of the two bfloat16 neighbours
    down = params.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    bits = shadow.view(np.uint16).astype(np.uint32) << np.uint32(16)
    assert np.all((bits == down) | (bits == down + np.uint32(0x10000)))
    assert np.all(params[prob.masks[0] == 0] == 0)


def _q8_grid():
    """For each kernel with state, the two configs of Q8_CONFIGS that waited longest among
    those that leave it 8-bit state."""
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
    assert cy._optim.Q8_BLOCK == _formats.BLOCK
    counts = {config: 0 for config in Q8_CONFIGS}
    for case in _q8_grid():
        counts[case.values[1]] += 1
    assert min(counts.values()) >= 3


@pytest.mark.parametrize("kernel,config", _q8_grid())
def test_q8_state_matches_around_the_reference(kernel, config):
    """8-bit state, codes and block scales, over several steps; the pruned entries' codes
    are the map's 0 (127 in the signed map, 0 in the unsigned one)."""
    seed = sorted(RULE_OF).index(kernel)
    operands, scales = run_both(kernel, config, Q8_SIZES, seed)
    if config.masks:
        masks = problem(kernel, config, Q8_SIZES, seed).masks
        states = [(name, arrays) for name, arrays in zip(_rules.KERNELS[kernel].state,
                                                         operands[3:])
                  if arrays[0].dtype == np.uint8]
        assert states
        for name, arrays in states:
            zero = 127 if name in _rules.SIGNED_STATE else 0
            for codes, mask in zip(arrays, masks):
                assert np.all(codes[mask == 0] == zero), name


@pytest.mark.parametrize("kernel,config", _q8_grid()[::4])
def test_q8_portable_loops(kernel, config, monkeypatch):
    """Where 8-bit state is loaded with AVX-512 VBMI byte permutes and quantized with
    AVX-512 gathers (_optim.VBMI), the portable loops give the same bits."""
    if not cy._optim.VBMI:
        pytest.skip("no AVX-512 VBMI: the tests above ran the portable loops")
    monkeypatch.setattr(cy._optim, "step_formats",
                        functools.partial(cy._optim.step_formats, vbmi=False))
    run_both(kernel, config, Q8_SIZES, seed=3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and inf in the reference
@pytest.mark.parametrize("kernel", ["adam_amsgrad", "rmsprop_centered_momentum", "lion"])
def test_q8_special_values(kernel):
    """NaN and inf in a few blocks (every block with one becomes NaN, or holds NaN and
    zeros where inf is its absmax), beside blocks without them."""
    config = Config("bfloat16", "param", f"{Q8},{Q8},bfloat16", True, True, True, True, 2)
    run_both(kernel, config, (1, 255, 257, 1100, 4096, 70000), seed=5, special=0.002)


def _q8_codes(q, code):
    """The codes of values `q` in [-1, 1] in map `code` (_formats.q8_store, each value in a
    block whose absmax is 1)."""
    x = np.column_stack([np.ones(q.size, np.float32), q]).reshape(-1)
    codes, absmax = quantized([x], code)
    assert np.all(absmax[0] == 1)
    return codes[0][1::2]


def _key(x):
    """float32 -> int64, in the floats' order"""
    b = x.view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _float(key):
    return np.where(key < 0, -key | 0x80000000, key).astype(np.uint32).view(np.float32)


def _steps(code):
    """The 255 smallest values in [-1, 1] with code k (the search's code steps there)."""
    k = np.arange(1, 256)
    lo = np.full(k.size, _key(np.float32([-1.0]))[0])  # code 0
    hi = np.full(k.size, _key(np.float32([1.0]))[0])   # code 255
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        up = _q8_codes(_float(mid), code) >= k
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    return hi


@pytest.mark.parametrize("code", [_formats.Q8S, _formats.Q8U])
def test_q8_codes_next_to_every_code_step(code):
    """The quantizer's lookup on a float's bits gives the binary search's codes 3 floats on
    either side of every step of the code, and on values spread over every binade (either
    sign, in either map): the gradients as SGD's first momentum buffer (no clipping, no
    scaling, no weight decay), in blocks whose absmax is 1; then blocks of zeros and of
    values below the least absmax (1e-12)."""
    rng = np.random.default_rng(2)
    near = _float((_steps(code)[:, None] + np.arange(-3, 4)).reshape(-1))
    spread = (rng.choice([-1, 1], 20000) * np.exp2(rng.uniform(-40, 0, 20000))
              ).astype(np.float32)
    q = np.concatenate([near, spread, np.float32([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0])])
    tiny = rng.standard_normal(300).astype(np.float32) * np.float32(1e-13)
    grads = [np.concatenate([np.column_stack([np.ones(q.size, np.float32), q]).reshape(-1),
                             np.zeros(512, np.float32), tiny])]
    n = grads[0].size
    params = [np.zeros(n, np.float32)]
    codes, absmax = quantized([np.zeros(n, np.float32)], code)
    operands = (params, params, grads, codes)
    formats = _formats.Formats((0, 0, 0, code), False, 1, np.zeros((1, 2), np.uint32),
                               scales=(absmax,))
    h = dict(kernel_hyper("sgd_momentum", 1), grad_scale=1.0, weight_decay=0.0)
    want = copy(operands), copy(formats.scales)
    cy.elementwise("sgd_momentum", operands, record("sgd_momentum", h), 2, formats=formats)
    _formats.around(reference("sgd_momentum", h), want[0], formats._replace(scales=want[1]))
    assert_same(operands + formats.scales, want[0] + want[1], "codes")
    assert np.array_equal(codes[0][1:2 * q.size:2], _q8_codes(q, code))
    assert np.float32(1e-12) in absmax[0]


def test_q8_table_refuses_other_maps():
    signed = _formats.QMAPS[_formats.Q8S]
    assert np.array_equal(cy._optim.q8_table(signed), cy._QTABLES[0])
    for qmap in (signed[::-1].copy(), np.float32(1) - np.arange(256, dtype=np.float32) * 1e-7):
        with pytest.raises(ValueError, match="qmap: expected increasing values"):
            cy._optim.q8_table(qmap)
    with pytest.raises(ValueError, match="qmap: expected 256 values"):
        cy._optim.q8_table(signed[:255])


@pytest.mark.parametrize("config", [CONFIGS[6], Q8_CONFIGS[1], Q8_CONFIGS[2]], ids=str)
def test_through_the_generic_step(config):
    """_steps.rule_step hands formats to the backend's elementwise (FORMATS): the Cython
    Adam step equals the NumPy one, which runs through _formats.around."""
    assert cy.FORMATS == {_formats.F32, _formats.BF16, _formats.F16, _formats.Q8S,
                          _formats.Q8U}
    prob = problem("adam_amsgrad", config, SIZES, seed=11)
    got, want = copy(prob.operands), copy(prob.operands)
    got_scales, want_scales = copy(prob.formats.scales), copy(prob.formats.scales)
    h = kernel_hyper("adam_amsgrad", 2)
    for backend, ops, scales in (("cython", got, got_scales), ("numpy", want, want_scales)):
        fn = resolve("adam_step", backend, "cpu", np.float32)
        shadow = ops[6] if config.master else None
        fn(*ops[:6], n_threads=2, masks=prob.masks, shadow=shadow,
           formats=prob.formats._replace(step=2, scales=scales), **h)
    assert_same(got + got_scales, want + want_scales, "adam_step")


_ADAM_BF16 = Config("bfloat16", "param", "float32", False, True, True, False, 1)


@pytest.mark.parametrize("changes, match", [
    (dict(kernel="scaled_apply"), "not an elementwise kernel"),
    (dict(kernel="adafactor_vector"), "not an elementwise kernel"),
    (dict(n_aux=1), "not an elementwise kernel"),
    (dict(storage=(1,) * 5), "float32"),
    (dict(storage=(2, 2, 2, 0, 6)), "no storage format"),
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
        cy.elementwise(kernel, operands, record("adam", kernel_hyper("adam", 1)), 1,
                       n_aux=n_aux, formats=prob.formats._replace(**changes))
    assert_same(operands, before, "refused")


_Q8_MASTER = Config("bfloat16", "param", Q8, True, True, True, False, 1)


@pytest.mark.parametrize("changes, match", [
    (dict(storage=(0, 0, 2, 4, 5, 4)), "operand 5: 8-bit storage is for state only"),
    (dict(storage=(4, 0, 2, 4, 5, 2)), "operand 0: 8-bit storage is for state only"),
    (dict(storage=(0, 0, 4, 4, 5, 2)), "operand 2: 8-bit storage is for state only"),
    (dict(scales=()), "scales: expected block scales for each of the 2 8-bit operands"),
    (dict(scales="first"), "scales: expected block scales for each of the 2 8-bit operands"),
    (dict(storage=(0, 0, 2, 4, 2, 2), scales="first"), "elements of 2 bytes"),
    (dict(scales="short"), "array of 2 block scales of 4 bytes"),
    (dict(scales="float64"), "array of 1 block scales of 4 bytes"),
], ids=repr)
def test_q8_refused(changes, match):
    prob = problem("adam", _Q8_MASTER, (5, 300), seed=0)
    changes = dict(changes)
    scales = prob.formats.scales
    changes["scales"] = {
        "first": scales[:1],
        "short": (scales[0], [a[:1] for a in scales[1]]),
        "float64": ([a.astype(np.float64) for a in scales[0]], scales[1]),
    }.get(changes.get("scales"), changes.get("scales", scales))
    before = copy(prob.operands), copy(scales)
    with pytest.raises(ValueError, match=match):
        cy.elementwise("adam", prob.operands, record("adam", kernel_hyper("adam", 1)), 1,
                       formats=prob.formats._replace(**changes))
    assert_same(prob.operands + scales, before[0] + before[1], "refused")
