"""fastopt.jax.adafactor: optax's Adafactor through fastopt's factored XLA handler
(kernels/cpu/xla_factored.h), against optax itself."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import fastopt.jax as fjax  # noqa: E402
from fastopt import _jax_ffi  # noqa: E402

STEPS = 100
# factored with the row statistics normalized (w) and the column ones (tall), a convolution
# kernel whose factored dimensions are not its last two (transposed for the handler), a
# batch of matrices, a matrix under min_dim_size_to_factor, a vector and a scalar
SHAPES = {"w": (130, 300), "tall": (300, 140), "conv": (140, 3, 3, 130),
          "batch": (3, 128, 129), "small": (20, 30), "b": (300,), "s": ()}
CONFIGS = {
    "defaults, lr": dict(learning_rate=1e-2),
    "no lr": dict(),
    "momentum, decay": dict(learning_rate=1e-3, momentum=0.9, weight_decay_rate=1e-3,
                            clipping_threshold=None),
    "schedule, options": dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 50),
                              multiply_by_parameter_scale=False, decay_offset=-2,
                              decay_rate=0.7, eps=1e-3, min_dim_size_to_factor=135,
                              clipping_threshold=0.5),
    "not factored": dict(learning_rate=1e-2, factored=False),
    "decay mask": dict(learning_rate=1e-2, weight_decay_rate=1e-2,
                       weight_decay_mask=lambda p: {k: k != "b" for k in p}),
}


def _case(dtype, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    grads = {k: jnp.asarray(0.1 * rng.standard_normal((steps,) + s), dtype)
             for k, s in SHAPES.items()}
    return params, grads


def _run(tx, params, grads, fused):
    def body(carry, g):
        p, s = carry
        if fused:
            return tx.step(p, g, s), None
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
    return jax.jit(lambda p, gs: jax.lax.scan(body, (p, tx.init(p)), gs)[0])(params, grads)


def _assert_close(got, want, steps):
    """Every leaf within `steps` ulps of its largest magnitude: the statistics' means are
    float64 fixed-order sums here and XLA's float32 (or float64) reductions in optax, a
    rounding apart per step (seen: 3 ulps after 100 steps)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        if not w.size:
            continue
        tol = steps * np.finfo(w.dtype).eps * np.max(np.abs(w))
        np.testing.assert_allclose(g, w, rtol=0, atol=tol)


def _momentum_dtype(hyper, dtype):
    return dict(hyper, dtype_momentum=dtype) if "momentum" in hyper else hyper


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_optax(config, dtype):
    """100 jitted steps, through step and through update + apply_updates (the same
    bits), against optax.adafactor's; the statistics and the momentum too."""
    hyper = _momentum_dtype(CONFIGS[config], dtype)
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype)
        want, want_state = _run(optax.adafactor(**hyper), params, grads, False)
        tx = fjax.adafactor(**hyper)
        got, state = _run(tx, params, grads, True)
        again, state_again = _run(tx, params, grads, False)
        _assert_close(got, want, STEPS)
        for a, b in zip(jax.tree.leaves((got, state)), jax.tree.leaves((again, state_again))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(state.count) == STEPS
        factored = want_state[0]
        for name in ("v_row", "v_col", "v"):
            ours = getattr(state, name)
            for key, leaf in ours.items():
                if leaf is not None:
                    _assert_close(leaf, getattr(factored, name)[key], STEPS)
        if "momentum" in hyper:
            ema = next(s for s in jax.tree.leaves(
                want_state, is_leaf=lambda s: hasattr(s, "ema")) if hasattr(s, "ema"))
            _assert_close(state.momentum, ema.ema, STEPS)
        else:
            assert state.momentum is None


def test_state_is_optax_shaped():
    params, _ = _case("float32", steps=1)
    state = fjax.adafactor(1e-2, momentum=0.5).init(params)
    optax_state = optax.adafactor(1e-2).init(params)[0]
    for key, p in params.items():
        factored = state.v_row[key] is not None
        assert factored == (state.v[key] is None) == (state.v_col[key] is not None)
        if factored:
            assert state.v_row[key].shape == optax_state.v_row[key].shape
            assert state.v_col[key].shape == optax_state.v_col[key].shape
        else:
            assert state.v[key].shape == optax_state.v[key].shape == p.shape
        assert state.momentum[key].shape == p.shape
    assert {k for k in params if state.v[k] is None} == {"w", "tall", "conv", "batch"}


def test_step_is_in_place():
    """Donated, a factored parameter (in its own layout) and its statistics are updated in
    their buffers, three handler calls and no copy of a parameter-sized array."""
    tx = fjax.adafactor(1e-2)
    params = {"w": jnp.ones((256, 512)), "b": jnp.ones(512)}
    grads = {"w": jnp.full((256, 512), 0.5), "b": jnp.full(512, 0.5)}
    state = tx.init(params)
    step = jax.jit(tx.step, donate_argnums=(0, 2))
    text = step.lower(params, grads, state).compile().as_text()
    assert text.count('custom_call_target="fastopt_factored_v1"') == 3
    big = [line for line in text.splitlines() if " copy(" in line and "256,512" in line]
    assert not big, big
    before = params["w"].unsafe_buffer_pointer()
    new, state = step(params, grads, state)
    assert new["w"].unsafe_buffer_pointer() == before
    assert np.all(np.asarray(new["w"]) < 1)


def test_skip_nonfinite_leaves_everything():
    """A step on a NaN gradient changes no parameter or state array (an empty factored
    parameter's statistics, which move outside the handler, too) and update returns zeros;
    donated, in place: the verdict goes to the handler's three calls (no conditional, no
    copy of a parameter-sized array)."""
    tx = fjax.adafactor(1e-2, momentum=0.9, skip_nonfinite=True)
    params, grads = _case("float32", steps=1)
    params["e"] = jnp.zeros((0, 200, 300))
    grads = jax.tree.map(lambda g: g[0], grads)
    grads["e"] = jnp.zeros((0, 200, 300))
    state = tx.init(params)
    params, state = jax.jit(tx.step)(params, grads, state)
    bad = dict(grads, w=grads["w"].at[3, 4].set(jnp.nan))
    new, new_state = jax.jit(tx.step)(params, bad, state)
    for a, b in zip(jax.tree.leaves((new, new_state)), jax.tree.leaves((params, state))):
        _assert_bytes(a, b)
    assert int(new_state.count) == 1
    updates, _ = jax.jit(tx.update)(bad, state, params)
    for u in jax.tree.leaves(updates):  # +0: no value, no sign bit
        _assert_bytes(u, np.zeros(u.shape, u.dtype))

    step = jax.jit(tx.step, donate_argnums=(0, 2))
    text = step.lower(params, bad, state).compile().as_text()
    assert "conditional" not in text
    big = [line for line in text.splitlines() if " copy(" in line and "130,300" in line]
    assert not big, big
    want = jax.tree.map(np.array, (params, state))
    before = params["w"].unsafe_buffer_pointer()
    new, new_state = step(params, bad, state)
    assert new["w"].unsafe_buffer_pointer() == before
    for a, b in zip(jax.tree.leaves((new, new_state)), jax.tree.leaves(want)):
        _assert_bytes(a, b)


def _assert_bytes(got, want):
    """The same bytes (-0 is not +0)."""
    np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8),
                                  np.asarray(want).reshape(-1).view(np.uint8))


def test_max_grad_norm_scales_the_gradients():
    """torch's clip coefficient, min(1, c / (||g|| + 1e-6)), applied to every gradient
    before the rule: the same as scaled gradients (the rule is not scale-free once eps
    counts, so the factor is visible)."""
    params, grads = _case("float32", steps=1)
    grads = jax.tree.map(lambda g: g[0], grads)
    coef = fjax._clip_coefficient(0.5, jax.tree.leaves(grads))  # the same rounding
    assert 0 < float(coef) < 1
    tx = fjax.adafactor(1e-2, max_grad_norm=0.5, eps=1e-3)
    got, _ = jax.jit(tx.step)(params, grads, tx.init(params))
    plain = fjax.adafactor(1e-2, eps=1e-3)
    want, _ = jax.jit(plain.step)(params, jax.tree.map(lambda g: g * coef, grads),
                                  plain.init(params))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refusals():
    params = {"w": jnp.ones((130, 140), jnp.bfloat16)}
    with pytest.raises(TypeError, match="bfloat16"):
        fjax.adafactor(1e-2).init(params)
    params = {"w": jnp.ones((130, 140))}
    tx = fjax.adafactor(1e-2)
    with pytest.raises(ValueError, match="masks"):
        tx.step(params, params, tx.init(params), masks={"w": jnp.ones((130, 140), bool)})
    with pytest.raises(TypeError, match="dtype_momentum"):
        with jax.enable_x64(True):
            fjax.adafactor(1e-2, momentum=0.9).init({"w": jnp.ones(3, jnp.float64)})
    with pytest.raises(ValueError, match="state_dict"):
        tx.state_dict(tx.init(params))
    with pytest.raises(ValueError, match="min_dim_size_to_factor"):
        fjax.adafactor(min_dim_size_to_factor=-1)
    state = tx.init(params)
    with pytest.raises(ValueError, match="v_row"):
        tx.step(params, params, state._replace(v_row={"w": jnp.ones(3)}))


def test_handler_checks_its_operands():
    """A call the front end would not make: the handler's own error, no crash."""
    g = jnp.ones((4, 5))
    scalars = jnp.asarray([np.inf, 1.0, 0.5, 0.5, 1e-30], jnp.float32)
    with pytest.raises(Exception, match="fastopt_factored_v1: tensor 0, info"):
        _jax_ffi.factored(0, scalars, None, [g], [jnp.ones(4)], [jnp.ones(5)],
                          [jnp.asarray([1, 4, 5, 0], jnp.int32)], 1)
    with pytest.raises(Exception, match="fastopt_factored_v1: tensor 0, a: expected 4"):
        _jax_ffi.factored(0, scalars, None, [g], [jnp.ones(5)], [jnp.ones(5)],
                          [jnp.asarray([1, 4, 5, 1], jnp.int32)], 1)
    info = [jnp.asarray([1, 4, 5, 1], jnp.int32)]
    results = [jax.ShapeDtypeStruct((4,), jnp.float32), jax.ShapeDtypeStruct((5,), jnp.float32)]
    with pytest.raises(Exception, match=r"fastopt_factored_v1: argument 5 \(the guard\): "
                                        r"expected a 0-d int32, got float32 of rank 0"):
        jax.ffi.ffi_call(_jax_ffi.FACTORED, results)(
            scalars, g, jnp.ones(4), jnp.ones(5), info[0], jnp.float32(0), phase=np.int64(0),
            n_tensors=np.int64(1), n_threads=np.int64(1), guarded=np.int64(1))
    with pytest.raises(TypeError, match="guard: expected a 0-d bool or integer"):
        _jax_ffi.factored(0, scalars, None, [g], [jnp.ones(4)], [jnp.ones(5)], info, 1,
                          guard=jnp.zeros(2, bool))
    # a skipped phase: the statistics as they were; phase 1's means 0
    rows, cols = _jax_ffi.factored(0, scalars, None, [g], [jnp.full(4, 2.0)],
                                   [jnp.full(5, 3.0)], info, 1, guard=False)
    np.testing.assert_array_equal(rows[0], np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(cols[0], np.full(5, 3.0, np.float32))
    _, means = _jax_ffi.factored(1, scalars, [g], [g], [jnp.ones(4)], [jnp.ones(5)], info, 1,
                                 guard=jnp.asarray(0))
    np.testing.assert_array_equal(means, np.zeros((1, 2), np.float32))


def test_empty_parameters_keep_optax_statistics():
    """Empty parameters skip the handler; a factored one's statistics move as optax's
    (NaN means over an empty dimension)."""
    params = {"e": jnp.zeros((0, 200, 300)), "e2": jnp.zeros((200, 0)),
              "w": jnp.ones((130, 140))}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
    hyper = dict(learning_rate=1e-2, min_dim_size_to_factor=0)
    updates, want = optax.adafactor(**hyper).update(grads, optax.adafactor(**hyper).init(params),
                                                    params)
    tx = fjax.adafactor(**hyper)
    got, state = jax.jit(tx.step)(params, grads, tx.init(params))
    _assert_close(got, optax.apply_updates(params, updates), 1)
    for name in ("v_row", "v_col"):
        for key in params:
            np.testing.assert_array_equal(np.asarray(getattr(state, name)[key]),
                                          np.asarray(getattr(want[0], name)[key]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inject_hyperparams(dtype):
    """Injected (traced) hyperparameters, decay_offset and a float64 decay_rate included
    (optax then computes its decay in float64)."""
    with jax.enable_x64(dtype == "float64"):
        params, grads = _case(dtype, steps=20)
        hyper = dict(learning_rate=1e-2, decay_rate=0.7, decay_offset=1, momentum=0.5,
                     dtype_momentum=None, min_dim_size_to_factor=128)
        want, _ = _run(optax.inject_hyperparams(optax.adafactor, static_args=(
            "min_dim_size_to_factor", "dtype_momentum"))(**hyper), params, grads, False)
        got, _ = _run(optax.inject_hyperparams(fjax.adafactor, static_args=(
            "min_dim_size_to_factor", "dtype_momentum"))(**hyper), params, grads, False)
        _assert_close(got, want, 20)


def test_inject_hyperparams_needs_the_shape_argument_static():
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(fjax.adafactor)(learning_rate=1e-2).init([jnp.ones(3)])
