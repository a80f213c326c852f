"""fastopt.jax: fastopt's kernels as optax transformations and as a fused in-place step,
checked against optax inside jax.jit: conformance over 200 steps (float32 and float64),
schedules without recompiles, donation without copies, optax's combinators, gradient
clipping, vmap, and the errors."""

import doctest
import functools
import math
import re
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import fastopt  # noqa: E402
import fastopt.jax as fjax  # noqa: E402
from fastopt import _jax_ffi, _rules, _scalars  # noqa: E402

STEPS = 200
# a pytree of several arrays: dict and list nesting and a 0-d leaf
SHAPES = {"w": (8, 5), "b": [(5,), ()], "deep": {"x": (3, 2, 2)}}

# (rule, hyperparameters): optax's and fastopt.jax's factories take the same arguments
CONFIGS = [
    ("adam", dict(learning_rate=1e-2)),
    ("adam", dict(learning_rate=3e-3, b1=0.4, b2=0.9, eps=1e-6)),  # torch's other lerp
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("adamw", dict(learning_rate=1e-3)),
    ("sgd", dict(learning_rate=1e-2)),
    ("sgd", dict(learning_rate=1e-2, momentum=0.9)),
    ("sgd", dict(learning_rate=1e-2, momentum=0.8, nesterov=True)),
    ("lion", dict(learning_rate=1e-3)),
    ("lion", dict(learning_rate=1e-2, b1=0.5, b2=0.9, weight_decay=0.1)),
    ("adamax", dict(learning_rate=1e-2)),
    ("adamax", dict(learning_rate=2e-3, b1=0.4, b2=0.9, eps=1e-3)),  # torch's other lerp
    ("adadelta", dict(learning_rate=1.0)),
    ("adadelta", dict(learning_rate=0.5, rho=0.5, eps=1e-4, weight_decay=0.1)),
    ("adopt", dict(learning_rate=1e-2)),
    ("adopt", dict(learning_rate=1e-3, b1=0.4, b2=0.99, eps=1e-4, use_clipping=False)),
    ("adopt", dict(learning_rate=1e-3, clip_value_fn=lambda count: 0.1 + count / 50)),
    ("ademamix", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("ademamix", dict(learning_rate=1e-3, b1=0.4, b2=0.9, alpha=2.0, eps=1e-6)),
    # optax's warmups of b3 and alpha: schedules of the count
    ("ademamix", dict(learning_rate=1e-2, b3=optax.linear_schedule(0.9, 0.999, 100),
                      alpha=optax.linear_schedule(0.0, 5.0, 100))),
    ("lamb", dict(learning_rate=1e-2)),
    ("lamb", dict(learning_rate=optax.cosine_decay_schedule(1e-2, 200), b1=0.5, b2=0.9,
                  eps=1e-4, weight_decay=0.1)),
    # a float32 schedule under x64: the step's coefficients computed in float64 from it
    ("adamw", dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 150), weight_decay=0.1)),
    # optax's Nesterov Adam, on the NAdam kernel
    ("adam", dict(learning_rate=1e-2, nesterov=True)),
    ("nadam", dict(learning_rate=3e-3, b1=0.4, b2=0.9, eps=1e-6)),
    ("nadamw", dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 150), weight_decay=0.1)),
    # optax's RAdam: eps after the bias correction, its threshold (both sides of it)
    ("radam", dict(learning_rate=1e-2)),
    ("radam", dict(learning_rate=1e-3, b1=0.4, b2=0.99, eps=1e-4, threshold=6.0)),
    # optax's Adagrad and RMSprop: eps under the square root, RMSprop's trace after lr
    ("adagrad", dict(learning_rate=0.1)),
    ("adagrad", dict(learning_rate=optax.cosine_decay_schedule(0.1, 200),
                     initial_accumulator_value=0.0, eps=1e-6)),
    ("rmsprop", dict(learning_rate=1e-2)),
    ("rmsprop", dict(learning_rate=optax.cosine_decay_schedule(1e-2, 200), decay=0.99,
                     centered=True, momentum=0.9, initial_scale=0.1)),
    ("rmsprop", dict(learning_rate=1e-2, decay=0.3, eps=1e-4, eps_in_sqrt=False,
                     momentum=0.5)),
    ("rmsprop", dict(learning_rate=1e-2, centered=True, eps_in_sqrt=False)),
    # optax's weight-decay masks: a prefix tree of bools, a function of the parameters
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1,
                   mask={"w": True, "b": [False, True], "deep": False})),
    ("nadamw", dict(learning_rate=1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(
        lambda x: x.ndim > 1, p))),
    ("lion", dict(learning_rate=1e-3, weight_decay=0.5, mask={"w": False, "b": True,
                                                               "deep": True})),
    ("lamb", dict(learning_rate=1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(
        lambda x: x.ndim != 1, p))),
    ("adadelta", dict(learning_rate=0.5, weight_decay=0.1,
                      weight_decay_mask={"w": True, "b": False, "deep": {"x": False}})),
    ("ademamix", dict(learning_rate=1e-2, weight_decay=0.1,
                      mask={"w": False, "b": True, "deep": True})),
]
CONFIG_IDS = [f"{name}-{k}" for k, (name, _) in enumerate(CONFIGS)]
# fastopt's state names -> those of optax's transformation that keeps them
OPTAX_NAMES = {"exp_avg": "mu", "exp_avg_sq": "nu", "momentum_buffer": "trace",
               "exp_inf": "nu", "square_avg": "e_g", "acc_delta": "e_x", "exp_avg_fast": "m1",
               "exp_avg_slow": "m2", "sum": "sum_of_squares"}
OPTAX_RULE_NAMES = {"rmsprop": {"square_avg": "nu", "grad_avg": "mu"}}


def _optax(name):
    """optax's rule of that name (adopt and ademamix are in optax.contrib)."""
    return getattr(optax, name, None) or getattr(optax.contrib, name)


def _optax_run(name, hyper, params, grads, dtype):
    """(params, state) after optax's `name` with `hyper` ran `grads`. ADOPT's float32 run is
    made in float64 and rounded: optax computes its 1 - b2 in float32 (b2 is a traced
    jnp.where), 1.7e-4 off for b2 = 0.9999, and the second moment with it; the kernel
    takes 1 - b2 rounded once, as for every rule."""
    if name != "adopt" or dtype != "float32":
        return _run_update(_optax(name)(**hyper), params, grads)
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, grads))
        out = _run_update(_optax(name)(**hyper), *wide)
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, out)


def _optax_state(state, field):
    """The array tree that optax's chain state `state` keeps under `field`."""
    return next(getattr(s, field) for s in state if hasattr(s, field))


def _tree(shapes, rng, dtype, lead=()):
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(lead + s), dtype), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _case(dtype, seed=0, steps=STEPS):
    """Parameters and `steps` gradients (stacked on a leading axis) of SHAPES."""
    rng = np.random.default_rng(seed)
    return _tree(SHAPES, rng, dtype), _tree(SHAPES, rng, dtype, (steps,))


def _run_update(tx, params, grads):
    """`len(grads)` jitted steps through optax's interface: update, then apply_updates."""
    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
    return jax.jit(lambda p, gs: jax.lax.scan(body, (p, tx.init(p)), gs)[0])(params, grads)


def _run_step(tx, params, grads, state=None):
    """The same through fastopt's fused step (from `state`, default init's)."""
    def body(carry, g):
        p, s = carry
        return tx.step(p, g, s), None
    state = tx.init(params) if state is None else state
    return jax.jit(lambda p, s, gs: jax.lax.scan(body, (p, s), gs)[0])(params, state, grads)


def _assert_close(got, want, steps):
    """Every leaf within `steps` ulps of its largest magnitude. The rounding differs in two
    ways, each below an ulp of the parameter per step: XLA's CPU backend compiles optax's
    a*b + c into one fused multiply-add, the kernels round twice (built with
    -ffp-contract=off, as torch is); and AdamW's kernel shrinks the parameter by
    1 - lr*wd rounded to the dtype, a systematic error of up to half an ulp a step (torch's
    form). After 200 steps the largest differences seen are 76 ulps (float32) and 50
    (float64) for AdamW with optax's default decay (1 - 1e-7 is 0.32 ulp off in float32),
    at most 13 for the other rules."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        tol = steps * np.finfo(w.dtype).eps * np.max(np.abs(w))
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)


def _assert_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# -- the transformation --------------------------------------------------------------------

def test_is_an_optax_transformation():
    opt = fjax.adamw(1e-3)
    assert isinstance(opt, fjax.FusedTransformation)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    params = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2))]}
    state = opt.init(params)
    assert isinstance(state, fjax.AdamState) and state.count.dtype == jnp.int32
    _assert_equal(state.exp_avg, jax.tree.map(jnp.zeros_like, params))
    assert repr(opt.update.__self__).startswith("fastopt.jax.adamw(learning_rate=0.001, b1=0.9")
    assert fjax.sgd(0.1).init(params) == fjax.SGDState(count=jnp.int32(0))
    state = fjax.lion(0.1).init(params)
    assert set(state._fields) == {"count", "exp_avg", "master_param", "absmax"}
    assert state.master_param is None and state.absmax is None  # neither option


def test_docstring_examples():
    result = doctest.testmod(fjax)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name, dtype", [(n, d) for n in ("adam", "sgd", "sgd_momentum", "lion",
                                                       "adopt", "adan")
                                         for d in ("float32", "float64")])
def test_record_is_the_handlers_struct(name, dtype):
    """The struct packed inside jit from traced step and learning rate has the bytes
    record_bytes packs from the same field values on the host (flags on and off)."""
    args = _rules.KERNELS[name].args
    scalars = {
        "adam": lambda t, lr: _scalars.adam_scalars(
            dtype, step=t, lr=lr, beta1=0.4, beta2=0.9, eps=1e-6, weight_decay=0.1,
            decoupled=True, maximize=False, grad_scale=0.5, grad_clip=math.inf),
        "sgd": lambda t, lr: _scalars.sgd_scalars(
            dtype, lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
            maximize=False, first=False, grad_scale=1.0, grad_clip=math.inf),
        "sgd_momentum": lambda t, lr: _scalars.sgd_scalars(
            dtype, lr=lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
            maximize=False, first=True, grad_scale=1.0, grad_clip=3.0),
        "lion": lambda t, lr: _scalars.lion_scalars(
            dtype, lr=lr, beta1=0.9, beta2=0.99, weight_decay=1e-3, maximize=True,
            grad_scale=1.0, grad_clip=math.inf),
        "adopt": lambda t, lr: _scalars.adopt_scalars(  # a traced flag (first) and clamp
            dtype, step=t - 6, lr=lr, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.1,
            decoupled=True, clip_value=(t - 7) ** 0.25, maximize=False, grad_scale=1.0,
            grad_clip=math.inf),
        "adan": lambda t, lr: _scalars.adan_scalars(
            dtype, step=t, lr=lr, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8,
            weight_decay=0.02, no_prox=False, maximize=False, grad_scale=1.0,
            grad_clip=math.inf),
    }[name]
    with jax.enable_x64(dtype == "float64"):
        step, lr = jnp.int32(7), jnp.asarray(3e-3, dtype)
        got, fields = jax.jit(lambda t, lr: (fjax._record(args, np.dtype(dtype), scalars(t, lr)),
                                             scalars(t, lr)))(step, lr)
        want = _jax_ffi.record_bytes(args, dtype, {k: v if isinstance(v, bool) else float(v)
                                                   for k, v in fields.items()})
    # the host record leaves the C struct's padding as NumPy allocated it; ours is zero
    layout = _rules._record_dtype(args, np.dtype(dtype))
    fields = np.zeros(want.size, bool)
    for field, offset in (layout.fields[name][:2] for name in args.fields):
        fields[offset:offset + field.itemsize] = True
    assert got.dtype == jnp.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got)[fields], want[fields])
    assert not np.asarray(got)[~fields].any()


# -- conformance with optax ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hyper", CONFIGS, ids=CONFIG_IDS)
def test_matches_optax(name, hyper, dtype):
    """200 jitted steps on a pytree, through update + apply_updates and through step."""
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype)
        want_params, want_state = _optax_run(name, hyper, params, grads, dtype)
        tx = getattr(fjax, name)(**hyper)
        for run in (_run_update, _run_step):
            got_params, got_state = run(tx, params, grads)
            _assert_close(got_params, want_params, STEPS)
            assert int(got_state.count) == STEPS
        for field in got_state._fields[1:]:  # the state arrays, as optax names them
            if getattr(got_state, field) is not None:
                names = dict(OPTAX_NAMES, **OPTAX_RULE_NAMES.get(name, {}))
                _assert_close(getattr(got_state, field),
                              _optax_state(want_state, names[field]), STEPS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", [dict(learning_rate=1e-2),
                                   dict(learning_rate=1e-3, b1=0.9, b2=0.5, b3=0.999, eps=1e-6,
                                        weight_decay=0.1),
                                   dict(learning_rate=1e-2, weight_decay=0.05, no_prox=True)],
                         ids=["defaults", "betas", "no_prox"])
def test_adan_matches_the_array_api(hyper, dtype):
    """fastopt.jax.adan follows the authors' Adan as fastopt.Adan does (optax.adan differs):
    200 jitted steps against fastopt.Adan on NumPy arrays, the same kernel with its step
    sizes computed in float64 on the host, so equal to rounding."""
    hyper = dict(hyper)
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype)
        tx = fjax.adan(**hyper)
        got = [_run_update(tx, params, grads), _run_step(tx, params, grads)]
    leaves = [np.array(p) for p in jax.tree.leaves(params)]
    lr = hyper.pop("learning_rate")
    betas = tuple(hyper.pop(b, d) for b, d in (("b1", 0.98), ("b2", 0.92), ("b3", 0.99)))
    opt = fastopt.Adan(leaves, lr=lr, betas=betas, **hyper)
    for t in range(STEPS):
        opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
    want = jax.tree.unflatten(jax.tree.structure(params), leaves)
    for got_params, got_state in got:
        _assert_close(got_params, want, STEPS)
        for field in got_state._fields[1:-2]:  # the arrays (not master_param, absmax)
            _assert_close(getattr(got_state, field), jax.tree.unflatten(
                jax.tree.structure(params), [opt.state[i][field] for i in range(len(leaves))]),
                STEPS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", [dict(learning_rate=1e-2),
                                   dict(learning_rate=0.1, eta_minus=0.3, eta_plus=1.5,
                                        min_step_size=1e-3, max_step_size=0.5),
                                   dict(learning_rate=1e-2, maximize=True, max_grad_norm=1.0)],
                         ids=["defaults", "etas", "maximize-clip"])
def test_rprop_matches_the_array_api(hyper, dtype):
    """fastopt.jax.rprop follows torch's Rprop as fastopt.Rprop does (optax.rprop as
    released lags a step): 200 jitted steps against fastopt.Rprop on NumPy arrays, the same
    kernel with the same scalars, so equal bit for bit (to rounding with max_grad_norm:
    XLA sums the norm in its own order); gradients with zeros, so that the sign product is
    0 too."""
    hyper = dict(hyper)
    same = _assert_equal if "max_grad_norm" not in hyper else (
        lambda got, want: _assert_close(got, want, STEPS))
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype)
        grads = jax.tree.map(lambda g: jnp.where(jnp.abs(g) < 0.3, 0, g), grads)
        tx = fjax.rprop(**hyper)
        got = [_run_update(tx, params, grads), _run_step(tx, params, grads)]
    leaves = [np.array(p) for p in jax.tree.leaves(params)]
    opt = fastopt.Rprop(leaves, lr=hyper.pop("learning_rate"),
                        etas=(hyper.pop("eta_minus", 0.5), hyper.pop("eta_plus", 1.2)),
                        step_sizes=(hyper.pop("min_step_size", 1e-6),
                                    hyper.pop("max_step_size", 50.0)), **hyper)
    for t in range(STEPS):
        opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
    want = jax.tree.unflatten(jax.tree.structure(params), leaves)
    step, update = got[1], got[0]
    same(step[0], want)
    _assert_close(update[0], want, STEPS)  # apply_updates adds the update: one rounding
    for field in step[1]._fields[1:-2]:  # the arrays (not master_param, absmax)
        same(getattr(step[1], field), jax.tree.unflatten(
            jax.tree.structure(params), [opt.state[i][field] for i in range(len(leaves))]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", [dict(learning_rate=0.05, lambd=1e-2, t0=20),
                                   dict(learning_rate=0.02, weight_decay=0.1, alpha=0.5, t0=3),
                                   dict(learning_rate=optax.linear_schedule(0.05, 0.01, 150),
                                        lambd=1e-3, t0=50)],
                         ids=["decay", "weight_decay", "schedule"])
def test_asgd_matches_the_array_api(hyper, dtype):
    """fastopt.jax.asgd follows torch's ASGD as fastopt.ASGD does (optax has none): 200
    jitted steps, averaging switched on partway, against fastopt.ASGD with the same
    learning rate each step. With jax_enable_x64 eta and mu are computed in float64 and
    rounded to float32 as torch does: equal bit for bit for a constant learning rate;
    without it (in float32), or with a schedule (XLA fuses the schedule's arithmetic into
    the step, a multiply-add rounded once), to rounding."""
    lr = hyper["learning_rate"]
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype)
        tx = fjax.asgd(**hyper)
        got_params, got_state = _run_step(tx, params, grads)
        leaves = [np.array(p) for p in jax.tree.leaves(params)]
        opt = fastopt.ASGD(leaves, **{k: v for k, v in hyper.items() if k != "learning_rate"})
        for t in range(STEPS):
            # the schedule's value as the jitted step sees it (of an int32 count)
            opt.param_groups[0]["lr"] = float(lr(jnp.int32(t))) if callable(lr) else lr
            opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
        saved = tx.state_dict(got_state)
    if dtype == "float64" and not callable(lr):
        same = _assert_equal
    else:  # eta rounded to float32 a float32 ulp apart now and then, in either dtype
        def same(got, want):
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=STEPS * np.finfo(
                    np.float32).eps * np.max(np.abs(w)))
    unflatten = functools.partial(jax.tree.unflatten, jax.tree.structure(params))
    same(got_params, unflatten(leaves))
    same(got_state.ax, unflatten([opt.state[i]["ax"] for i in range(len(leaves))]))
    assert int(got_state.count) == STEPS
    for key in ("step", "mu"):  # the numbers torch keeps, as the array API has them
        assert saved["state"][0][key] == opt.state[0][key]
    assert saved["state"][0]["eta"] == pytest.approx(opt.state[0]["eta"], rel=1e-6)


SCHEDULE_FREE = {
    "adamw": ("schedule_free_adamw", "AdamWScheduleFree",
              dict(learning_rate=0.01, b1=0.8, b2=0.99, weight_decay=0.05, warmup_steps=5),
              dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05, warmup_steps=5)),
    "sgd": ("schedule_free_sgd", "SGDScheduleFree",
            dict(learning_rate=0.05, b1=0.85, warmup_steps=3, r=1.0, weight_lr_power=1.5),
            dict(lr=0.05, momentum=0.85, warmup_steps=3, r=1.0, weight_lr_power=1.5)),
    "schedule": ("schedule_free_adamw", "AdamWScheduleFree",
                 dict(learning_rate=optax.linear_schedule(0.002, 0.02, 100)),
                 dict()),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", sorted(SCHEDULE_FREE))
def test_schedule_free_matches_the_array_api(config, dtype):
    """fastopt.jax.schedule_free_adamw / _sgd follow the authors' reference as the array
    API's classes do (tests/test_schedulefree.py checks those against it): 200 jitted steps
    against fastopt.AdamWScheduleFree / SGDScheduleFree with the same learning rate each
    step; the carried weights, z, v, and the evaluation point (eval()). The weights'
    arithmetic runs in XLA, which fuses a multiply and an add into one FMA where the host
    rounds twice: the step's scalars can differ by an ulp (float64 with jax_enable_x64,
    float32 without), the parameters by rounding."""
    name, cls, hyper, array_hyper = SCHEDULE_FREE[config]
    lr = hyper["learning_rate"]
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype, seed=3)
        tx = getattr(fjax, name)(**hyper)
        state = tx.init(params)
        assert isinstance(state, fjax.ScheduleFreeState)
        _assert_equal(state.z, params)  # z starts at the parameters
        got_params, got_state = _run_step(tx, params, grads)
        evaluated = jax.jit(fjax.schedule_free_eval_params)(got_state, got_params)
        leaves = [np.array(p) for p in jax.tree.leaves(params)]
        opt = getattr(fastopt, cls)(leaves, **array_hyper)
        for t in range(STEPS):
            if callable(lr):  # the schedule's value as the jitted step sees it
                opt.param_groups[0]["lr"] = float(lr(jnp.int32(t)))
            opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
        unflatten = functools.partial(jax.tree.unflatten, jax.tree.structure(params))
        # a schedule's learning rate is float32 (optax's), its arithmetic fused into the
        # step's by XLA: a float32 ulp apart now and then, in either dtype
        eps = np.finfo(np.float32 if callable(lr) or dtype == "float32" else np.float64).eps

        def close(got, want):
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(g), w, rtol=0,
                                           atol=STEPS * eps * np.max(np.abs(w)))
        close(got_params, unflatten([p.copy() for p in leaves]))
        for field in ("z", "exp_avg_sq") if "adamw" in name else ("z",):
            close(getattr(got_state, field),
                  unflatten([opt.state[i][field] for i in range(len(leaves))]))
        for key in ("lr_max", "weight_sum"):
            assert float(getattr(got_state, key)) == pytest.approx(opt.state[0][key],
                                                                   rel=float(STEPS * eps))
        assert int(got_state.count) == STEPS
        opt.eval()
        close(evaluated, unflatten(leaves))
        assert jax.tree.structure(evaluated) == jax.tree.structure(params)


def test_schedule_free_skips_and_starts_like_the_reference():
    """A skipped step (skip_nonfinite) leaves the carried weights too; before any step the
    evaluation point is the parameters; bfloat16 parameters are evaluated in float32 and
    rounded to nearest."""
    params, grads = _case("float32", seed=4, steps=6)
    grads["w"] = grads["w"].at[2, 0, 0].set(np.nan)
    tx = fjax.schedule_free_adamw(0.01, warmup_steps=2, skip_nonfinite=True)
    clean = jax.tree.map(lambda g: g[np.array([0, 1, 3, 4, 5])], grads)
    _assert_equal(_run_step(tx, params, grads), _run_step(tx, params, clean))
    state = tx.init(params)
    _assert_equal(fjax.schedule_free_eval_params(state, params), params)
    low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    p, s = _run_step(tx, low, clean)
    x = fjax.schedule_free_eval_params(s, p)
    want = jax.tree.map(lambda y, z: (y.astype(jnp.float32) + (1 - 1 / 0.9) * (
        z - y.astype(jnp.float32))).astype(jnp.bfloat16), p, s.z)
    for got, w in zip(jax.tree.leaves(x), jax.tree.leaves(want)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(w, np.float32),
                                   rtol=2 ** -8)
    with pytest.raises(TypeError, match="state: expected the ScheduleFreeState"):
        fjax.schedule_free_eval_params(fjax.adamw(0.1).init(params), params)
    # the evaluation weight is the host's 1 - 1/b1 rounded once, also in float32
    assert np.float32(state.eval_weight) == np.float32(1 - 1 / 0.9)
    # bfloat16 state of float32 parameters
    tx16 = fjax.schedule_free_adamw(0.01, state_dtype="bfloat16")
    p, s = _run_step(tx16, params, clean)
    assert jax.tree.leaves(s.z)[0].dtype == jnp.bfloat16
    x = fjax.schedule_free_eval_params(s, p)
    for got, y, z in zip(jax.tree.leaves(x), jax.tree.leaves(p), jax.tree.leaves(s.z)):
        np.testing.assert_allclose(got, y + np.float32(1 - 1 / 0.9) * (z.astype(y.dtype) - y),
                                   rtol=1e-6, atol=1e-7)
    # before the first step the state dict has no entries, as the array API's
    saved = tx.state_dict(tx.init(params))
    assert saved["state"] == {}
    fastopt.AdamWScheduleFree([np.array(q) for q in jax.tree.leaves(params)]).load_state_dict(
        saved)


MUON_SHAPES = {"w": (8, 5), "v": (5, 9), "b": [(5,), ()], "deep": {"x": (3, 2, 2)}}


def _muon_array_api(params, **hyper):
    """fastopt.Muon over NumPy copies of `params`' leaves: the matrices in a use_muon
    group, the others in an AdamW group, as fastopt.jax.muon's state_dict numbers them;
    (optimizer, leaves in leaf order, its order of them)."""
    leaves = [np.array(p) for p in jax.tree.leaves(params)]
    order = [i for i, p in enumerate(leaves) if p.ndim == 2]
    order += [i for i, p in enumerate(leaves) if p.ndim != 2]
    mats = [leaves[i] for i in order if leaves[i].ndim == 2]
    others = [leaves[i] for i in order if leaves[i].ndim != 2]
    opt = fastopt.Muon([dict(params=mats), dict(params=others, use_muon=False)], **hyper)
    return opt, leaves, order


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", ["defaults", "bfloat16", "options"])
def test_muon_matches_the_array_api(config, dtype):
    """fastopt.jax.muon follows torch's Muon as fastopt.Muon does, the parameters that are
    not matrices through AdamW: 200 jitted steps against fastopt.Muon (matrices in a
    use_muon group, the rest in an AdamW group) with the same learning rate each step. The
    Newton-Schulz products are XLA's GEMMs against NumPy's (their own summation orders),
    and without jax_enable_x64 the AdamW leaves' bias corrections are float32 (as optax's):
    equal to rounding. With bfloat16 iterations, with Nesterov off and the other lr
    adjustment, and with a schedule, max_grad_norm, skip_nonfinite and masks."""
    hyper, extra, array_extra = dict(learning_rate=0.02, weight_decay=0.05), {}, {}
    if config == "bfloat16":
        hyper.update(ns_dtype="bfloat16", nesterov=False, adjust_lr_fn="match_rms_adamw",
                     beta=0.9, adam_b1=0.8)
    lr = hyper["learning_rate"]
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(6)
        params = _tree(MUON_SHAPES, rng, dtype)
        grads = _tree(MUON_SHAPES, rng, dtype, (STEPS,))
        masks = None
        if config == "options":
            lr = hyper["learning_rate"] = optax.cosine_decay_schedule(0.02, STEPS)
            extra = array_extra = dict(max_grad_norm=3.0, skip_nonfinite=True)
            grads["v"] = grads["v"].at[7, 2, 3].set(jnp.nan)  # a skipped step
            masks = {"w": jnp.asarray(rng.random((8, 5)) > 0.3), "v": None, "b": [None, None],
                     "deep": {"x": jnp.asarray(rng.random((3, 2, 2)) > 0.5)}}
        tx = fjax.muon(**hyper, **extra)

        def body(carry, g):
            p, s = carry
            return tx.step(p, g, s, masks), None
        got, state = jax.jit(lambda p, gs: jax.lax.scan(body, (p, tx.init(p)), gs)[0])(
            params, grads)
    array_hyper = {"ns_dtype": "ns_dtype", "nesterov": "nesterov", "beta": "momentum",
                   "adjust_lr_fn": "adjust_lr_fn", "weight_decay": "weight_decay"}
    opt, leaves, order = _muon_array_api(
        params, **{array_hyper[k]: v for k, v in hyper.items() if k in array_hyper},
        adam_betas=(hyper.get("adam_b1", 0.9), 0.999), **array_extra)
    if masks is not None:
        mask_leaves = jax.tree.structure(params).flatten_up_to(masks)
        opt.set_masks([None if mask_leaves[i] is None else np.asarray(mask_leaves[i])
                       for i in order])
    for t in range(STEPS):
        count = t - (config == "options" and t > 7)  # the count before the step: 7 skipped
        for group in opt.param_groups:
            group["lr"] = float(lr(jnp.int32(count))) if callable(lr) else lr
        step_grads = [np.array(g[t]) for g in jax.tree.leaves(grads)]
        opt.step([step_grads[i] for i in order])
    # a schedule's learning rate is float32 (optax's), its arithmetic fused into the step's
    # by XLA: a float32 ulp apart now and then, in either dtype
    eps = np.finfo(np.float32 if callable(lr) or dtype == "float32" else np.float64).eps

    def close(got, want):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                                   atol=STEPS * eps * np.max(np.abs(want)))
    for g, w in zip(jax.tree.leaves(got), leaves):
        close(g, w)
    assert int(state.count) == (STEPS - 1 if config == "options" else STEPS)
    bufs = jax.tree.leaves(state.momentum_buffer)
    assert len(bufs) == 2 and [b.shape for b in bufs] == [(5, 9), (8, 5)]
    saved = tx.state_dict(state)
    for k in range(len(order)):
        for name, value in saved["state"][k].items():
            if name == "step":
                assert value == opt.state[k][name]
            else:
                close(value, opt.state[k][name])


def test_muon_state_moves_between_jax_and_the_array_api(tmp_path):
    """state_dict / load_state_dict: 5 jitted steps, then 5 of fastopt.Muon (its groups
    from the saved state dict) equal 10 jitted steps, and back."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        params = _tree(MUON_SHAPES, rng, "float64")
        grads = _tree(MUON_SHAPES, rng, "float64", (10,))
        tx = fjax.muon(0.02, weight_decay=0.05)
        want, _ = _run_step(tx, params, grads)
        p5, s5 = _run_step(tx, params, jax.tree.map(lambda g: g[:5], grads))
        fastopt.save(tx.state_dict(s5), tmp_path / "jax.npz")
        saved = fastopt.load(tmp_path / "jax.npz")
        opt, leaves, order = _muon_array_api(p5)
        opt.load_state_dict(saved)
        assert [g["use_muon"] for g in opt.param_groups] == [True, False]
        for t in range(5, 10):
            step_grads = [np.array(g[t]) for g in jax.tree.leaves(grads)]
            opt.step([step_grads[i] for i in order])
        _assert_close(jax.tree.unflatten(jax.tree.structure(params), leaves), want, 10)
        opt, leaves, order = _muon_array_api(params)
        opt.load_state_dict(saved | {"state": {}})
        for t in range(5):
            step_grads = [np.array(g[t]) for g in jax.tree.leaves(grads)]
            opt.step([step_grads[i] for i in order])
        state = tx.load_state_dict(opt.state_dict(), params)
        assert int(state.count) == 5
        p10, _ = _run_step(tx, jax.tree.unflatten(jax.tree.structure(params),
                                                  [jnp.asarray(x) for x in leaves]),
                           jax.tree.map(lambda g: g[5:], grads), state)
        _assert_close(p10, want, 10)


PRODIGY = {
    "defaults": (dict(weight_decay=0.01), dict(weight_decay=0.01)),
    "options": (dict(learning_rate=0.5, b1=0.8, b2=0.99, beta3=0.9, weight_decay=0.05,
                     decouple=False, use_bias_correction=True, safeguard_warmup=True, d0=1e-4,
                     d_coef=0.8, growth_rate=1.05),
                dict(lr=0.5, betas=(0.8, 0.99), beta3=0.9, weight_decay=0.05, decouple=False,
                     use_bias_correction=True, safeguard_warmup=True, d0=1e-4, d_coef=0.8,
                     growth_rate=1.05)),
    "no_momentum": (dict(b1=0.0, weight_decay=0.02, use_bias_correction=True),
                    dict(betas=(0.0, 0.999), weight_decay=0.02, use_bias_correction=True)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", sorted(PRODIGY))
def test_prodigy_matches_the_array_api(config, dtype):
    """fastopt.jax.prodigy follows the authors' reference as fastopt.Prodigy does: 200
    jitted steps on a noisy quadratic (each step's gradient from its own parameters)
    against fastopt.Prodigy; the sums behind d are the update pass's fixed-order float64
    sums per tensor, as the array API's, rounded to float32 without jax_enable_x64 (the
    array API keeps them in float64), and added over the tensors before the numerator's
    product: equal to rounding, d too. A step that finds s all 0 (a first step of zero
    gradients, the decay decoupled, which would otherwise move them) changes no parameter,
    pruned ones included, nor d, nor the count, and its updates are +0; the state dict
    carries d in the param group, as the array API's."""
    hyper, array_hyper = PRODIGY[config]
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(12)
        params = _tree(SHAPES, rng, dtype)
        target = _tree(SHAPES, rng, dtype)
        noise = jax.tree.map(lambda x: 0.1 * x, _tree(SHAPES, rng, dtype, (STEPS,)))
        tx = fjax.prodigy(**hyper)

        def body(carry, n):
            p, s = carry
            g = jax.tree.map(lambda a, t, e: a - t + e, p, target, n)
            return tx.step(p, g, s), None
        got, state = jax.jit(lambda p, n: jax.lax.scan(body, (p, tx.init(p)), n)[0])(
            params, noise)
        zeros = jax.tree.map(jnp.zeros_like, params)  # a first step with s = 0 after it
        fresh = tx.init(params)
        same_p, same_state = jax.jit(tx.step)(params, zeros, fresh)
        still, still_state = jax.jit(tx.update)(zeros, fresh, params)
        masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) > 0.3), params)
        masked_p, _ = jax.jit(tx.step)(params, zeros, fresh, masks)
        masked_u, _ = jax.jit(tx.update)(zeros, fresh, params, masks=masks)
    leaves = [np.array(p) for p in jax.tree.leaves(params)]
    targets = [np.asarray(t) for t in jax.tree.leaves(target)]
    noises = [np.asarray(n) for n in jax.tree.leaves(noise)]
    opt = fastopt.Prodigy(leaves, **array_hyper)
    for t in range(STEPS):
        opt.step([np.asarray(p - q + n[t]) for p, q, n in zip(leaves, targets, noises)])
    _assert_close(got, jax.tree.unflatten(jax.tree.structure(params), leaves), STEPS)
    group = opt.param_groups[0]
    eps = np.finfo(np.dtype(dtype)).eps
    for key in ("d", "d_max", "d_numerator"):
        assert float(getattr(state, key)) == pytest.approx(group[key], rel=float(STEPS * eps))
    assert int(state.count) == group["k"] == STEPS
    if hyper.get("decouple", True):  # (an L2 decay makes the gradient p wd, not 0)
        _assert_equal(same_p, params)
        _assert_equal(masked_p, params)  # pruned entries too: nothing moved
        _assert_equal(same_state, fresh)
        _assert_equal(still_state, fresh)
        for u in jax.tree.leaves(still) + jax.tree.leaves(masked_u):
            np.testing.assert_array_equal(np.asarray(u), 0)
            assert not np.signbit(np.asarray(u)).any()
    saved = tx.state_dict(state)["param_groups"][0]
    assert saved["k"] == STEPS and saved["d"] == float(state.d)


@pytest.mark.parametrize("name, hyper, schedule", [
    ("adamw", dict(weight_decay=0.05), optax.cosine_decay_schedule(1e-2, 20, alpha=0.1)),
    ("sgd", dict(momentum=0.9), optax.linear_schedule(1e-2, 1e-3, 20)),
])
def test_schedule_inside_jit_without_recompiles(name, hyper, schedule):
    """A schedule runs inside the jitted step: optax's results, one compilation."""
    params, grads = _case("float32", seed=1, steps=25)
    traces = []

    def step(p, g, s):
        traces.append(1)
        return tx.step(p, g, s)

    tx = getattr(fjax, name)(schedule, **hyper)
    jitted = jax.jit(step)
    p, s = params, tx.init(params)
    for t in range(25):
        p, s = jitted(p, jax.tree.map(lambda g: g[t], grads), s)
    assert len(traces) == 1 and jitted._cache_size() == 1
    want, _ = _run_update(_optax(name)(schedule, **hyper), params, grads)
    _assert_close(p, want, 25)


@pytest.mark.parametrize("tx, skips", [
    (fjax.adamw(optax.cosine_decay_schedule(1e-2, 100), max_grad_norm=1.0), False),
    (fjax.sgd(0.1, momentum=0.9), False),
    (fjax.sgd(0.1), False),
    (fjax.lion(1e-3), False),
    (fjax.adan(1e-3, weight_decay=0.02), False),
    (fjax.schedule_free_adamw(1e-3, warmup_steps=10), False),
    (fjax.adamw(1e-3, skip_nonfinite=True), True),
    (fjax.lion(1e-3, cautious=True, skip_nonfinite=True), True),
    (fjax.adamw(1e-3, state_dtype="bfloat16", skip_nonfinite=True), True),
], ids=["adamw", "sgd_momentum", "sgd", "lion", "adan", "schedule_free", "adamw_skip",
        "lion_cautious_skip", "adamw_bf16_state_skip"])
def test_donated_step_updates_in_place(tx, skips):
    """jit(step, donate_argnums=(0, 2)): the results live in the donated buffers and the
    compiled program copies no array (skip_nonfinite's verdict goes to the kernel, not to
    a conditional around it, whose results XLA would copy); a skipped step leaves them."""
    params, grads = _case("float32", seed=2, steps=1)
    params["big"] = jnp.ones((300, 250), jnp.float32)  # a multi-chunk, two-thread tensor
    grads = jax.tree.map(lambda g: g[0], grads)
    grads["big"] = jnp.full((300, 250), 0.1, jnp.float32)
    state = tx.init(params)
    step = jax.jit(tx.step, donate_argnums=(0, 2))
    text = step.lower(params, grads, state).compile().as_text()
    assert 'custom_call_target="fastopt_elementwise_v1"' in text
    # with skip_nonfinite, a copy of the step count (4 bytes) at most
    copies = r"\s(?!s32\[\] )\S+ copy(-start)?\(" if skips else r"\scopy(-start)?\("
    assert not re.search(copies + "|conditional", text), text
    want = params, state
    for _ in range(3):  # without donation: new buffers, the same values
        want = jax.jit(tx.step)(want[0], grads, want[1])
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
    for _ in range(3):
        params, state = step(params, grads, state)
        assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))] == buffers
    _assert_equal((params, state), want)
    assert int(state.count) == 3
    if skips:  # skip_nonfinite's step on a NaN gradient
        poisoned = dict(grads, big=grads["big"].at[7, 9].set(jnp.nan))
        params, state = step(params, poisoned, state)
        assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))] == buffers
        _assert_equal((params, state), want)


def test_update_path_writes_the_updates_over_the_gradients():
    """A training step (jax.grad, update, apply_updates) jitted with the parameters and the
    state donated: the kernel writes the updates over the gradients, which are dead
    afterwards, so the compiled program copies nothing and its temporaries are the
    gradients alone; the updates are step's new parameters minus the parameters, bit for
    bit. A gradient passed in and not donated is copied first, and stays as it was."""
    tx = fjax.adamw(1e-2, weight_decay=0.1)
    rng = np.random.default_rng(8)
    params = {"big": jnp.asarray(rng.standard_normal((300, 250)), jnp.float32),
              "small": jnp.ones(7, jnp.float32)}
    grads = jax.tree.map(lambda x: 0.1 * x + 0.01, params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))

    def loss(p):
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))

    def train_step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s
    state = tx.init(params)
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state).compile()
    text = compiled.as_text()
    assert 'custom_call_target="fastopt_elementwise_v1"' in text
    entry = text[text.index("\nENTRY"):]  # the gradients' fusions end in a copy of their own
    assert not re.search(r"\scopy(-start)?\(", entry), entry
    assert nbytes <= compiled.memory_analysis().temp_size_in_bytes < 2 * nbytes
    kept = jax.tree.map(np.array, grads)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    _assert_equal(grads, kept)
    new, _ = jax.jit(tx.step)(params, grads, state)
    _assert_equal(updates, jax.tree.map(lambda n, p: np.asarray(n) - np.asarray(p), new, params))


# -- optax's combinators ----------------------------------------------------------------------

def test_in_optax_chain():
    params, grads = _case("float32", seed=3, steps=50)
    grads = jax.tree.map(lambda g: 10 * g, grads)  # norms above 1: the clip acts

    def chained(rule):
        return optax.chain(optax.clip_by_global_norm(1.0), rule(1e-2, weight_decay=0.1))

    got, _ = _run_update(chained(fjax.adamw), params, grads)
    want, _ = _run_update(chained(optax.adamw), params, grads)
    _assert_close(got, want, 50)


def test_in_optax_multisteps():
    params, grads = _case("float32", seed=4, steps=20)
    got, state = _run_update(optax.MultiSteps(fjax.adam(1e-2), every_k_schedule=2), params,
                             grads)
    want, _ = _run_update(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2), params, grads)
    _assert_close(got, want, 20)
    assert int(state.inner_opt_state.count) == 10


@pytest.mark.parametrize("name, hyper", [
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("adam", dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 30))),
    ("sgd", dict(learning_rate=1e-2, momentum=0.9, nesterov=True)),
    ("adadelta", dict(learning_rate=1.0, rho=0.8)),
    ("lamb", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("nadamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("radam", dict(learning_rate=1e-2, threshold=6.0)),
    ("rmsprop", dict(learning_rate=1e-2, momentum=0.9, centered=True)),
    ("adagrad", dict(learning_rate=1e-2, initial_accumulator_value=0.2)),
])
def test_in_optax_inject_hyperparams(name, hyper):
    """optax.inject_hyperparams traces every numeric argument (the defaults too) inside
    jit: the struct is built from them there, as optax builds its update from them, so the
    results match optax's own rule under inject_hyperparams; and a learning rate changed in
    the state takes effect (0 leaves the parameters as they are)."""
    params, grads = _case("float32", seed=9, steps=40)
    got, state = _run_update(optax.inject_hyperparams(getattr(fjax, name))(**hyper), params,
                             grads)
    want, _ = _run_update(optax.inject_hyperparams(getattr(optax, name))(**hyper), params,
                          grads)
    _assert_close(got, want, 40)
    assert "learning_rate" in state.hyperparams and int(state.inner_state.count) == 40
    tx = optax.inject_hyperparams(getattr(fjax, name))(**hyper)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.float32(0.0)
    update = jax.jit(tx.update)
    for t in range(3):
        updates, state = update(jax.tree.map(lambda g: g[t], grads), state, params)
        if "learning_rate" in state.hyperparams_states:  # a schedule: evaluated each step
            break
        assert not any(np.asarray(u).any() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name, hyper, static", [
    ("prodigy", dict(b1=0.9, weight_decay=0.01), ()),
    ("prodigy", dict(b1=0.0, use_bias_correction=True), ("b1",)),
    ("muon", dict(learning_rate=1e-2), ("ns_steps",)),
])
def test_multi_pass_rules_in_optax_inject_hyperparams(name, hyper, static):
    """Prodigy and Muon under optax.inject_hyperparams (their numbers traced in update)
    take the steps they take with Python numbers, to float32 rounding of the step sizes.
    Prodigy's b1 = 0 (static: an init inside jit sees b1 traced, and then keeps a first
    moment) keeps no first moment there too. Muon's ns_steps, a loop count, must be
    static."""
    params, grads = _case("float32", seed=14, steps=20)
    injected = optax.inject_hyperparams(getattr(fjax, name), static_args=static)(**hyper)
    got, state = _run_update(injected, params, grads)
    want, _ = _run_update(getattr(fjax, name)(**hyper), params, grads)
    _assert_close(got, want, 20)
    if name == "prodigy":
        assert (state.inner_state.exp_avg is None) == (hyper["b1"] == 0)
    else:
        with pytest.raises(TypeError, match=r"ns_steps: .*static_args=\('ns_steps',\)"):
            optax.inject_hyperparams(fjax.muon)(**hyper).init(params)


def test_inject_hyperparams_refuses_what_must_be_static():
    params, grads = _case("float32", seed=9, steps=1)
    grads = jax.tree.map(lambda g: g[0], grads)
    tx = optax.inject_hyperparams(fjax.adam)(learning_rate=1e-3, n_threads=2)
    with pytest.raises(TypeError, match=r"n_threads: expected a Python int, got a jax array "
                                        r".*static_args=\('n_threads',\)"):
        tx.init(params)
    tx = optax.inject_hyperparams(fjax.adam, static_args=("n_threads",))(learning_rate=1e-3,
                                                                         n_threads=2)
    jax.jit(tx.update)(grads, tx.init(params), params)


def test_mlp_training_matches_optax():
    """A small MLP trained 200 jitted steps (fused step with donation vs optax's adamw):
    the loss curves agree to 1e-3 relative. Here the parameters feed back into the
    gradients, and the loss falls by four orders of magnitude, so its relative rounding
    differences grow along the curve; up to 7e-5 is seen (three seeds)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    y = jnp.sin(x @ jnp.asarray(rng.standard_normal((8, 1)), jnp.float32))
    params = {"hidden": {"w": jnp.asarray(rng.standard_normal((8, 32)) / 3, jnp.float32),
                         "b": jnp.zeros(32, jnp.float32)},
              "out": {"w": jnp.asarray(rng.standard_normal((32, 1)) / 6, jnp.float32),
                      "b": jnp.zeros(1, jnp.float32)}}

    def loss(p):
        h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
        return jnp.mean((h @ p["out"]["w"] + p["out"]["b"] - y) ** 2)

    def fused_step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        p, s = fused.step(p, g, s)
        return p, s, value

    def optax_step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = reference.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    fused, reference = fjax.adamw(1e-2, weight_decay=1e-3), optax.adamw(1e-2, weight_decay=1e-3)
    curves = []
    for tx, step in ((fused, fused_step), (reference, optax_step)):
        step = jax.jit(step, donate_argnums=(0, 1))
        p, s = jax.tree.map(jnp.copy, params), tx.init(params)
        losses = []
        for _ in range(200):
            p, s, value = step(p, s)
            losses.append(float(value))
        curves.append(np.array(losses))
    assert curves[1][-1] < 0.2 * curves[1][0]  # it trains
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-3)


# -- options --------------------------------------------------------------------------------

def _torch_clip_coefficient(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_'s coefficient, written as torch computes it: the norm
    of the per-tensor norms, min(1, max_norm / (norm + 1e-6))."""
    norm = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in jax.tree.leaves(grads)]))
    return jnp.minimum(max_norm / (norm + 1e-6), 1.0)


@pytest.mark.parametrize("name, hyper", [CONFIGS[2], CONFIGS[6], CONFIGS[8]],
                         ids=["adamw", "sgd", "lion"])
def test_max_grad_norm_is_torchs_clip(name, hyper):
    """max_grad_norm scales the gradients by torch's coefficient (optax's
    clip_by_global_norm has no + 1e-6); small gradients pass unchanged, bit for bit."""
    params, grads = _case("float32", seed=6, steps=30)
    clipped = jax.vmap(lambda g: jax.tree.map(lambda x: x * _torch_clip_coefficient(g, 0.5), g))(
        grads)
    got, _ = _run_step(getattr(fjax, name)(**hyper, max_grad_norm=0.5), params, grads)
    want, _ = _run_update(getattr(optax, name)(**hyper), params, clipped)
    _assert_close(got, want, 30)
    small = jax.tree.map(lambda g: g * 1e-3, grads)
    _assert_equal(_run_step(getattr(fjax, name)(**hyper, max_grad_norm=0.5), params, small),
                  _run_step(getattr(fjax, name)(**hyper), params, small))


@pytest.mark.parametrize("name, hyper", [
    CONFIGS[2], CONFIGS[5], CONFIGS[18], ("lamb", dict(learning_rate=1e-2)),
    ("muon", dict(learning_rate=1e-2)), ("prodigy", dict(weight_decay=0.01))],
    ids=["adamw", "sgd_momentum", "ademamix", "lamb", "muon", "prodigy"])
def test_skip_nonfinite_leaves_everything(name, hyper):
    """skip_nonfinite: a step whose gradients hold a NaN or an inf changes no parameter,
    state array or count (update returns zeros), so the run equals one without the bad
    steps, bit for bit; with max_grad_norm too."""
    params, grads = _case("float32", seed=10, steps=12)
    bad = {3: np.nan, 7: np.inf, 8: -np.inf}
    poisoned = jax.tree.map(lambda g: g, grads)
    for t, value in bad.items():
        poisoned["deep"]["x"] = poisoned["deep"]["x"].at[t, 1, 0, 1].set(value)
    keep = [t for t in range(12) if t not in bad]
    clean = jax.tree.map(lambda g: g[np.array(keep)], grads)
    for clip in ({}, dict(max_grad_norm=0.5)):
        tx = getattr(fjax, name)(**hyper, **clip, skip_nonfinite=True)
        for run in (_run_update, _run_step):
            got, want = run(tx, params, poisoned), run(tx, params, clean)
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # -0 is not +0
                np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8),
                                              np.asarray(w).reshape(-1).view(np.uint8))
            assert int(got[1].count) == len(keep)
    updates, _ = jax.jit(tx.update)(jax.tree.map(lambda g: g[3], poisoned), tx.init(params),
                                    params)
    for u in jax.tree.leaves(updates):  # +0: no value, no sign bit
        assert not np.asarray(u).any() and not np.signbit(np.asarray(u)).any()


@pytest.mark.parametrize("name, hyper", [
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("sgd", dict(learning_rate=1e-2, momentum=0.9, nesterov=True)),
    ("lion", dict(learning_rate=1e-3)),
    ("adadelta", dict(learning_rate=0.5, weight_decay=0.1)),
    ("adan", dict(learning_rate=1e-2, weight_decay=0.02)),
    ("ademamix", dict(learning_rate=1e-2, alpha=2.0)),
    ("rprop", dict(learning_rate=0.05, eta_plus=1.3)),
    ("asgd", dict(learning_rate=0.05, lambd=1e-2, t0=3)),
    ("schedule_free_adamw", dict(learning_rate=0.01, warmup_steps=3, weight_decay=0.1)),
    ("schedule_free_sgd", dict(learning_rate=0.05, b1=0.8, r=0.5)),
    ("lamb", dict(learning_rate=0.01, weight_decay=0.1)),
    ("prodigy", dict(weight_decay=0.01, d0=1e-3)),
    ("prodigy", dict(b1=0.0, d0=1e-3)),
    # torch's RMSprop: eps outside the root, no momentum
    ("rmsprop", dict(learning_rate=1e-2, decay=0.95, eps=1e-4, eps_in_sqrt=False,
                     centered=True)),
])
def test_state_moves_between_jax_and_the_array_api(name, hyper, tmp_path):
    """state_dict / load_state_dict through fastopt.save and load: 5 jitted steps, then 5
    of the array API's class (its hyperparameters from the saved param group) equal 10
    jitted steps, and back; float64, where both compute the step sizes alike (equal to a
    rounding of the bias corrections' powers)."""
    with jax.enable_x64(True):
        params, grads = _case("float64", seed=11, steps=10)
        tx = getattr(fjax, name)(**hyper)
        first = jax.tree.map(lambda g: g[:5], grads)
        rest = [[np.array(g[t]) for g in jax.tree.leaves(grads)] for t in range(5, 10)]
        want, _ = _run_step(tx, params, grads)
        p5, s5 = _run_step(tx, params, first)
        fastopt.save(tx.state_dict(s5), tmp_path / "jax.npz")
        saved = fastopt.load(tmp_path / "jax.npz")
        cls = getattr(fastopt, {"adamw": "AdamW", "sgd": "SGD", "lion": "Lion",
                                "adadelta": "Adadelta", "adan": "Adan",
                                "ademamix": "AdEMAMix", "rprop": "Rprop",
                                "asgd": "ASGD", "schedule_free_adamw": "AdamWScheduleFree",
                                "schedule_free_sgd": "SGDScheduleFree",
                                "lamb": "Lamb", "prodigy": "Prodigy",
                                "rmsprop": "RMSprop"}[name])
        leaves = [np.array(p) for p in jax.tree.leaves(p5)]
        opt = cls(leaves)
        opt.load_state_dict(saved)
        for g in rest:
            opt.step(g)
        _assert_close(jax.tree.unflatten(jax.tree.structure(params), leaves), want, 10)
        # and back: the array API's first five steps, then five jitted ones
        leaves = [np.array(p) for p in jax.tree.leaves(params)]
        opt = cls(leaves)
        # the hyperparameters, no state yet (and Prodigy's estimate before a step)
        opt.load_state_dict(tx.state_dict(tx.init(params)))
        for t in range(5):
            opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
        fastopt.save(opt.state_dict(), tmp_path / "array.npz")
        state = tx.load_state_dict(fastopt.load(tmp_path / "array.npz"), params)
        if "step" in opt.state[0]:
            assert int(state.count) == 5
        else:  # SGD and Lion keep no count; these rules' steps do not read it
            state = state._replace(count=jnp.int32(5))
        p10, _ = _run_step(tx, jax.tree.unflatten(jax.tree.structure(params),
                                                  [jnp.asarray(x) for x in leaves]),
                           jax.tree.map(lambda g: g[5:], grads), state)
        _assert_close(p10, want, 10)


@pytest.mark.parametrize("name, hyper", [
    ("nadam", dict(learning_rate=1e-2)),
    ("adamw", dict(learning_rate=1e-2, nesterov=True)),
    ("radam", dict(learning_rate=1e-2)),
    ("adagrad", dict(learning_rate=1e-2)),
    ("rmsprop", dict(learning_rate=1e-2)),
    ("rmsprop", dict(learning_rate=1e-2, eps_in_sqrt=False, momentum=0.9)),
])
def test_state_dict_refuses_optax_only_updates(name, hyper):
    """A transformation whose update no array-API class has (optax's forms, where
    fastopt's classes follow torch) refuses state_dict and load_state_dict rather than
    move the run to another rule (torch's RMSprop buffer, loaded as optax's trace, would
    step about 1/lr times too far)."""
    params = [jnp.ones((2, 3))]
    tx = getattr(fjax, name)(**hyper)
    _, state = jax.jit(tx.step)(params, [jnp.full((2, 3), 0.5)], tx.init(params))
    for call in (lambda: tx.state_dict(state), lambda: tx.load_state_dict(
            fastopt.RMSprop([np.ones((2, 3), np.float32)], momentum=0.9).state_dict(),
            params)):
        with pytest.raises(ValueError, match=r"state_dict: fastopt.jax.\w+\(.*\) follows "
                                             r"optax's update, which no array-API class has"):
            call()


def test_weight_decay_mask_state_moves_between_jax_and_the_array_api(tmp_path):
    """With a weight-decay mask, state_dict writes the array API's two param groups (the
    decayed parameters, then the others with weight_decay 0, numbered in that order):
    an AdamW made with those groups resumes it, and back; a state dict grouped otherwise
    is refused."""
    mask = {"w": False, "b": [True, False], "deep": True}
    order = [0, 2, 1, 3]  # jax.tree.leaves order is b[0], b[1], deep.x, w: decayed first

    def groups(leaves):
        return [{"params": [leaves[t] for t in order[:2]]},
                {"params": [leaves[t] for t in order[2:]], "weight_decay": 0.0}]

    def array_steps(opt, leaves_grads):
        for g in leaves_grads:
            opt.step([g[t] for t in order])

    with jax.enable_x64(True):
        params, grads = _case("float64", seed=12, steps=10)
        per_step = [[np.array(x[t]) for x in jax.tree.leaves(grads)] for t in range(10)]
        tx = fjax.adamw(1e-2, weight_decay=0.1, mask=mask)
        want, _ = _run_step(tx, params, grads)
        p5, s5 = _run_step(tx, params, jax.tree.map(lambda g: g[:5], grads))
        saved = tx.state_dict(s5)
        assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2, 3]]
        assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
        _assert_equal(tx.load_state_dict(saved, p5), s5)
        fastopt.save(saved, tmp_path / "jax.npz")
        leaves = [np.array(p) for p in jax.tree.leaves(p5)]
        opt = fastopt.AdamW(groups(leaves))
        opt.load_state_dict(fastopt.load(tmp_path / "jax.npz"))
        array_steps(opt, per_step[5:])
        _assert_close(jax.tree.unflatten(jax.tree.structure(params), leaves), want, 10)
        # and back: five steps of the array API's, then five jitted ones
        leaves = [np.array(p) for p in jax.tree.leaves(params)]
        opt = fastopt.AdamW(groups(leaves), lr=1e-2, weight_decay=0.1)
        array_steps(opt, per_step[:5])
        state = tx.load_state_dict(opt.state_dict(), params)
        p10, _ = _run_step(tx, jax.tree.unflatten(jax.tree.structure(params),
                                                  [jnp.asarray(x) for x in leaves]),
                           jax.tree.map(lambda g: g[5:], grads), state)
        _assert_close(p10, want, 10)
        one_group = dict(saved, param_groups=[dict(saved["param_groups"][0],
                                                   params=[0, 1, 2, 3])])
        swapped = dict(saved, param_groups=saved["param_groups"][::-1])
        for wrong in (one_group, swapped):
            with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]: with mask "
                                                 r"this transformation numbers the parameters "
                                                 r"in the array API's param groups of \[2, 2\] "
                                                 r"parameters"):
                tx.load_state_dict(wrong, p5)
        # a mask that decays nothing: one group, of weight_decay 0
        none = fjax.adamw(1e-2, weight_decay=0.1, mask=False)
        _, s1 = _run_step(none, params, jax.tree.map(lambda g: g[:1], grads))
        groups = none.state_dict(s1)["param_groups"]
        assert [(g["params"], g["weight_decay"]) for g in groups] == [([0, 1, 2, 3], 0.0)]


@pytest.mark.parametrize("options", [dict(state_dtype="int8"), dict(master_weights=True),
                                     dict(cautious=True),
                                     dict(skip_nonfinite=True, max_grad_norm=1.0)],
                         ids=["int8", "master", "cautious", "skip-clip"])
def test_weight_decay_mask_is_the_array_apis_param_groups(options):
    """A weight-decay mask splits the kernel call by struct (and by 8-bit storage): 4 jitted
    steps equal, bit for bit, the array API's AdamW with the undecayed tensors in a group of
    weight_decay 0 after the decayed ones (state_dict's numbering, which the random bits of
    stochastic rounding follow, here not the leaves' order), on bfloat16 parameters."""
    from fastopt._interop import bfloat16
    dt = bfloat16()
    rng = np.random.default_rng(21)
    shapes = [(7,), (300, 250), (5000,), (40, 110)]
    mask = [False, True, False, True]
    params = [rng.standard_normal(sh).astype(np.float32).astype(dt) for sh in shapes]
    grads = [[rng.standard_normal(sh).astype(np.float32).astype(dt) for sh in shapes]
             for _ in range(4)]
    with jax.enable_x64(True):
        tx = fjax.adamw(1e-2, weight_decay=0.1, mask=mask, seed=3, **options)
        got = [jnp.asarray(p) for p in params]
        state = tx.init(got)
        step = jax.jit(tx.step)
        for g in grads:
            got, state = step(got, [jnp.asarray(x) for x in g], state)
    order = [1, 3, 0, 2]  # the decayed leaves, then the others
    want = [params[t].copy() for t in order]
    opt = fastopt.AdamW([{"params": want[:2]}, {"params": want[2:], "weight_decay": 0.0}],
                        lr=1e-2, weight_decay=0.1, seed=3, **options)
    for g in grads:
        opt.step([g[t] for t in order])
    for k, t in enumerate(order):
        np.testing.assert_array_equal(np.asarray(got[t]).view(np.uint8),
                                      want[k].view(np.uint8))


def test_nadam_without_nesterov_is_adam():
    """optax.nadam and nadamw are partials of adam and adamw with nesterov=True: their
    nesterov=False is the plain rule, and so is fastopt.jax's."""
    params, grads = _case("float32", seed=3, steps=5)
    for plain, nesterov in ((fjax.adam(1e-2), fjax.nadam(1e-2, nesterov=False)),
                            (fjax.adamw(1e-2, weight_decay=0.1),
                             fjax.nadamw(1e-2, weight_decay=0.1, nesterov=False))):
        _assert_equal(_run_step(nesterov, params, grads), _run_step(plain, params, grads))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hyper", [
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ("adam", dict(learning_rate=1e-2)),
    ("lion", dict(learning_rate=1e-3, weight_decay=0.1)),
    ("adopt", dict(learning_rate=1e-2)),
    ("ademamix", dict(learning_rate=1e-2, alpha=2.0, weight_decay=0.1)),
])
def test_cautious_matches_the_array_api(name, hyper, dtype):
    """cautious=True: 30 jitted steps (both paths, with skip_nonfinite's guard too) equal
    the array API's class with cautious=True (tested against timm's C-Optim), to rounding:
    the same count and step kernels, the step sizes and the factors computed in the
    parameters' dtype inside jit."""
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype, seed=12, steps=30)
        tx = getattr(fjax, name)(**hyper, cautious=True)
        runs = [_run_update(tx, params, grads), _run_step(tx, params, grads),
                _run_step(getattr(fjax, name)(**hyper, cautious=True, skip_nonfinite=True),
                          params, grads)]
        plain, _ = _run_step(getattr(fjax, name)(**hyper), params, grads)
        saved = tx.state_dict(tx.init(params))
    leaves = [np.array(p) for p in jax.tree.leaves(params)]
    opt = getattr(fastopt, {"adamw": "AdamW", "adam": "Adam", "lion": "Lion", "adopt": "ADOPT",
                            "ademamix": "AdEMAMix"}[name])(leaves)
    opt.load_state_dict(dict(saved, state={}))  # the hyperparameters, cautious=True
    assert opt.param_groups[0]["cautious"] is True
    for t in range(30):
        opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
    want = jax.tree.unflatten(jax.tree.structure(params), leaves)
    for got, _ in runs:
        _assert_close(got, want, 30)
    assert any(not np.allclose(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(plain), leaves))  # caution changed the run


@pytest.mark.parametrize("name, cls, extra", [("adamw", "AdamW", {}), ("lamb", "Lamb", {}),
                                               ("adamw", "AdamW", dict(cautious=True))],
                         ids=["adamw", "lamb", "adamw-cautious"])
def test_masks_are_the_array_apis(name, cls, extra):
    """masks (a pytree like params, None for a parameter left whole, passed to step and
    update): 12 jitted steps with max_grad_norm and skip_nonfinite equal the array API's
    masks= in float64 to rounding, pruned entries of the parameters and the state +0
    (through apply_updates too); a NaN gradient at a pruned entry counts as 0 (no skip),
    one at a kept entry skips the step. Cautious: a pruned entry counts as disagreeing."""
    with jax.enable_x64(True):
        params, grads = _case("float64", seed=13, steps=12)
        rng = np.random.default_rng(13)
        masks = {"w": jnp.asarray(rng.random((8, 5)) > 0.3), "b": [None, None],
                 "deep": {"x": jnp.asarray(rng.random((3, 2, 2)) > 0.5, jnp.uint8)}}
        keep_x = np.asarray(masks["deep"]["x"], bool)
        pruned_at = np.argwhere(~keep_x)[0]
        grads["deep"]["x"] = grads["deep"]["x"].at[(4, *pruned_at)].set(jnp.nan)  # no skip
        kept_at = np.argwhere(keep_x)[0]
        grads["deep"]["x"] = grads["deep"]["x"].at[(9, *kept_at)].set(jnp.inf)  # a skip
        tx = getattr(fjax, name)(1e-2, weight_decay=0.1, max_grad_norm=2.0,
                                 skip_nonfinite=True, **extra)

        def body_step(carry, g):
            p, s = carry
            return tx.step(p, g, s, masks), None

        def body_update(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p, masks=masks)
            return (optax.apply_updates(p, u), s), None
        runs = [jax.jit(lambda p, gs, b=body: jax.lax.scan(b, (p, tx.init(p)), gs)[0])(
            params, grads) for body in (body_step, body_update)]
    leaves = [np.array(p) for p in jax.tree.leaves(params)]
    mask_leaves = [None if m is None else np.asarray(m, bool)
                   for m in jax.tree.structure(params).flatten_up_to(masks)]
    opt = getattr(fastopt, cls)(leaves, lr=1e-2, weight_decay=0.1, max_grad_norm=2.0,
                                skip_nonfinite=True, masks=mask_leaves, **extra)
    for t in range(12):
        opt.step([np.array(g[t]) for g in jax.tree.leaves(grads)])
    want = jax.tree.unflatten(jax.tree.structure(params), leaves)
    for got, state in runs:
        _assert_close(got, want, 12)
        assert int(state.count) == 11  # one step skipped
        for p, m, e in zip(jax.tree.leaves(got), mask_leaves, jax.tree.leaves(state.exp_avg)):
            if m is not None:
                p, e = np.asarray(p)[~m], np.asarray(e)[~m]
                assert (p == 0).all() and not np.signbit(p).any() and (e == 0).all()


def test_cautious_masks_in_storage_formats_are_the_array_apis():
    """Pruning masks with the cautious option on bfloat16 parameters and 8-bit state (the
    count pass loads the formats block by block and skips the pruned entries): 4 jitted
    steps equal the array API's bit for bit."""
    from fastopt._interop import bfloat16
    dt = bfloat16()
    rng = np.random.default_rng(16)
    shapes = [(300, 250), (7,)]
    params = [rng.standard_normal(sh).astype(np.float32).astype(dt) for sh in shapes]
    masks = [rng.random(sh) > 0.3 for sh in shapes]
    grads = [[rng.standard_normal(sh).astype(np.float32) for sh in shapes] for _ in range(4)]
    with jax.enable_x64(True):
        tx = fjax.adamw(1e-2, weight_decay=0.1, cautious=True, state_dtype="int8", seed=7)
        got = [jnp.asarray(x) for x in params]
        state = tx.init(got)
        step = jax.jit(tx.step)
        for g in grads:
            got, state = step(got, [jnp.asarray(x) for x in g], state,
                              [jnp.asarray(m) for m in masks])
    want = [x.copy() for x in params]
    opt = fastopt.AdamW(want, lr=1e-2, weight_decay=0.1, cautious=True, state_dtype="int8",
                        seed=7, masks=masks)
    for g in grads:
        opt.step(g)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("masks, error, match", [
    ([True], ValueError, "masks: expected the tree structure of params"),
    ({"w": jnp.ones((2, 2), bool), "b": [None]}, ValueError,
     r"masks\['w'\]: expected the shape of params\['w'\], \(2, 3\), got \(2, 2\)"),
    ({"w": jnp.ones((2, 3), jnp.float32), "b": [None]}, TypeError,
     r"masks\['w'\]: expected a bool or uint8 array, got float32"),
])
def test_bad_masks(masks, error, match):
    tx = fjax.adam(1e-3)
    with pytest.raises(error, match=match):
        tx.step(PARAMS, PARAMS, tx.init(PARAMS), masks)


@pytest.mark.parametrize("factory, mask, error, match", [
    ("adamw", {"w": True}, ValueError,
     r"mask: expected a pytree of bools shaped as the parameters \(or a prefix of them\)"),
    ("lion", {"w": True, "b": [True, False]}, ValueError, "mask: expected a pytree of bools"),
    ("lamb", {"w": 0.5, "b": True}, TypeError, r"mask: expected Python bools .* got 0.5"),
    ("adadelta", lambda p: jax.tree.map(lambda x: jnp.ones(x.shape, bool), p), TypeError,
     "weight_decay_mask: expected Python bools"),
    ("adan", {"w": None, "b": True}, ValueError, "mask: expected a pytree of bools"),
])
def test_bad_weight_decay_masks(factory, mask, error, match):
    """optax's weight-decay mask is checked against the parameters by init (and by each
    step): a structure that is not theirs (nor a prefix), leaves that are not bools."""
    name = "weight_decay_mask" if factory == "adadelta" else "mask"
    tx = getattr(fjax, factory)(1e-3, **{name: mask})
    with pytest.raises(error, match=match):
        tx.init(PARAMS)
    state = getattr(fjax, factory)(1e-3).init(PARAMS)  # the same state, without the mask
    with pytest.raises(error, match=match):
        jax.jit(tx.step)(PARAMS, PARAMS, state)


@pytest.mark.parametrize("name, hyper", [CONFIGS[2], CONFIGS[5], CONFIGS[11], CONFIGS[18]],
                         ids=["adamw", "sgd_momentum", "adadelta", "ademamix"])
def test_maximize_and_max_grad_value_act_on_the_gradients(name, hyper):
    """maximize=True is the step on the negated gradients, max_grad_value the step on the
    clamped ones (torch's clip_grad_value_): bit for bit, over 10 jitted steps."""
    params, grads = _case("float32", seed=14, steps=10)
    got, _ = _run_step(getattr(fjax, name)(**hyper, maximize=True, max_grad_value=0.5),
                       params, grads)
    want, _ = _run_step(getattr(fjax, name)(**hyper), params,
                        jax.tree.map(lambda g: -jnp.clip(g, -0.5, 0.5), grads))
    _assert_equal(got, want)


@pytest.mark.parametrize("master", [False, True], ids=["", "master"])
@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "rne"])
@pytest.mark.parametrize("name, hyper, cls, chyper, param, grad, state", [
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1), "AdamW",
     dict(lr=1e-2, weight_decay=0.1), "bfloat16", "bfloat16", None),
    ("sgd", dict(learning_rate=1e-2, momentum=0.9), "SGD", dict(lr=1e-2, momentum=0.9),
     "float16", "float32", None),
    ("lion", dict(learning_rate=1e-3), "Lion", dict(lr=1e-3, weight_decay=1e-3), "bfloat16",
     "bfloat16", "bfloat16"),
    ("adam", dict(learning_rate=1e-2), "Adam", dict(lr=1e-2), "float32", "float32",
     "bfloat16"),
    ("adadelta", dict(learning_rate=0.5, weight_decay=0.01), "Adadelta",
     dict(lr=0.5, weight_decay=0.01), "bfloat16", "float32", None),
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1), "AdamW",
     dict(lr=1e-2, weight_decay=0.1), "bfloat16", "float32", "int8"),
    ("sgd", dict(learning_rate=1e-2, momentum=0.9), "SGD", dict(lr=1e-2, momentum=0.9),
     "float32", "float32", "int8"),
    ("rmsprop", dict(learning_rate=1e-2, eps_in_sqrt=False, centered=True), "RMSprop",
     dict(lr=1e-2, alpha=0.9, centered=True), "bfloat16", "float32", "int8"),
    # the cautious option: its count and its step read the formats
    ("adamw", dict(learning_rate=1e-2, weight_decay=0.1, cautious=True), "AdamW",
     dict(lr=1e-2, weight_decay=0.1, cautious=True), "bfloat16", "float32", "int8"),
    ("lion", dict(learning_rate=1e-3, cautious=True), "Lion",
     dict(lr=1e-3, weight_decay=1e-3, cautious=True), "bfloat16", "bfloat16", "bfloat16"),
    ("ademamix", dict(learning_rate=1e-2, alpha=2.0, cautious=True), "AdEMAMix",
     dict(lr=1e-2, alpha=2.0, cautious=True), "float16", "float32", None),
])
def test_low_precision_is_the_array_apis(name, hyper, cls, chyper, param, grad, state,
                                         stochastic, master):
    """bfloat16 / float16 parameters (with gradients of their dtype or float32) and
    bfloat16 or 8-bit state, with and without master weights: 6 jitted steps equal the
    array API's storage formats with the same seed bit for bit, the master weights and the
    block scales too, stochastic rounding and round-to-nearest alike (x64 on, so that the
    step sizes are computed in float64 as on the host). Float32 parameters keep no master
    weights; with 8-bit state the tensors under 4096 elements keep float32 state."""
    from fastopt._interop import bfloat16
    dtypes = {"bfloat16": bfloat16(), "float16": np.dtype(np.float16),
              "float32": np.dtype(np.float32)}
    dt = dtypes[param]
    rng = np.random.default_rng(15)
    shapes = [(300, 250), (7,), ()]
    params = [rng.standard_normal(sh).astype(np.float32).astype(dt) for sh in shapes]
    grads = [[rng.standard_normal(sh).astype(np.float32) for sh in shapes] for _ in range(6)]
    grads = [[g.astype(dtypes[grad]) for g in gs] for gs in grads]
    with jax.enable_x64(True):
        tx = getattr(fjax, name)(**hyper, state_dtype=state, stochastic_rounding=stochastic,
                                 master_weights=master, seed=7)
        got, opt_state = [jnp.asarray(x) for x in params], None
        opt_state = tx.init(got)
        step = jax.jit(tx.step)
        for g in grads:
            got, opt_state = step(got, [jnp.asarray(x) for x in g], opt_state)
    want = [x.copy() for x in params]
    opt = getattr(fastopt, cls)(want, **chyper, state_dtype=state,
                                stochastic_rounding=stochastic, master_weights=master, seed=7)
    for g in grads:
        opt.step(g)
    for x, y in zip(got, want):
        assert x.dtype == dt
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                      y.reshape(-1).view(np.uint8))
    with jax.enable_x64(True):  # the update path: the updates and apply_updates' sum are
        # rounded to the parameters' dtype too, where a parameter moves by more than half its
        # magnitude: within one rounding of the largest parameter
        via_update, _ = _run_update(tx, [jnp.asarray(x) for x in params],
                                    [jnp.stack([jnp.asarray(g[k]) for g in grads])
                                     for k in range(len(shapes))])
    for x, y in zip(via_update, want):
        y = y.astype(np.float32)
        np.testing.assert_allclose(np.asarray(x, np.float32), y, rtol=0,
                                   atol=np.finfo(dt).eps * np.max(np.abs(y)))
    has_master = master and param != "float32"
    assert (opt_state.master_param is not None) == has_master
    assert all(("master_param" in opt.state[k]) == has_master for k in range(len(shapes)))
    assert (opt_state.absmax is not None) == (state == "int8")
    stored = {"bfloat16": bfloat16(), "int8": np.dtype(np.uint8), None: np.float32}[state]
    for field in opt_state._fields[1:]:
        if getattr(opt_state, field) is None or field == "absmax":
            continue
        for k, leaf in enumerate(getattr(opt_state, field)):
            want = (stored if field != "master_param" and (state != "int8" or leaf.size >= 4096)
                    else np.float32)
            assert leaf.dtype == want
            np.testing.assert_array_equal(
                np.asarray(leaf).reshape(-1).view(np.uint8),
                np.asarray(opt.state[k][field]).reshape(-1).view(np.uint8))
    for name, scales in (opt_state.absmax or {}).items():
        for k, leaf in enumerate(scales):
            if leaf.size:
                np.testing.assert_array_equal(leaf, opt.state[k][name + "_absmax"])
            else:
                assert shapes[k] != (300, 250) and name + "_absmax" not in opt.state[k]


def test_low_precision_state_dict_round_trip():
    """A bfloat16 run's state (float32 arrays) and a bfloat16 state_dtype's come back from
    state_dict through load_state_dict as they were, and an empty one as init's."""
    params = [jnp.asarray(np.linspace(-1, 1, 9), jnp.bfloat16)]
    grads = [jnp.full(9, 0.5, jnp.bfloat16)]
    for tx, state_dtype in ((fjax.adamw(1e-2), jnp.float32),
                            (fjax.adamw(1e-2, state_dtype="bfloat16"), jnp.bfloat16)):
        _, state = jax.jit(tx.step)(params, grads, tx.init(params))
        back = tx.load_state_dict(tx.state_dict(state), params)
        assert back.exp_avg[0].dtype == state_dtype
        _assert_equal(back, state)
        _assert_equal(tx.load_state_dict({"state": {}}, params), tx.init(params))


def test_master_weights_in_place_resume_and_errors():
    """Master weights: the donated step updates the bfloat16 parameters, their float32
    copies and the state in place, with no copy in the compiled program; the copies are
    init's parameters in float32, round to the parameters at every step (to nearest by
    default), go through state_dict to the array API and back, and a skipped step leaves
    them. A state without them, or with them where none are kept, is refused."""
    rng = np.random.default_rng(21)
    params = {"big": jnp.asarray(rng.standard_normal((300, 250)), jnp.bfloat16),
              "small": jnp.asarray(rng.standard_normal(7), jnp.bfloat16)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                          params) for _ in range(4)]
    tx = fjax.adamw(1e-2, weight_decay=0.1, master_weights=True, skip_nonfinite=True)
    state = tx.init(params)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(state.master_param)):
        assert m.dtype == jnp.float32
        np.testing.assert_array_equal(m, np.asarray(p, np.float32))
    step = jax.jit(tx.step, donate_argnums=(0, 2))
    text = step.lower(params, grads[0], state).compile().as_text()
    assert not re.search(r"\scopy(-start)?\(", text), text
    want = jax.tree.map(jnp.copy, (params, state))
    for g in grads[:2]:
        want = jax.jit(tx.step)(want[0], g, want[1])
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
    for g in grads[:2]:
        params, state = step(params, g, state)
        assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))] == buffers
    _assert_equal((params, state), want)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(state.master_param)):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    # a step with a NaN gradient changes nothing, the copies neither
    bad = jax.tree.map(lambda g: g.at[0].set(np.nan), grads[2])
    _assert_equal(jax.jit(tx.step)(params, bad, state), (params, state))
    # to the array API and back: both continue alike
    saved = tx.state_dict(state)
    assert saved["state"][0]["master_param"].dtype == np.float32
    arrays = [np.array(x) for x in jax.tree.leaves(params)]
    twin = fastopt.AdamW(arrays, lr=1e-2, weight_decay=0.1, master_weights=True,
                         skip_nonfinite=True)
    twin.load_state_dict(saved)
    twin.step([np.asarray(g) for g in jax.tree.leaves(grads[3])])
    back = tx.load_state_dict(twin.state_dict(), params)
    _assert_equal(back.master_param, jax.tree.map(
        np.asarray, jax.tree.unflatten(jax.tree.structure(params),
                                       [twin.state[k]["master_param"] for k in range(2)])))
    with jax.enable_x64(True):  # the step sizes in float64, as on the host
        resumed, _ = jax.jit(tx.step)(params, grads[3], state)
    for a, b in zip(jax.tree.leaves(resumed), arrays):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))
    with jax.enable_x64(True):  # and from the loaded state, one more step each: the same
        again, _ = jax.jit(tx.step)(resumed, grads[0], back)
    twin.step([np.asarray(g) for g in jax.tree.leaves(grads[0])])
    for a, b in zip(jax.tree.leaves(again), arrays):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))
    # a checkpoint with copies does not load into a transformation that would drop them
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]: 'master_param' kept by "
                       "the saving optimizer"):
        fjax.adamw(1e-2, weight_decay=0.1).load_state_dict(saved, params)
    # not stepped yet: the parameters' copies, as init's
    _assert_equal(tx.load_state_dict({"state": {}}, params).master_param,
                  tx.init(params).master_param)
    with pytest.raises(ValueError, match="state.master_param: expected the float32 copies of "
                       "the bfloat16 parameters"):
        tx.step(params, grads[0], fjax.adamw(1e-2).init(params))
    with pytest.raises(ValueError, match="state.master_param: expected None"):
        fjax.adamw(1e-2).step(params, grads[0], state)
    with pytest.raises(TypeError, match="master_weights must be"):
        fjax.sgd(1e-2, master_weights="yes")
    assert "master_weights=True" in repr(tx.update.__self__)


@pytest.mark.parametrize("name, hyper, cls, chyper", [
    ("adam", dict(learning_rate=1e-2), "Adam", dict(lr=1e-2)),
    ("lion", dict(learning_rate=1e-3), "Lion", dict(lr=1e-3, weight_decay=1e-3)),
    ("adamax", dict(learning_rate=1e-2), "Adamax", dict(lr=1e-2)),
    ("adadelta", dict(learning_rate=0.5), "Adadelta", dict(lr=0.5)),
    ("adopt", dict(learning_rate=1e-2), "ADOPT", dict(lr=1e-2)),
    ("ademamix", dict(learning_rate=1e-2), "AdEMAMix", dict(lr=1e-2, alpha=5.0)),
    ("adan", dict(learning_rate=1e-2), "Adan", dict(lr=1e-2)),
    ("rprop", dict(learning_rate=1e-2), "Rprop", dict(lr=1e-2)),
    ("asgd", dict(learning_rate=1e-2), "ASGD", dict(lr=1e-2)),
    ("schedule_free_adamw", dict(learning_rate=1e-2, warmup_steps=2), "AdamWScheduleFree",
     dict(lr=1e-2, warmup_steps=2)),
    ("schedule_free_sgd", dict(learning_rate=1e-2), "SGDScheduleFree", dict(lr=1e-2)),
])
def test_8bit_state_is_the_array_apis(name, hyper, cls, chyper):
    """state_dtype="int8" on every rule that has it: 5 jitted steps (bfloat16 parameters
    with master weights) equal the array API's bit for bit, codes and block scales
    included; init's codes are the array API's first-step ones (the state's fill, or the
    parameters for Schedule-Free's z, quantized as its quantizer does); a state dict goes
    to the array API, which continues the run, and back."""
    rng = np.random.default_rng(23)
    shapes = [(70001,), (64, 70), (9,)]
    params = [rng.standard_normal(sh).astype(np.float32).astype(jnp.bfloat16) for sh in shapes]
    grads = [[rng.standard_normal(sh).astype(np.float32) for sh in shapes] for _ in range(6)]
    with jax.enable_x64(True):
        tx = getattr(fjax, name)(**hyper, state_dtype="int8", master_weights=True, seed=2)
        got = [jnp.asarray(x) for x in params]
        state = tx.init(got)
        step = jax.jit(tx.step, donate_argnums=(0, 2))
        for g in grads[:5]:
            got, state = step(got, [jnp.asarray(x) for x in g], state)
    want = [np.array(x) for x in params]
    opt = getattr(fastopt, cls)(want, **chyper, state_dtype="int8", master_weights=True,
                                seed=2)
    for g in grads[:5]:
        opt.step(g)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))
    names = tx.update.__self__.kernel.state
    for field in names:
        for k, leaf in enumerate(getattr(state, field)):
            assert leaf.dtype == (np.uint8 if k < 2 else np.float32)
            np.testing.assert_array_equal(np.asarray(leaf).view(np.uint8),
                                          np.asarray(opt.state[k][field]).view(np.uint8))
            scales = state.absmax[field][k]
            if k < 2:
                np.testing.assert_array_equal(scales, opt.state[k][field + "_absmax"])
            else:
                assert scales.shape == (0,)
    saved = tx.state_dict(state)
    assert set(saved["state"][0]) >= {f + "_absmax" for f in names}
    assert not any(k.endswith("_absmax") for k in saved["state"][2])
    twin = getattr(fastopt, cls)([np.array(x) for x in got], **chyper, state_dtype="int8",
                                 master_weights=True, seed=2)
    twin.load_state_dict(saved)
    twin.step(grads[5])
    opt.step(grads[5])
    for a, b in zip(twin.params(), opt.params()):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    if name.startswith("schedule_free"):  # the evaluation point from the 8-bit z
        with jax.enable_x64(True):
            x = jax.jit(fjax.schedule_free_eval_params)(state, got)
        twin.load_state_dict(saved)
        twin.eval()
        for a, b in zip(x, twin.params()):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))
        twin.train()
        twin.step(grads[5])
    back = tx.load_state_dict(twin.state_dict(), got)
    for field in names:
        for k in range(2):
            np.testing.assert_array_equal(back.absmax[field][k], opt.state[k][field + "_absmax"])
            np.testing.assert_array_equal(getattr(back, field)[k], opt.state[k][field])


def test_8bit_state_init_skip_and_errors():
    """8-bit state: init's codes and scales are those of the state's fill quantized (the
    array API's first step makes the same); a skipped step leaves codes and scales; the
    wrong state (another format, missing scales) and float64 parameters are refused with
    the argument named; repr says int8."""
    params = {"w": jnp.ones((80, 60)), "b": jnp.zeros(3)}
    tx = fjax.adamw(1e-2, state_dtype="int8", skip_nonfinite=True)
    assert "state_dtype='int8'" in repr(tx.update.__self__)
    with pytest.raises(ValueError, match="state_dtype: expected None, 'float32', 'bfloat16' "
                       "or 'int8'"):
        fjax.adamw(1e-2, state_dtype=np.int8)  # blockwise 8 bits by name only
    state = tx.init(params)
    assert state.exp_avg["w"].dtype == jnp.uint8 and state.exp_avg["b"].dtype == jnp.float32
    assert state.absmax["exp_avg"]["w"].shape == (19,)  # ceil(4800 / 256)
    assert state.absmax["exp_avg"]["b"].shape == (0,)
    from fastopt._backends import _formats
    codes = np.empty(4800, np.uint8)
    absmax = np.empty(19, np.float32)
    _formats.q8_store(codes, absmax, np.zeros(4800, np.float32), _formats.Q8U)
    np.testing.assert_array_equal(state.exp_avg_sq["w"].reshape(-1), codes)
    np.testing.assert_array_equal(state.absmax["exp_avg_sq"]["w"], absmax)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    _, state = jax.jit(tx.step)(params, grads, state)
    bad = jax.tree.map(lambda g: g.at[0].set(np.nan), grads)
    _assert_equal(jax.jit(tx.step)(params, bad, state), (params, state))
    # init's quantizer is the array API's, NaN (a whole block's scale) and inf included
    from fastopt.jax import _q8_quantize
    values = np.random.default_rng(24).standard_normal(1000).astype(np.float32)
    values[[3, 700]] = np.nan, np.inf
    values[300:330] = -0.0
    for code in (_formats.Q8S, _formats.Q8U):
        codes, absmax = np.empty(1000, np.uint8), np.empty(4, np.float32)
        with np.errstate(invalid="ignore"):  # the NaN block
            _formats.q8_store(codes, absmax, values, code)
        got_codes, got_absmax = jax.jit(_q8_quantize, static_argnums=1)(values, code)
        np.testing.assert_array_equal(got_codes, codes)
        np.testing.assert_array_equal(got_absmax, absmax)
    with pytest.raises(ValueError, match="state.absmax: expected a dict of the block scales"):
        tx.step(params, grads, state._replace(absmax=None))
    with pytest.raises(ValueError, match="state.absmax: expected None"):
        fjax.adamw(1e-2).step(params, grads, state)
    with pytest.raises(TypeError, match=r"state.exp_avg\['w'\]: expected uint8"):
        tx.step(params, grads, fjax.adamw(1e-2).init(params)._replace(absmax=state.absmax))
    with pytest.raises(ValueError, match=r"state.absmax\['exp_avg'\]\['w'\]: expected "
                       r"float32 of shape \(19,\)"):
        tx.step(params, grads, state._replace(absmax={**state.absmax, "exp_avg": {
            "w": jnp.ones(18, jnp.float32), "b": jnp.zeros(0, jnp.float32)}}))
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[1\]\['exp_avg'\]: "
                       r"expected int8 \(uint8 codes\)"):
        tx.load_state_dict(fjax.adamw(1e-2).state_dict(
            jax.jit(fjax.adamw(1e-2).step)(params, grads, fjax.adamw(1e-2).init(params))[1]),
            params)
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="state_dtype='int8': for float32"):
            tx.init({"w": jnp.ones(3, jnp.float64)})


def test_schedule_free_master_weights_evaluate_the_copies():
    """Schedule-Free with master weights: the jitted steps are the array API's bit for bit,
    and the evaluation point is computed from the float32 copies, as AdamWScheduleFree's
    eval() computes it."""
    rng = np.random.default_rng(22)
    shapes = [(40, 30), (5,)]
    params = [rng.standard_normal(sh).astype(np.float32).astype(jnp.bfloat16) for sh in shapes]
    grads = [[rng.standard_normal(sh).astype(np.float32) for sh in shapes] for _ in range(5)]
    with jax.enable_x64(True):
        tx = fjax.schedule_free_adamw(1e-2, warmup_steps=2, master_weights=True)
        got = [jnp.asarray(x) for x in params]
        state = tx.init(got)
        for g in grads:
            got, state = jax.jit(tx.step)(got, [jnp.asarray(x) for x in g], state)
        x = jax.jit(fjax.schedule_free_eval_params)(state, got)
    want = [np.array(x) for x in params]
    opt = fastopt.AdamWScheduleFree(want, lr=1e-2, warmup_steps=2, master_weights=True)
    for g in grads:
        opt.step(g)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))
    opt.eval()
    for a, b in zip(x, opt.params()):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("name, hyper, cls, chyper, state, pass_params", [
    ("sgd", dict(learning_rate=1e-2, momentum=0.9), "SGD", dict(lr=1e-2, momentum=0.9),
     None, True),
    ("lion", dict(learning_rate=1e-3), "Lion", dict(lr=1e-3, weight_decay=1e-3), "bfloat16",
     False),
])
def test_stochastic_rounding_step_moves_with_the_run(name, hyper, cls, chyper, state,
                                                     pass_params):
    """SGD and Lion keep no step count, but stochastic rounding counts steps: state_dict
    writes the count where the array API keeps it (bfloat16 parameters, given with
    `params`, or bfloat16 state), so a run moved to the array API continues with the
    same random bits, and back."""
    rng = np.random.default_rng(25)
    params = [jnp.asarray(rng.standard_normal((90, 70)), jnp.bfloat16)]
    grads = [[rng.standard_normal((90, 70)).astype(np.float32)] for _ in range(5)]
    with jax.enable_x64(True):
        tx = getattr(fjax, name)(**hyper, state_dtype=state, seed=4)
        got, st = params, tx.init(params)
        for g in grads[:3]:
            got, st = jax.jit(tx.step)(got, g, st)
        saved = tx.state_dict(st, got if pass_params else None)
        assert saved["state"][0]["step"] == 3
        twin = getattr(fastopt, cls)([np.array(got[0])], **chyper, state_dtype=state, seed=4)
        twin.load_state_dict(saved)
        twin.step(grads[3])
        got, st = jax.jit(tx.step)(got, grads[3], st)
        np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint16),
                                      twin.params()[0].view(np.uint16))
        back = tx.load_state_dict(twin.state_dict(), got)
        assert int(back.count) == 4
        again, _ = jax.jit(tx.step)(got, grads[4], back)
    twin.step(grads[4])
    np.testing.assert_array_equal(np.asarray(again[0]).view(np.uint16),
                                  twin.params()[0].view(np.uint16))
    if pass_params:  # without the parameters, float32 state does not show the rounding
        assert "step" not in tx.state_dict(st)["state"][0]


def test_stochastic_rounding_does_not_stall():
    """200 Adam steps of lr 1e-4 on bfloat16 weights of magnitude about 1: rounding to
    nearest leaves them where they were (every update is below half an ulp), stochastic
    rounding moves them as far as the float64 computation, on average."""
    rng = np.random.default_rng(16)
    w = jnp.asarray(rng.uniform(1.0, 1.5, 4096), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.0, 4096), jnp.float32)  # a steady descent direction
    grads = jax.tree.map(lambda x: jnp.broadcast_to(x, (200,) + x.shape), [g])
    moved = {}
    for sr in (True, False):
        p, _ = _run_step(fjax.adam(1e-4, stochastic_rounding=sr), [w], grads)
        moved[sr] = float(jnp.mean(w.astype(jnp.float32) - p[0].astype(jnp.float32)))
    with jax.enable_x64(True):
        ref, _ = _run_step(fjax.adam(1e-4), [w.astype(jnp.float64)],
                           jax.tree.map(lambda x: x.astype(jnp.float64), grads))
        reference = float(jnp.mean(w.astype(jnp.float64) - ref[0]))
    assert moved[False] == 0.0
    assert reference == pytest.approx(0.02, rel=0.05)
    assert moved[True] == pytest.approx(reference, rel=0.1)


def test_n_threads_gives_the_same_bits():
    params, grads = _case("float32", seed=7, steps=3)
    params["big"], grads["big"] = jnp.ones(100003), jnp.full((3, 100003), 0.25)
    one, _ = _run_step(fjax.adam(1e-2, n_threads=1), params, grads)
    two, _ = _run_step(fjax.adam(1e-2, n_threads=2), params, grads)
    _assert_equal(one, two)


# -- jax transformations -----------------------------------------------------------------------

def test_vmap_over_param_sets():
    """vmap over a batch of parameter sets (the FFI call runs once per member) gives each
    member what separate calls give: its own clipping coefficient and state."""
    tx = fjax.adamw(optax.linear_schedule(1e-2, 1e-3, 5), weight_decay=0.1, max_grad_norm=1.0)
    # batches of 3 members: stacked parameters and gradients
    params, grads = _case("float32", seed=8, steps=3)[1], _case("float32", seed=9, steps=3)[1]
    step = jax.jit(jax.vmap(tx.step))
    got = params, jax.vmap(tx.init)(params)
    for _ in range(2):
        got = step(got[0], grads, got[1])
    for k in range(3):
        member, g = jax.tree.map(lambda x: x[k], (params, grads))
        want = member, tx.init(member)
        for _ in range(2):
            want = tx.step(want[0], g, want[1])
        _assert_equal(jax.tree.map(lambda x: x[k], got), want)


@pytest.mark.parametrize("path", ["step", "update"])
def test_differentiating_a_step_says_why_not(path):
    tx = fjax.sgd(0.1)
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
    state = tx.init(params)

    def after(p):
        if path == "step":
            return tx.step(p, grads, state)[0]
        return optax.apply_updates(p, tx.update(grads, state, p)[0])

    with pytest.raises(ValueError, match="fastopt.jax.sgd: an optimizer step cannot be "
                                         "differentiated .* use optax.sgd"):
        jax.grad(lambda p: jnp.sum(after(p)["w"]))(params)
    # gradients that do not flow through the step are fine
    value = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(tx.step(params, grads, state)[0]
                                                            ["w"]))(params)
    np.testing.assert_array_equal(np.asarray(value["w"]), [2.0, 2.0, 2.0])


def test_no_parameters():
    tx = fjax.adam(1e-3)
    params, state = jax.jit(tx.step)({}, {}, tx.init({}))
    assert params == {} and int(state.count) == 1


_SHARDED = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import fastopt.jax as fjax

assert len(jax.devices()) == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("d",))
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}
grads = jax.tree.map(lambda x: 3 * x + 1, params)  # a norm of about 30: clipping acts


def same(got, want, exact=True):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:  # the norm's sum in another order: a rounding of the clip coefficient
            np.testing.assert_allclose(g, w, rtol=4e-7, atol=4e-7)


for clip in (None, 1.0):
    tx = fjax.adamw(1e-2, weight_decay=0.1, max_grad_norm=clip)
    state = tx.init(params)
    want = jax.jit(tx.step)(params, grads, state)
    # FSDP-like: w sharded over d, b replicated
    spec = {"w": P("d"), "b": P()}
    put = lambda t, s: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, s)
    sp, sg = put(params, spec), put(grads, spec)
    ss = tx.init(sp)
    same(jax.jit(tx.step)(sp, sg, ss), want)  # plain jit on sharded arrays
    state_spec = fjax.AdamState(count=P(), exp_avg=spec, exp_avg_sq=spec)
    local = jax.jit(shard_map(tx.step, mesh=mesh, in_specs=(spec, spec, state_spec),
                              out_specs=(spec, state_spec)))
    got = local(sp, sg, ss)
    same(got, want, exact=clip is None)
    assert got[0]["w"].sharding.spec == P("d")  # each device updated its own shard
    # data parallel: replicated parameters, each device's gradient of its half of the batch,
    # averaged with pmean before the step (then the norm counts each gradient once)
    halves = jax.tree.map(lambda g: jnp.stack([g - 0.5, g + 0.5]), grads)

    def data_parallel(p, g, s):
        g = jax.lax.pmean(jax.tree.map(lambda x: x[0], g), "d")
        return tx.step(p, g, s)
    rep = {"w": P(), "b": P()}
    dp = jax.jit(shard_map(data_parallel, mesh=mesh,
                           in_specs=(rep, {"w": P("d"), "b": P("d")},
                                     fjax.AdamState(count=P(), exp_avg=rep, exp_avg_sq=rep)),
                           out_specs=(rep, fjax.AdamState(count=P(), exp_avg=rep,
                                                          exp_avg_sq=rep))))
    mean = jax.tree.map(lambda h: (h[0] + h[1]) / 2, halves)  # pmean's sum, then division
    same(dp(params, halves, state), jax.jit(tx.step)(params, mean, state), exact=clip is None)

spec = {"w": P("d"), "b": P()}
put = lambda t, s: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, s)
g2 = {"w": jnp.concatenate([jnp.ones((4, 6)), -0.05 * jnp.ones((4, 6))]), "b": grads["b"]}


def sharded_steps_match(tx, state_spec, skips=False):
    # two steps under shard_map (w sharded, b replicated) equal two under plain jit, to
    # rounding (their sums are reduced in another order); with skip_nonfinite, between them
    # a step with a NaN in the second device's shard, which both skip
    steps = (grads, g2)
    if skips:
        steps = (grads, dict(g2, w=g2["w"].at[6, 1].set(jnp.nan)), g2)
    want = params, tx.init(params)
    for g in steps:
        want = jax.jit(tx.step)(*want[:1], g, want[1])
    local = jax.jit(shard_map(tx.step, mesh=mesh, in_specs=(spec, spec, state_spec),
                              out_specs=(spec, state_spec)))
    got = put(params, spec), tx.init(put(params, spec))
    for g in steps:
        got = local(got[0], put(g, spec), got[1])
    same(got, want, exact=False)
    assert int(got[1].count) == 2


# cautious: each tensor's factor from its count and size over the whole mesh
state_spec = fjax.AdamState(count=P(), exp_avg=spec, exp_avg_sq=spec)
sharded_steps_match(fjax.adam(1e-2, cautious=True), state_spec)
# skip_nonfinite: the kernel's results and the skipped step's agree in their mesh axes
sharded_steps_match(fjax.adamw(1e-2, skip_nonfinite=True), state_spec, skips=True)
sharded_steps_match(fjax.prodigy(skip_nonfinite=True), fjax.ProdigyState(
    count=P(), d=P(), d_max=P(), d_numerator=P(), d_hat=P(), d_denom=P(), s=spec, p0=spec,
    exp_avg=spec, exp_avg_sq=spec), skips=True)
# Lamb: each tensor's trust ratio from its norms over the whole mesh
sharded_steps_match(fjax.lamb(1e-2, weight_decay=0.1), state_spec)
# Prodigy: the sums behind d over the whole mesh
sharded_steps_match(fjax.prodigy(weight_decay=0.01), fjax.ProdigyState(
    count=P(), d=P(), d_max=P(), d_numerator=P(), d_hat=P(), d_denom=P(), s=spec, p0=spec,
    exp_avg=spec, exp_avg_sq=spec))

# Muon: a matrix sharded under shard_map is refused (the iteration needs whole matrices)
tx = fjax.muon(1e-2)
muon_spec = fjax.MuonState(count=P(), momentum_buffer={"w": P("d"), "b": None},
                           exp_avg={"w": None, "b": P()}, exp_avg_sq={"w": None, "b": P()})
try:
    jax.jit(shard_map(tx.step, mesh=mesh, in_specs=(spec, spec, muon_spec),
                      out_specs=(spec, muon_spec)))(put(params, spec), put(grads, spec),
                                                    tx.init(params))
except ValueError as e:
    assert "the orthogonalization needs the whole matrix" in str(e), e
else:
    raise AssertionError("a sharded matrix under shard_map was not refused")
same(jax.jit(tx.step)(put(params, spec), put(grads, spec), tx.init(params)),
     jax.jit(tx.step)(params, grads, tx.init(params)), exact=False)
# replicated matrices, a sharded vector, skip_nonfinite
tx = fjax.muon(1e-2, skip_nonfinite=True)
muon_spec = fjax.MuonState(count=P(), momentum_buffer={"w": P(), "b": None},
                           exp_avg={"w": None, "b": P("d")}, exp_avg_sq={"w": None, "b": P("d")})
vec = {"w": P(), "b": P("d")}
local = jax.jit(shard_map(tx.step, mesh=mesh, in_specs=(vec, vec, muon_spec),
                          out_specs=(vec, muon_spec)))
same(local(put(params, vec), put(grads, vec), tx.init(params)),
     jax.jit(tx.step)(params, grads, tx.init(params)), exact=False)

def refused(tx, p, state_spec, message):
    try:
        jax.jit(shard_map(tx.step, mesh=mesh, in_specs=(spec, spec, state_spec),
                          out_specs=(spec, state_spec)))(put(p, spec), put(p, spec),
                                                         tx.init(put(p, spec)))
    except ValueError as e:
        assert message in str(e), e
    else:
        raise AssertionError(f"not refused: {message}")


# stochastic rounding of a sharded parameter is refused, not wrong
refused(fjax.adamw(1e-2), jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
        fjax.AdamState(count=P(), exp_avg=spec, exp_avg_sq=spec),
        "stochastic rounding of parameters sharded under shard_map")
# and so is 8-bit state
refused(fjax.adamw(1e-2, state_dtype="int8"), params,
        fjax.AdamState(count=P(), exp_avg=spec, exp_avg_sq=spec,
                       absmax={"exp_avg": spec, "exp_avg_sq": spec}),
        "state_dtype='int8' for parameters sharded under shard_map")
print("ok")
"""


def test_sharded_arrays_and_shard_map():
    """On a CPU mesh of 2 host devices (its own process: the device count is fixed when
    jax starts): plain jit on sharded arrays gives the unsharded step's bits; under
    shard_map each device updates its shard, with max_grad_norm's norm summed over the
    mesh for sharded gradients and counted once for replicated ones (FSDP-like and data
    parallel layouts), and so are the cautious option's counts and Lamb's norms."""
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, kwargs, error, match", [
    ("adam", dict(learning_rate=-0.1), ValueError,
     r"learning_rate must be a finite number in \[0, inf\], got -0.1"),
    ("adam", dict(learning_rate="0.1"), TypeError, "learning_rate must be a real number"),
    ("adam", dict(learning_rate=1e-3, b1=1.0), ValueError,
     r"b1 must be a finite number in \[0, 1\), got 1.0"),
    ("adamw", dict(learning_rate=1e-3, b2=-0.1), ValueError, "b2 must be a finite number"),
    ("adam", dict(learning_rate=1e-3, eps=math.nan), ValueError, "eps must be a finite"),
    ("adam", dict(learning_rate=1e-3, eps_root=1e-8), ValueError,
     r"eps_root=1e-08 is not supported yet by fastopt.jax \(the kernel adds eps outside"),
    ("adamw", dict(learning_rate=1e-3, mu_dtype=jnp.bfloat16), ValueError,
     "mu_dtype=.* is not supported yet"),
    ("adam", dict(learning_rate=1e-3, nesterov=True, cautious=True), ValueError,
     "cautious: not with nesterov=True"),
    ("radam", dict(learning_rate=1e-3, nesterov=True), ValueError,
     "nesterov=True is not supported yet"),
    ("radam", dict(learning_rate=1e-3, eps_root=1e-8), ValueError,
     "eps_root=1e-08 is not supported yet"),
    ("radam", dict(learning_rate=1e-3, threshold=math.inf), ValueError,
     "threshold must be a finite number"),
    ("adagrad", dict(learning_rate=1e-3, initial_accumulator_value=0.0, eps=0.0), ValueError,
     "eps and initial_accumulator_value are both 0"),
    ("adagrad", dict(learning_rate=1e-3, initial_accumulator_value=-1.0), ValueError,
     "initial_accumulator_value must be"),
    ("rmsprop", dict(learning_rate=1e-3, nesterov=True, momentum=0.9), ValueError,
     "nesterov=True is not supported yet"),
    ("rmsprop", dict(learning_rate=1e-3, bias_correction=True), ValueError,
     "bias_correction=True is not supported yet"),
    ("rmsprop", dict(learning_rate=1e-3, decay=1.5), ValueError, r"decay must be .* \[0, 1\]"),
    ("rmsprop", dict(learning_rate=1e-3, eps_in_sqrt=1), TypeError,
     "eps_in_sqrt must be a bool"),
    ("rmsprop", dict(learning_rate=1e-3, momentum=-0.1), ValueError, "momentum must be"),
    ("adamw", dict(learning_rate=1e-3, weight_decay=lambda t: 0.1), TypeError,
     "weight_decay: a schedule is not supported yet"),
    ("adamw", dict(learning_rate=1e-3, weight_decay=-1.0), ValueError, "weight_decay must be"),
    ("sgd", dict(learning_rate=1e-3, momentum=-0.5), ValueError, "momentum must be"),
    ("sgd", dict(learning_rate=1e-3, nesterov="yes"), TypeError, "nesterov must be a bool"),
    ("sgd", dict(learning_rate=1e-3, accumulator_dtype=jnp.float32), ValueError,
     "accumulator_dtype=.* is not supported yet"),
    ("lion", dict(learning_rate=1e-3, b1=1.5), ValueError, r"b1 must be .* in \[0, 1\]"),
    ("lion", dict(learning_rate=1e-3, max_grad_norm=0.0), ValueError,
     r"max_grad_norm must be a finite number in \(0, inf\], got 0.0"),
    ("lion", dict(learning_rate=1e-3, n_threads=0), ValueError, "n_threads must be an integer"),
    ("lion", dict(learning_rate=1e-3, n_threads=1.5), TypeError, "n_threads must be an integer"),
    ("adadelta", dict(learning_rate=None), ValueError,
     r"learning_rate: expected a number or a schedule; optax's None"),
    ("adadelta", dict(rho=1.5), ValueError, r"rho must be a finite number in \[0, 1\]"),
    ("adamax", dict(learning_rate=1e-3, b2=1.0), ValueError, "b2 must be a finite number"),
    ("asgd", dict(lambd=-1.0), ValueError, r"lambd must be a finite number in \[0, inf\]"),
    ("asgd", dict(t0=math.inf), ValueError, "t0 must be a finite number"),
    ("schedule_free_adamw", dict(b1=0.0), ValueError, r"b1 must be a finite number in \(0, 1\)"),
    ("schedule_free_adamw", dict(warmup_steps=-1), ValueError,
     "warmup_steps: expected None or an integer >= 0, got -1"),
    ("schedule_free_sgd", dict(warmup_steps=2.5), ValueError, "warmup_steps: expected None"),
    ("schedule_free_sgd", dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    ("lamb", dict(learning_rate=1e-3, eps_root=1e-8), ValueError,
     "eps_root=1e-08 is not supported yet"),
    ("lamb", dict(learning_rate=1e-3, b2=1.5), ValueError, r"b2 must be .* in \[0, 1\]"),
    ("muon", dict(learning_rate=1e-3, ns_coeffs=(1.0, 2.0)), ValueError,
     r"ns_coeffs: expected a triple \(a, b, c\)"),
    ("muon", dict(learning_rate=1e-3, ns_steps=100), ValueError,
     r"ns_steps: expected an integer in \[0, 100\), got 100"),
    ("muon", dict(learning_rate=1e-3, ns_dtype="float16"), ValueError,
     "ns_dtype: expected one of"),
    ("muon", dict(learning_rate=1e-3, adjust_lr_fn="spectral"), ValueError,
     "adjust_lr_fn: expected one of"),
    ("muon", dict(learning_rate=1e-3, beta=1.5), ValueError, r"beta must be .* in \[0, 1\]"),
    ("muon", dict(learning_rate=1e-3, adam_b2=1.0), ValueError, "adam_b2 must be"),
    ("prodigy", dict(b1=1.0), ValueError, r"b1 must be a finite number in \[0, 1\)"),
    ("prodigy", dict(d0=0.0), ValueError, r"d0 must be a finite number in \(0, inf\]"),
    ("prodigy", dict(growth_rate=-1.0), ValueError, "growth_rate must be"),
    ("rprop", dict(learning_rate=optax.constant_schedule(0.1)), TypeError,
     "learning_rate: expected a number, the initial step size"),
    ("rprop", dict(learning_rate=0.1, eta_minus=1.0), ValueError,
     r"eta_minus must be a finite number in \(0, 1\)"),
    ("rprop", dict(learning_rate=0.1, eta_plus=1.0), ValueError, "eta_plus must be"),
    ("rprop", dict(learning_rate=0.1, min_step_size=1.0, max_step_size=0.5), ValueError,
     "min_step_size must be <= max_step_size"),
    ("adopt", dict(learning_rate=1e-3, nesterov=True), ValueError,
     "nesterov=True is not supported yet"),
    ("adopt", dict(learning_rate=1e-3, clip_value_fn=0.5), TypeError,
     "clip_value_fn: expected a function of the step count, got float"),
    ("ademamix", dict(learning_rate=1e-3, b3=1.0), ValueError, "b3 must be a finite number"),
    ("ademamix", dict(learning_rate=1e-3, alpha=-1.0), ValueError, "alpha must be"),
    ("ademamix", dict(learning_rate=1e-3, eps_root=1e-8), ValueError,
     "eps_root=1e-08 is not supported yet"),
    ("adan", dict(learning_rate=1e-3, no_prox=1), TypeError, "no_prox must be a bool"),
    ("adan", dict(learning_rate=1e-3, b3=-0.1), ValueError, "b3 must be a finite number"),
    ("adam", dict(learning_rate=1e-3, max_grad_norm=1.0, max_grad_value=1.0), ValueError,
     "max_grad_value: not together with max_grad_norm"),
    ("sgd", dict(learning_rate=1e-3, max_grad_value=0.0), ValueError,
     r"max_grad_value must be a finite number in \(0, inf\]"),
    ("lion", dict(learning_rate=1e-3, maximize=1), TypeError, "maximize must be a bool"),
    ("adam", dict(learning_rate=1e-3, state_dtype="int4"), ValueError,
     "state_dtype: expected None, 'float32', 'bfloat16' or 'int8'"),
    ("adam", dict(learning_rate=1e-3, seed=-1), ValueError, r"seed: expected an integer"),
    ("sgd", dict(learning_rate=1e-3, stochastic_rounding="yes"), TypeError,
     "stochastic_rounding must be a bool"),
])
def test_bad_hyperparameters(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(fjax, factory)(**kwargs)


PARAMS = {"w": jnp.ones((2, 3)), "b": [jnp.ones(3)]}


@pytest.mark.parametrize("grads, error, match", [
    ({"w": jnp.ones((2, 3))}, ValueError, "grads: expected the tree structure of params"),
    ({"w": jnp.ones((3, 2)), "b": [jnp.ones(3)]}, ValueError,
     r"grads\['w'\]: expected the shape of params\['w'\], \(2, 3\), got \(3, 2\)"),
    ({"w": jnp.ones((2, 3)), "b": [jnp.ones(3, jnp.float16)]}, TypeError,
     r"grads\['b'\]\[0\]: expected float32, as params\['b'\]\[0\], got float16"),
    ({"w": jnp.ones((2, 3)), "b": ["x"]}, TypeError, r"grads\['b'\]\[0\]: expected an array"),
])
def test_bad_gradients(grads, error, match):
    tx = fjax.adamw(1e-3)
    state = tx.init(PARAMS)
    with pytest.raises(error, match=match):
        tx.step(PARAMS, grads, state)
    with pytest.raises(error, match=match.replace("grads", "updates")):
        tx.update(grads, state, PARAMS)


@pytest.mark.parametrize("params, match", [
    ({"w": jnp.ones(3, jnp.int32)}, r"params\['w'\]: expected float32, float64, bfloat16 or "
                                    "float16 arrays, got int32"),
    ({"w": jnp.ones(3), "v": jnp.ones(3, jnp.bfloat16)},
     r"params\['w'\]: expected bfloat16, as params\['v'\]: the parameters must share one "
     r"dtype \(mixed dtypes are not supported yet\), got float32"),
])
def test_bad_parameters(params, match):
    tx = fjax.sgd(0.1, momentum=0.9)
    with pytest.raises(TypeError, match=match):
        tx.init(params)
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(TypeError, match=match):
        tx.step(params, params, state)


def test_mixed_float_dtypes():
    with jax.enable_x64(True):
        params = {"a": jnp.ones(3, jnp.float64), "b": jnp.ones(2, jnp.float32)}
        with pytest.raises(TypeError, match=r"params\['b'\]: expected float64, as params\['a'\]"
                                            r": the parameters must share one dtype"):
            fjax.adam(1e-3).init(params)


def test_bad_state_and_calls():
    tx = fjax.adamw(1e-3)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="params: fastopt.jax.adamw's update needs the "
                                         "parameters"):
        tx.update(PARAMS, state)
    with pytest.raises(TypeError, match="state: expected the AdamState that "
                                        "fastopt.jax.adamw's init returns, got tuple"):
        tx.step(PARAMS, PARAMS, optax.adamw(1e-3).init(PARAMS))
    with pytest.raises(ValueError, match=r"state.exp_avg: expected the tree structure"):
        tx.step(PARAMS, PARAMS, state._replace(exp_avg={"w": jnp.ones((2, 3))}))
    with pytest.raises(TypeError, match="state.count: expected an integer scalar array"):
        tx.step(PARAMS, PARAMS, state._replace(count=jnp.float32(0)))
    with pytest.raises(ValueError, match="state.momentum_buffer: expected None"):
        fjax.sgd(0.1).step(PARAMS, PARAMS, fjax.sgd(0.1, momentum=0.9).init(PARAMS))
    with pytest.raises(ValueError, match=r"learning_rate: the schedule returned a value of "
                                         r"shape \(2,\)"):
        fjax.sgd(lambda t: jnp.ones(2)).step(PARAMS, PARAMS, fjax.sgd(0.1).init(PARAMS))
    with pytest.raises(TypeError, match="step: this FusedTransformation was not made by a "
                                        "fastopt.jax factory"):
        fjax.FusedTransformation(tx.init, lambda u, s, p=None: (u, s)).step
    low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    with pytest.raises(TypeError, match="fastopt.jax.lamb: not with bfloat16 parameters "
                                        "yet"):
        fjax.lamb(1e-3).step(low, low, fjax.lamb(1e-3).init(low))
    with pytest.raises(TypeError, match="fastopt.jax.muon: not with bfloat16 parameters"):
        fjax.muon(1e-3).init(low)
    muon = fjax.muon(1e-3)
    with pytest.raises(ValueError, match=r"state.momentum_buffer\['b'\]\[0\]: expected None "
                                         r"\(params\['b'\]\[0\] is not a matrix\)"):
        muon.step(PARAMS, PARAMS, muon.init(PARAMS)._replace(
            momentum_buffer={"w": jnp.ones((2, 3)), "b": [jnp.ones(3)]}))
    with pytest.raises(TypeError, match="state: expected the MuonState"):
        muon.step(PARAMS, PARAMS, tx.init(PARAMS))


def test_jit_of_step_compiles_once(monkeypatch):
    """opt.step is one function object, so jax.jit(opt.step) written in a loop hits jax's
    cache instead of tracing and compiling again at every step."""
    opt = fjax.adam(1e-2)
    assert opt.step is opt.step
    traces = []
    apply = fjax._Fused._apply
    monkeypatch.setattr(fjax._Fused, "_apply",
                        lambda self, *a, **k: traces.append(1) or apply(self, *a, **k))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    for _ in range(3):
        params, state = jax.jit(opt.step)(params, {"w": jnp.ones(3)}, state)
    assert len(traces) == 1
