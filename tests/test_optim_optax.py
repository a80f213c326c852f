"""Rules torch does not have (Lion, Lamb), against optax: the NumPy reference, 200 steps,
every config of every rule whose reference (tests/cases.py) is an optax transformation.

Tolerances as in test_optim_torch.py: float64 to 1e-12 of the parameter scale; float32 to
4e-6 (XLA may contract a*b+c into FMAs where fastopt rounds twice). The fast tier runs two
configs of each rule (its richest and another, one in each dtype), the slow tier every
config in both dtypes."""

import numpy as np
import pytest
from cases import reference_grid

import fastopt

STEPS = 200
SHAPES = [(3,), (17, 5), (1000,)]
TOLERANCE = {np.float64: 1e-12, np.float32: 4e-6}
DTYPES = (np.float64, np.float32)


@pytest.fixture
def x64():
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("case,kw,dtype", reference_grid("optax", DTYPES))
def test_reference_matches_optax(case, kw, dtype, x64):
    """200 steps of fastopt's NumPy reference and of the case's optax transformation (which
    has no maximize: it gets negated gradients instead)."""
    tx = case.reference.build(None, kw)
    jax, optax = pytest.importorskip("jax"), pytest.importorskip("optax")
    rng = np.random.default_rng(case.reference.seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    jparams = [jax.numpy.asarray(p.copy()) for p in params]
    opt = getattr(fastopt, case.name)(params, backend="numpy", **kw)
    state = tx.init(jparams)
    sign = -1 if kw.get("maximize") else 1
    for _ in range(STEPS):
        grads = [(0.5 * p + rng.standard_normal(p.shape)).astype(dtype) for p in params]
        opt.step(grads)
        updates, state = tx.update([jax.numpy.asarray(sign * g) for g in grads], state, jparams)
        jparams = optax.apply_updates(jparams, updates)
    for p, jp in zip(params, jparams):
        want = np.asarray(jp)
        assert want.dtype == dtype
        np.testing.assert_allclose(p, want, rtol=0,
                                   atol=TOLERANCE[dtype] * max(1.0, np.abs(want).max()))
