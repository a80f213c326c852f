"""Resumable state: state_dict / load_state_dict, fastopt.save / fastopt.load; each rule's
state keys. The rules, their configs and state keys come from tests/cases.py."""

import copy

import numpy as np
import pytest
from cases import CASES, config_id, configs, shaped, spread, tiered
from conftest import CPU_BACKENDS, require_backend
from test_optim_parity import gradients

import fastopt

SIZES = (5, (33, 31), (40, 1000))  # Adafactor factors the matrices


def grads_at(step, dtype, name=None):
    return gradients(np.random.default_rng(1000 + step), shaped(name, SIZES), dtype)


def start(name, kw, backend, dtype=np.float32):
    """Two groups, the second at half the first's learning rate."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(n).astype(dtype) for n in shaped(name, SIZES)]
    opt = getattr(fastopt, name)([{"params": params[:2]}, {"params": params[2:]}],
                                 backend=backend, **kw)
    opt.param_groups[1].update(CASES[name].second_group(kw))
    return params, opt


def _resume_grid():
    """Fast: every config, resumed on one backend, each rule on every backend."""
    rows = [dict(case=case, kw=kw, config=config_id(case.name, kw), rule=case.name)
            for case, kw in configs()]
    fast = spread(rows, "backend", CPU_BACKENDS, against=["rule"])
    full = [dict(row, backend=backend) for row in rows for backend in CPU_BACKENDS]
    return tiered(full, fast, ["case", "kw", "backend"], lambda r: f"{r['backend']}-{r['config']}")


@pytest.mark.parametrize("case,kw,resume_backend", _resume_grid())
def test_resume_is_bit_identical(case, kw, resume_backend, tmp_path):
    """Save after k steps, resume on another backend: the same trajectory as unbroken."""
    require_backend(resume_backend)
    name = case.name
    k, total = 7, 15
    ref_params, ref = start(name, kw, "cython")
    for step in range(total):
        ref.step(grads_at(step, np.float32, name))

    params, opt = start(name, kw, "cython")
    for step in range(k):
        opt.step(grads_at(step, np.float32, name))
    fastopt.save({"optimizer": opt.state_dict(), "params": params}, tmp_path / "ckpt.npz")
    del opt, params

    ckpt = fastopt.load(tmp_path / "ckpt.npz")
    params = [p.copy() for p in ckpt["params"]]
    _, opt = start(name, kw, resume_backend)
    opt.param_groups[0]["params"][:] = params[:2]
    opt.param_groups[1]["params"][:] = params[2:]
    opt.load_state_dict(ckpt["optimizer"])
    for step in range(k, total):
        opt.step(grads_at(step, np.float32, name))
    for got, want in zip(params, ref_params):
        np.testing.assert_array_equal(got, want)


KEY_SHAPES = ((), (5,), (4, 3), (2, 3, 4))


@pytest.mark.parametrize("case,kw", [pytest.param(c, kw, id=config_id(c.name, kw))
                                     for c, kw in configs()])
def test_state_keys(case, kw):
    """After a step, each parameter's state holds exactly the case's keys for this config
    and shape, in opt.state and in state_dict() (which may leave out a parameter without
    state); nothing exists before the first step."""
    rng = np.random.default_rng(0)
    shapes = case.shaped(KEY_SHAPES)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = getattr(fastopt, case.name)(params, backend="cython", **kw)
    assert not any(opt.state.values())
    opt.step([rng.standard_normal(s).astype(np.float32) for s in shapes])
    sd = opt.state_dict()
    for i, shape in enumerate(shapes):
        want = case.state_keys(kw, shape)
        assert set(opt.state.get(i, {})) == want, (i, shape)
        assert set(sd["state"].get(i, {})) == want, (i, shape)


def test_state_dict_structure():
    params, opt = start("Adam", dict(lr=1e-2, amsgrad=True), "cython")
    opt.step(grads_at(0, np.float32))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0, 1] and sd["param_groups"][1]["params"] == [2]
    assert sd["param_groups"][1]["lr"] == 5e-3 and sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(sd["state"]) == {0, 1, 2}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"] == 1


def test_save_load_round_trip(tmp_path):
    obj = {"a": [1, 2.5, float("inf"), None, True, "x"], 3: (np.arange(4.0), {"b": np.float32(2)}),
           "nan": float("nan"), "f64": np.float64(0.1), "0-d": np.array(1.5, np.float32)}
    fastopt.save(obj, tmp_path / "x.npz")
    back = fastopt.load(tmp_path / "x.npz")
    assert back["a"] == [1, 2.5, float("inf"), None, True, "x"]
    # a NumPy float64 (a float subclass) as a float, a 0-d array with its shape
    assert type(back["f64"]) is float and back["f64"] == 0.1
    assert back["0-d"].shape == () and back["0-d"].dtype == np.float32 and back["0-d"] == 1.5
    assert isinstance(back[3], tuple) and back[3][1] == {"b": 2.0}
    np.testing.assert_array_equal(back[3][0], np.arange(4.0))
    assert np.isnan(back["nan"])
    with pytest.raises(TypeError, match="cannot store a set"):
        fastopt.save({"s": {1, 2}}, tmp_path / "y.npz")


def test_load_state_dict_rejects_what_does_not_fit():
    params, opt = start("Adam", dict(lr=1e-2), "cython")
    opt.step(grads_at(0, np.float32))
    good = copy.deepcopy(opt.state_dict())
    opt.step(grads_at(1, np.float32))
    before = copy.deepcopy(opt.state)
    before_groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                   for g in opt.param_groups])

    def broken(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    cases = [
        (broken(lambda sd: sd["param_groups"].pop()), r"has 1 param groups, the optimizer has 2"),
        (broken(lambda sd: sd["param_groups"][0]["params"].pop()), r"holds 1 parameters"),
        (broken(lambda sd: sd["param_groups"][0].update(momentum=0.9)),
         r"unknown keys \['momentum'\]"),
        (broken(lambda sd: sd["param_groups"][1].update(lr=-1.0)), r"lr must be"),
        (broken(lambda sd: sd["state"][1].update(exp_avg=np.zeros(3, np.float32))),
         r"shape \(3,\)"),
        (broken(lambda sd: sd["state"][2].update(
            exp_avg_sq=sd["state"][2]["exp_avg_sq"].astype(np.float64))),
         r"dtype float64 do not fit"),
        (broken(lambda sd: sd["state"][0].update(momentum_buffer=np.zeros(5, np.float32))),
         r"unknown keys \['momentum_buffer'\]"),
        (broken(lambda sd: sd["state"].update({7: {}})), r"no parameter has this index"),
        (broken(lambda sd: sd["state"][0].update(step=-1)), r"expected an integer >= 0"),
        ({"state": {}}, r"expected a dict with keys"),
    ]
    for sd, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
        for i, st in before.items():
            for key, value in st.items():
                np.testing.assert_array_equal(opt.state[i][key], value)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        assert groups == before_groups


def test_state_scalars_are_checked():
    params, opt = start("NAdam", dict(lr=0.01), "cython")
    opt.step(grads_at(0, np.float32))
    sd = copy.deepcopy(opt.state_dict())
    assert isinstance(sd["state"][0]["mu_product"], float)
    sd["state"][0]["mu_product"] = float("nan")
    with pytest.raises(ValueError, match=r"\['mu_product'\]: expected a finite number"):
        opt.load_state_dict(sd)
    lion_params, lion = start("Lion", dict(lr=0.01), "cython")
    lion.step(grads_at(0, np.float32))
    assert set(lion.state_dict()["state"][0]) == {"exp_avg"}
    sd = copy.deepcopy(lion.state_dict())
    sd["state"][0]["step"] = 3
    with pytest.raises(ValueError, match=r"unknown keys \['step'\]"):
        lion.load_state_dict(sd)


def test_adafactor_state_follows_torch_shapes():
    params, opt = start("Adafactor", dict(lr=1e-2), "cython")
    opt.step(grads_at(0, np.float32))
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"step", "variance"}
    assert sd["state"][1]["row_var"].shape == (33, 1)
    assert sd["state"][1]["col_var"].shape == (1, 31)
    bad = copy.deepcopy(sd)
    bad["state"][1]["row_var"] = np.zeros((1, 31), np.float32)
    with pytest.raises(ValueError, match=r"\['row_var'\]: shape \(1, 31\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["row_var"] = np.zeros((5, 1), np.float32)
    with pytest.raises(ValueError, match=r"unknown keys \['row_var'\]"):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)
    opt.step(grads_at(1, np.float32))
    assert opt.state[1]["step"] == 2


def test_loaded_state_is_a_copy():
    params, opt = start("SGD", dict(lr=0.1, momentum=0.9), "cython")
    opt.step(grads_at(0, np.float32))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.state[0]["momentum_buffer"] is not sd["state"][0]["momentum_buffer"]
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"],
                                  sd["state"][0]["momentum_buffer"])


def test_jax_resume():
    jnp = pytest.importorskip("jax.numpy")
    params = [jnp.ones(3), jnp.zeros((2, 2))]
    grads = [jnp.full(3, 0.5), jnp.ones((2, 2))]
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(grads)
    sd = opt.state_dict()
    resumed = fastopt.Adam(opt.params(), lr=0.1)
    resumed.load_state_dict(sd)
    a, b = opt.step(grads), resumed.step(grads)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
