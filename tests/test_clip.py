"""Gradient clipping and the non-finite guard: the norm reduction on every backend, the
standalone functions against torch, and clipping folded into the optimizers."""

import math

import numpy as np
import pytest
from cases import spread, tiered
from conftest import CPU_BACKENDS, require_backend

import fastopt
from fastopt import _backends

SIZES = (0, 1, 7, 1023, 100003, 40000)
NORM_TYPES = (1.0, 2.0, math.inf)


def grads(dtype, seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * 3).astype(dtype) for n in sizes]


def total_norm(g, norm_type, backend, n_threads):
    """The gradients' total norm as clip_grad_norm_ returns it (it clips copies, if at all:
    by NaN or 0 where the norm is not finite)."""
    with np.errstate(invalid="ignore"):
        return fastopt.clip_grad_norm_([x.copy() for x in g], 1e30, norm_type, backend=backend,
                                       n_threads=n_threads)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "numpy"])
def test_norm_is_identical_on_every_backend(backend, n_threads, dtype, norm_type):
    require_backend(backend)
    g = grads(dtype)
    want = total_norm(g, norm_type, "numpy", 1)
    got = total_norm(g, norm_type, backend, n_threads)
    assert got == want
    flat = np.concatenate(g).astype(np.float64)
    np.testing.assert_allclose(want, np.linalg.norm(flat, norm_type), rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_norm_of_non_finite_gradients(backend):
    require_backend(backend)
    for bad, expect in ((np.nan, math.isnan), (np.inf, math.isinf)):
        g = grads(np.float32)
        g[4][777] = bad
        for norm_type in NORM_TYPES:
            norm = total_norm(g, norm_type, backend, 2)
            assert expect(norm), (norm_type, norm)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipping, and a coefficient of 1
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype):
    torch = pytest.importorskip("torch")
    g = grads(dtype, sizes=(5, 1000, 3))
    tg = [torch.tensor(x.copy()) for x in g]
    params = [torch.zeros_like(t, requires_grad=True) for t in tg]
    for p, t in zip(params, tg):
        p.grad = t
    want = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=False)
    got = fastopt.clip_grad_norm_(g, max_norm, norm_type)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, float(want), rtol=rtol)
    for x, t in zip(g, tg):
        np.testing.assert_allclose(x, t.numpy(), rtol=2 * rtol, atol=0)


def test_clip_grad_value_matches_torch():
    torch = pytest.importorskip("torch")
    g = grads(np.float32, sizes=(50, 7))
    g[0][3] = np.nan
    t = [torch.tensor(x.copy()) for x in g]
    params = [torch.zeros_like(x, requires_grad=True) for x in t]
    for p, x in zip(params, t):
        p.grad = x
    torch.nn.utils.clip_grad_value_(params, 0.5)
    fastopt.clip_grad_value_(g, 0.5)
    for x, y in zip(g, t):
        np.testing.assert_array_equal(x, y.numpy())


def test_clip_functions_refuse_what_they_cannot_change():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"grads\[0\]: jax arrays are immutable .* max_grad_norm="):
        fastopt.clip_grad_norm_([jnp.ones(3)], 1.0)
    g = [np.ones(3)]
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        fastopt.clip_grad_norm_(g, -1.0)
    with pytest.raises(ValueError, match="norm_type must be 1, 2 or inf"):
        fastopt.clip_grad_norm_(g, 1.0, norm_type=3)
    g[0].flags.writeable = False
    with pytest.raises(ValueError, match=r"grads\[0\]: array is read-only"):
        fastopt.clip_grad_value_(g, 1.0)
    nan = [np.array([np.nan, 1.0])]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_(nan, 1.0, error_if_nonfinite=True)
    assert np.isnan(nan[0][0]) and nan[0][1] == 1.0


OPT_CONFIGS = [
    ("SGD", dict(lr=0.05, momentum=0.9, maximize=True)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
]
CLIP_OPTIONS = [dict(max_grad_norm=5.0), dict(max_grad_norm=0.5, grad_norm_type=math.inf),
                dict(max_grad_norm=20.0, grad_norm_type=1), dict(max_grad_value=0.7)]


def run(name, kw, options, backend, dtype=np.float32, steps=30, sizes=SIZES, bad_steps=()):
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    opt = getattr(fastopt, name)(params, backend=backend, **kw, **options)
    skipped = []
    for step in range(steps):
        g = grads(dtype, seed=100 + step, sizes=sizes)
        if step in bad_steps:
            g[-1][step % g[-1].size] = np.nan if step % 2 else np.inf
        before = [x.copy() for x in g]
        opt.step(g)
        skipped.append(opt.last_step_skipped)
        for x, y in zip(g, before):  # the gradients themselves are never changed
            np.testing.assert_array_equal(x, y)
    return params, opt, skipped


def _options_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


def _fused_grid():
    """Fast: every config with every option, the compiled backends spread pairwise."""
    rows = [dict(config=c, options=o) for c in OPT_CONFIGS for o in CLIP_OPTIONS]
    compiled = [b for b in CPU_BACKENDS if b != "numpy"]
    fast = spread(rows, "backend", compiled, against=["config", "options"])
    full = [dict(row, backend=b) for b in compiled for row in rows]
    return tiered(full, fast, ["backend", "config", "options"],
                  lambda r: f"{r['backend']}-{r['config'][0]}-{_options_id(r['options'])}")


@pytest.mark.parametrize("backend,config,options", _fused_grid())
def test_fused_clipping_is_identical_on_every_backend(backend, config, options):
    require_backend(backend)
    name, kw = config
    want, _, _ = run(name, kw, options, "numpy")
    got, _, _ = run(name, kw, options, backend)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("options", CLIP_OPTIONS, ids=_options_id)
@pytest.mark.parametrize("config", OPT_CONFIGS, ids=[c[0] for c in OPT_CONFIGS])
def test_fused_clipping_matches_torch_clip_then_step(config, options):
    """max_grad_norm= equals torch's clip_grad_norm_ (or clip_grad_value_) then step()."""
    torch = pytest.importorskip("torch")
    name, kw = config
    sizes = (5, 300, 17)
    params, opt, _ = run(name, kw, options, "cython", np.float64, sizes=sizes)
    rng = np.random.default_rng(5)
    tparams = [torch.tensor(rng.standard_normal(n)) for n in sizes]
    topt = getattr(torch.optim, name)(tparams, foreach=False, **kw)
    for step in range(30):
        for p, g in zip(tparams, grads(np.float64, seed=100 + step, sizes=sizes)):
            p.grad = torch.tensor(g)
        if "max_grad_norm" in options:
            torch.nn.utils.clip_grad_norm_(tparams, options["max_grad_norm"],
                                           options.get("grad_norm_type", 2.0), foreach=False)
        else:
            torch.nn.utils.clip_grad_value_(tparams, options["max_grad_value"])
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.numpy(), rtol=1e-10, atol=1e-12)


def _skip_grid():
    """Fast: each config on another backend."""
    fast = [dict(config=c, backend=b) for c, b in zip(OPT_CONFIGS, CPU_BACKENDS)]
    full = [dict(config=c, backend=b) for b in CPU_BACKENDS for c in OPT_CONFIGS]
    return tiered(full, fast, ["backend", "config"],
                  lambda r: f"{r['backend']}-{r['config'][0]}")


@pytest.mark.parametrize("backend,config", _skip_grid())
def test_skip_nonfinite(backend, config):
    """Steps with NaN/inf gradients change nothing; the run then continues exactly like one
    that never saw them."""
    require_backend(backend)
    name, kw = config
    bad = (0, 7, 8, 20)
    got, opt, skipped = run(name, kw, dict(skip_nonfinite=True), backend, bad_steps=bad)
    assert [i for i, s in enumerate(skipped) if s] == list(bad)
    assert not opt.last_step_skipped and math.isfinite(opt.last_grad_norm)

    # the same run with the bad steps left out entirely
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    ref = getattr(fastopt, name)(params, backend=backend, **kw)
    for step in range(30):
        if step not in bad:
            ref.step(grads(np.float32, seed=100 + step))
    for x, y in zip(got, params):
        np.testing.assert_array_equal(x, y)
    if name != "SGD":
        assert opt.state[1]["step"] == ref.state[1]["step"] == 30 - len(bad)


def test_skipped_first_step_creates_no_state():
    w = np.ones(3, np.float32)
    opt = fastopt.Adam([w], skip_nonfinite=True)
    opt.step([np.array([1, np.inf, 0], np.float32)])
    assert opt.last_step_skipped and opt.state == {} and (w == 1).all()


def test_bad_clipping_options():
    w = [np.zeros(2)]
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        fastopt.Adam(w, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="max_grad_value must be a finite number > 0"):
        fastopt.SGD(w, lr=0.1, max_grad_value=math.nan)
    with pytest.raises(ValueError, match="pass one of them, not both"):
        fastopt.SGD(w, lr=0.1, max_grad_norm=1.0, max_grad_value=1.0)
    with pytest.raises(ValueError, match="grad_norm_type must be 1, 2 or inf"):
        fastopt.Adam(w, max_grad_norm=1.0, grad_norm_type=0.5)
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        fastopt.Adam(w, skip_nonfinite=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foreach'"):
        fastopt.Adam(w, foreach=True)


def test_registry_has_the_norm_everywhere():
    assert set(_backends.OPS["norm_partials"]) == set(_backends.BACKENDS)
