"""Bad input: a clear error naming the argument, and nothing written.

Each step-time case first runs two good steps (so state exists), then a bad step whose fault
is in the last parameter, so a wrapper that wrote before checking everything would have
changed the earlier ones.

The rules, their configs and bad hyperparameters come from tests/cases.py.
"""

import copy
import math
import re

import numpy as np
import pytest
from cases import CASES, config_id, configs, shaped, spread, tiered

import fastopt


def make(name, kw, backend="cython"):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32)
              for s in shaped(name, ((3,), (4, 2), (5,)))]
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


def _last(ps, dtype):
    """Ones shaped like the last parameter, of `dtype`."""
    return np.ones(ps[2].shape, dtype)


# fault -> (grads of the parameters, exception, message: a regular expression, or one made
# from the parameters)
STEP_CASES = {
    "too few grads": (lambda ps: good_grads(ps)[:2], ValueError, r"grads: expected 3 arrays"),
    "too many grads": (lambda ps: good_grads(ps) + [np.ones(1, np.float32)], ValueError,
                       r"grads: expected 3 arrays.*got 4"),
    "grads not a list": (lambda ps: np.ones(3, np.float32), TypeError, r"grads: expected a list"),
    "grad not an array": (lambda ps: good_grads(ps)[:2] + [[1.0] * 5], TypeError,
                          r"grads\[2\]: expected an array"),
    "shape mismatch": (lambda ps: good_grads(ps)[:2] + [np.ones(6, np.float32)], ValueError,
                       lambda ps: r"grads\[2\]: shape \(6,\) does not match params\[2\] "
                                  + re.escape(f"shape {ps[2].shape}")),
    "dtype mismatch": (lambda ps: good_grads(ps)[:2] + [_last(ps, np.float64)], TypeError,
                       r"grads\[2\]: dtype float64 does not match params\[2\] dtype float32"),
    "integer grad": (lambda ps: good_grads(ps)[:2] + [_last(ps, np.int32)], TypeError,
                     r"grads\[2\]: dtype int32 is not supported"),
    "complex grad": (lambda ps: good_grads(ps)[:2] + [_last(ps, np.complex64)], TypeError,
                     r"grads\[2\]: dtype complex64 is not supported"),
    "float16 grad": (lambda ps: good_grads(ps)[:2] + [_last(ps, np.float16)], TypeError,
                     r"grads\[2\]: dtype float16 does not match params\[2\] dtype float32"),
}


def _bad_grads_grid():
    """Fast: every config with one bad-gradient case, every rule with every case."""
    rows = [dict(case=case, kw=kw, config=config_id(case.name, kw), rule=case.name)
            for case, kw in configs()]
    fast = spread(rows, "fault", list(STEP_CASES), against=["rule"])
    full = [dict(row, fault=fault) for row in rows for fault in STEP_CASES]
    return tiered(full, fast, ["case", "kw", "fault"], lambda r: f"{r['config']}-{r['fault']}")


@pytest.mark.parametrize("case,kw,fault", _bad_grads_grid())
def test_bad_grads(case, kw, fault):
    opt, params = make(case.name, kw)
    snap = snapshot(opt, params)
    grads_of, exc, message = STEP_CASES[fault]
    with pytest.raises(exc, match=message(params) if callable(message) else message):
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
    with pytest.raises(TypeError,
                       match=r"params\[1\]: torch tensor requires grad; pass p.detach\(\)"):
        opt.step([torch.ones(2), torch.ones(3)])
    assert opt.params()[0].tolist() == [0, 0]


def test_torch_non_contiguous_param():
    torch = pytest.importorskip("torch")
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"params\[0\]: torch tensor is not contiguous"):
        fastopt.Adam([w.t()]).step([torch.ones(4, 4)])
    assert not w.any()


HYPER_CASES = [pytest.param(case, bad, id=f"{name}-{i}-{config_id('', bad.kwargs)}")
               for name, case in CASES.items() for i, bad in enumerate(case.bad)]


@pytest.mark.parametrize("case,bad", HYPER_CASES)
def test_bad_hyperparameters_at_construction(case, bad):
    with pytest.raises(bad.exc, match=r"param_groups\[0\]: " + bad.match):
        getattr(fastopt, case.name)([np.zeros(2)], **bad.kwargs)


@pytest.mark.parametrize("case,bad", HYPER_CASES)
def test_bad_hyperparameters_set_later(case, bad):
    """A group changed after construction is checked before the step writes anything (the
    rule's config with the most state, all of it left as it was)."""
    opt, params = make(case.name, dict(case.richest))
    extra, = shaped(case.name, [(3,)])
    opt.add_param_group({"params": [np.zeros(extra, np.float32)]})
    snap = snapshot(opt, params)
    opt.param_groups[1].update(bad.kwargs)
    with pytest.raises(bad.exc, match=r"param_groups\[1\]: " + bad.match):
        opt.step(good_grads(params) + [np.ones(extra, np.float32)])
    assert_unchanged(opt, params, snap)


def test_bad_construction():
    w = np.zeros(3)
    with pytest.raises(TypeError, match="clip_lambda must be a function of the step count"):
        fastopt.ADOPT([w], clip_lambda=0.25)  # an optimizer attribute, not a group's
    with pytest.raises(TypeError, match="got a single array; wrap it in a list"):
        fastopt.SGD(w, lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        fastopt.Adam([])
    with pytest.raises(ValueError, match="appear more than once"):
        fastopt.Adam([w, w])
    with pytest.raises(ValueError, match="appear more than once"):
        fastopt.Adam([{"params": [w]}, {"params": [w]}])
    with pytest.raises(TypeError,
                       match=r"param_groups\[0\]\['params'\]\[1\]: expected an array, got float"):
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
        with pytest.raises(RuntimeError, match=r"backend 'numba' is not available "
                                               r".*pip install 'fastopt\[numba\]'"):
            opt.step([np.ones(3)])
        assert not w.any()
    finally:
        _backends.load.cache_clear()
        _backends._resolve.cache_clear()


def test_zero_dim_array_hyperparameters_are_accepted():
    torch = pytest.importorskip("torch")
    w = np.ones(2)
    opt = fastopt.Adam([w], lr=torch.tensor(0.1), betas=(np.array(0.9), 0.999))
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.1) and isinstance(lr, float)
    opt.step([np.ones(2)])
    np.testing.assert_allclose(w, 0.9)
    with pytest.raises(TypeError, match="lr must be a real number"):
        fastopt.Adam([w], lr=np.array([0.1, 0.2]))


@pytest.mark.parametrize("key, value, error, match", [
    ("lr", -1.0, ValueError, r"lr must be a finite number in \[0, inf\], got -1.0"),
    ("lr", True, TypeError, "lr must be a real number, got True"),  # == 1.0
    ("amsgrad", 0, TypeError, "amsgrad must be True or False, got 0"),  # == False
    ("betas", (False, 0.999), TypeError, r"betas\[0\] must be a real number"),  # == (0.0, ..)
    ("betas", (1.5, 0.999), ValueError, r"betas\[0\] must be a finite number in \[0, 1\)"),
    ("eps", math.nan, ValueError, "eps must be a finite number"),
    ("eps", np.array([1e-8, 1e-8]), TypeError, "eps must be a real number"),
])
def test_hyperparameters_changed_between_steps_are_checked(key, value, error, match):
    """A param group is not checked again while its hyperparameters keep their values and
    types; any change, to another value or to an equal one of another type, is checked at
    the next step, which then writes nothing."""
    w = np.ones(3)
    opt = fastopt.Adam([w], lr=1.0, betas=(0.0, 0.999))
    opt.step([np.ones(3)])
    before = w.copy()
    opt.param_groups[0][key] = value
    with pytest.raises(error, match=match):
        opt.step([np.ones(3)])
    np.testing.assert_array_equal(w, before)


def test_muon_checks_parameters_reshaped_between_steps():
    """Muon's group check (matrices only) reads the parameters' shapes: a parameter
    reshaped between steps is checked again though the hyperparameters did not change."""
    m = np.ones((2, 2))
    muon = fastopt.Muon([m])
    muon.step([np.ones((2, 2))])
    m.shape = (4,)
    with pytest.raises(ValueError, match=r"Muon updates matrices \(2-D parameters\), got "
                                         r"shape \(4,\)"):
        muon.step([np.ones(4)])
