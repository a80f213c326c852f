"""Bad input: a clear error naming the argument, and nothing written.

Each step-time case first runs two good steps (so state exists), then a bad step whose fault
is in the last parameter, so a wrapper that wrote before checking everything would have
changed the earlier ones.
"""

import copy
import math

import numpy as np
import pytest

import fastopt

OPTIMIZERS = [
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("Adam", dict(lr=0.1, amsgrad=True)),
    ("AdamW", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1)),
    ("RMSprop", dict(lr=0.1, centered=True, momentum=0.9)),
    ("Adadelta", dict()),
    ("Adamax", dict()),
    ("NAdam", dict()),
    ("RAdam", dict()),
    ("Lion", dict()),
    ("Lamb", dict()),
    ("Adafactor", dict()),
]


def make(name, kw, backend="cython"):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in ((3,), (4, 2), (5,))]
    opt = getattr(fastopt, name)(params, backend=backend, **kw)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    return opt, params


def snapshot(opt, params):
    return [p.copy() for p in params], copy.deepcopy(opt.state)


def assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for p, q in zip(params, before_params):
        np.testing.assert_array_equal(p, q)
    assert opt.state.keys() == before_state.keys()
    for i, st in before_state.items():
        assert opt.state[i].keys() == st.keys()
        for key, value in st.items():
            np.testing.assert_array_equal(opt.state[i][key], value)


def good_grads(params):
    return [np.ones_like(p) for p in params]


STEP_CASES = {
    "too few grads": (lambda ps: good_grads(ps)[:2], ValueError, r"grads: expected 3 arrays"),
    "too many grads": (lambda ps: good_grads(ps) + [np.ones(1, np.float32)], ValueError,
                       r"grads: expected 3 arrays.*got 4"),
    "grads not a list": (lambda ps: np.ones(3, np.float32), TypeError, r"grads: expected a list"),
    "grad not an array": (lambda ps: good_grads(ps)[:2] + [[1.0] * 5], TypeError,
                          r"grads\[2\]: expected an array"),
    "shape mismatch": (lambda ps: good_grads(ps)[:2] + [np.ones(6, np.float32)], ValueError,
                       r"grads\[2\]: shape \(6,\) does not match params\[2\] shape \(5,\)"),
    "dtype mismatch": (lambda ps: good_grads(ps)[:2] + [np.ones(5, np.float64)], TypeError,
                       r"grads\[2\]: dtype float64 does not match params\[2\] dtype float32"),
    "integer grad": (lambda ps: good_grads(ps)[:2] + [np.ones(5, np.int32)], TypeError,
                     r"grads\[2\]: dtype int32 is not supported"),
    "complex grad": (lambda ps: good_grads(ps)[:2] + [np.ones(5, np.complex64)], TypeError,
                     r"grads\[2\]: dtype complex64 is not supported"),
    "float16 grad": (lambda ps: good_grads(ps)[:2] + [np.ones(5, np.float16)], TypeError,
                     r"grads\[2\]: dtype float16 is not supported"),
}


@pytest.mark.parametrize("case", STEP_CASES, ids=list(STEP_CASES))
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_bad_grads(name, kw, case):
    opt, params = make(name, kw)
    snap = snapshot(opt, params)
    grads_of, exc, message = STEP_CASES[case]
    with pytest.raises(exc, match=message):
        opt.step(grads_of(params))
    assert_unchanged(opt, params, snap)


def test_mixed_frameworks():
    torch = pytest.importorskip("torch")
    opt, params = make("Adam", dict(lr=0.1))
    snap = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"grads\[2\] is a torch array but params\[0\] is a numpy"):
        opt.step(good_grads(params)[:2] + [torch.ones(5)])
    assert_unchanged(opt, params, snap)
    p = [np.zeros(2, np.float32), torch.zeros(2)]
    with pytest.raises(TypeError, match=r"params\[1\] is a torch array but params\[0\] is a numpy"):
        fastopt.SGD(p, lr=0.1).step([np.ones(2, np.float32), torch.ones(2)])
    assert p[0].tolist() == [0, 0]


def test_read_only_and_non_contiguous_params():
    opt, params = make("SGD", dict(lr=0.1, momentum=0.9))
    snap = snapshot(opt, params)
    params[2].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[2\]: array is read-only"):
        opt.step(good_grads(params))
    params[2].flags.writeable = True
    assert_unchanged(opt, params, snap)

    base = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"params\[1\]: array is not C-contiguous"):
        fastopt.SGD([np.zeros(2, np.float32), base[:, 1]], lr=0.1).step(
            [np.ones(2, np.float32), np.ones(4, np.float32)])
    assert not base.any()


def test_torch_param_that_requires_grad():
    torch = pytest.importorskip("torch")
    w = torch.zeros(3, requires_grad=True)
    opt = fastopt.SGD([torch.zeros(2), w], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\]: torch tensor requires grad; pass p.detach\(\)"):
        opt.step([torch.ones(2), torch.ones(3)])
    assert opt.params()[0].tolist() == [0, 0]


def test_torch_non_contiguous_param():
    torch = pytest.importorskip("torch")
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"params\[0\]: torch tensor is not contiguous"):
        fastopt.Adam([w.t()]).step([torch.ones(4, 4)])
    assert not w.any()


HYPER_CASES = [
    ("SGD", dict(lr=-0.1), ValueError, r"lr must be a finite number in \[0, inf\], got -0.1"),
    ("SGD", dict(lr=math.nan), ValueError, r"lr must be a finite number .* got nan"),
    ("SGD", dict(lr=math.inf), ValueError, r"lr must be a finite number .* got inf"),
    ("SGD", dict(lr="0.1"), TypeError, r"lr must be a real number"),
    ("SGD", dict(momentum=-0.5), ValueError, r"momentum must be"),
    ("SGD", dict(dampening=1.5, momentum=0.9), ValueError, r"dampening must be .* \[0, 1\]"),
    ("SGD", dict(weight_decay=-1e-4), ValueError, r"weight_decay must be"),
    ("SGD", dict(nesterov=True, momentum=0.0), ValueError, r"nesterov=True needs momentum > 0 and dampening = 0"),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, r"nesterov=True needs"),
    ("SGD", dict(maximize=1), TypeError, r"maximize must be True or False"),
    ("Adam", dict(lr=-1.0), ValueError, r"lr must be"),
    ("Adam", dict(eps=-1e-8), ValueError, r"eps must be"),
    ("Adam", dict(eps=math.nan), ValueError, r"eps must be"),
    ("Adam", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be a finite number in \[0, 1\), got 1.0"),
    ("Adam", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be"),
    ("Adam", dict(betas=(0.9, math.nan)), ValueError, r"betas\[1\] must be"),
    ("Adam", dict(betas=0.9), ValueError, r"betas must be a pair"),
    ("Adam", dict(amsgrad="yes"), TypeError, r"amsgrad must be True or False"),
    ("AdamW", dict(weight_decay=-0.01), ValueError, r"weight_decay must be"),
    ("Adagrad", dict(lr_decay=-0.1), ValueError, r"lr_decay must be"),
    ("Adagrad", dict(initial_accumulator_value=-1.0), ValueError, r"initial_accumulator_value must be"),
    ("Adagrad", dict(eps=math.inf), ValueError, r"eps must be"),
    ("RMSprop", dict(alpha=1.5), ValueError, r"alpha must be a finite number in \[0, 1\]"),
    ("RMSprop", dict(momentum=-0.9), ValueError, r"momentum must be"),
    ("RMSprop", dict(centered=None), TypeError, r"centered must be True or False"),
    ("Adadelta", dict(rho=-0.1), ValueError, r"rho must be"),
    ("Adadelta", dict(lr=math.nan), ValueError, r"lr must be"),
    ("Adamax", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be"),
    ("NAdam", dict(momentum_decay=-4e-3), ValueError, r"momentum_decay must be"),
    ("NAdam", dict(decoupled_weight_decay="no"), TypeError, r"decoupled_weight_decay must be True or False"),
    ("RAdam", dict(eps=-1.0), ValueError, r"eps must be"),
    ("Lion", dict(betas=(1.1, 0.99)), ValueError, r"betas\[0\] must be a finite number in \[0, 1\]"),
    ("Lion", dict(weight_decay=-1.0), ValueError, r"weight_decay must be"),
    ("Lamb", dict(eps=-1e-6), ValueError, r"eps must be"),
    ("Lamb", dict(betas=(0.9,)), ValueError, r"betas must be a pair"),
    ("Adafactor", dict(beta2_decay=0.5), ValueError, r"beta2_decay must be"),
    ("Adafactor", dict(eps=(None, -1.0)), ValueError, r"eps\[1\] must be"),
    ("Adafactor", dict(eps=(-1e-3, 1e-3)), ValueError, r"eps\[0\] must be"),
    ("Adafactor", dict(eps=1e-3), ValueError, r"eps must be a pair"),
    ("Adafactor", dict(d=0.5), ValueError, r"d must be"),
    ("Adafactor", dict(lr=float("nan")), ValueError, r"lr must be"),
]


@pytest.mark.parametrize("name,kw,exc,message", HYPER_CASES)
def test_bad_hyperparameters_at_construction(name, kw, exc, message):
    with pytest.raises(exc, match=r"param_groups\[0\]: " + message):
        getattr(fastopt, name)([np.zeros(2)], **kw)


@pytest.mark.parametrize("name,kw,exc,message", HYPER_CASES)
def test_bad_hyperparameters_set_later(name, kw, exc, message):
    """A group changed after construction is checked before the step writes anything."""
    opt, params = make(name, dict(OPTIMIZERS[[o[0] for o in OPTIMIZERS].index(name)][1]))
    opt.add_param_group({"params": [np.zeros(3, np.float32)]})
    snap = snapshot(opt, params)
    opt.param_groups[1].update(kw)
    with pytest.raises(exc, match=r"param_groups\[1\]: " + message):
        opt.step(good_grads(params) + [np.ones(3, np.float32)])
    assert_unchanged(opt, params, snap)


def test_bad_construction():
    w = np.zeros(3)
    with pytest.raises(TypeError, match="got a single array; wrap it in a list"):
        fastopt.SGD(w, lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        fastopt.Adam([])
    with pytest.raises(ValueError, match="appear more than once"):
        fastopt.Adam([w, w])
    with pytest.raises(ValueError, match="appear more than once"):
        fastopt.Adam([{"params": [w]}, {"params": [w]}])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\]: expected an array, got float"):
        fastopt.Adam([w, 1.0])
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastopt.Adam([w], backend="fortran")
    with pytest.raises(ValueError, match="n_threads must be an integer >= 1"):
        fastopt.Adam([w], n_threads=0)


def test_unavailable_backend_says_how_to_install(monkeypatch):
    from fastopt import _backends
    monkeypatch.setitem(_backends.BACKENDS, "numba", _backends.BACKENDS["numba"].__class__(
        **{**_backends.BACKENDS["numba"].__dict__, "module": "fastopt._backends._missing"}))
    _backends.load.cache_clear()
    _backends._resolve.cache_clear()
    try:
        w = np.zeros(3)
        opt = fastopt.SGD([w], lr=0.1, backend="numba")
        with pytest.raises(RuntimeError, match=r"backend 'numba' is not available .*pip install 'fastopt\[numba\]'"):
            opt.step([np.ones(3)])
        assert not w.any()
    finally:
        _backends.load.cache_clear()
        _backends._resolve.cache_clear()


def test_zero_dim_array_hyperparameters_are_accepted():
    torch = pytest.importorskip("torch")
    w = np.ones(2)
    opt = fastopt.Adam([w], lr=torch.tensor(0.1), betas=(np.array(0.9), 0.999))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and isinstance(opt.param_groups[0]["lr"], float)
    opt.step([np.ones(2)])
    np.testing.assert_allclose(w, 0.9)
    with pytest.raises(TypeError, match="lr must be a real number"):
        fastopt.Adam([w], lr=np.array([0.1, 0.2]))
