"""Rules torch does not have (Lion, Lamb), against optax: the NumPy reference, 200 steps.

Tolerances as in test_optim_torch.py: float64 to 1e-12 of the parameter scale; float32 to
4e-6 (XLA may contract a*b+c into FMAs where fastopt rounds twice)."""

import numpy as np
import pytest

import fastopt

optax = pytest.importorskip("optax")
jax = pytest.importorskip("jax")

STEPS = 200
SHAPES = [(3,), (17, 5), (1000,)]
TOLERANCE = {np.float64: 1e-12, np.float32: 4e-6}


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def check_against_optax(name, kw, tx, dtype, seed):
    """200 steps of fastopt's NumPy reference and of optax transformation `tx` (which has no
    maximize: it gets negated gradients instead)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    jparams = [jax.numpy.asarray(p.copy()) for p in params]
    opt = getattr(fastopt, name)(params, backend="numpy", **kw)
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


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults"


LION = [dict(), dict(lr=1e-3, weight_decay=0.1), dict(lr=3e-4, betas=(0.5, 0.9), maximize=True),
        dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=1.0)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", LION, ids=_ids)
def test_lion_matches_optax(kw, dtype, x64):
    b1, b2 = kw.get("betas", (0.9, 0.99))
    tx = optax.lion(learning_rate=kw.get("lr", 1e-4), b1=b1, b2=b2,
                    weight_decay=kw.get("weight_decay", 0.0))
    check_against_optax("Lion", kw, tx, dtype, seed=11)


LAMB = [dict(), dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-4, maximize=True)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", LAMB, ids=_ids)
def test_lamb_matches_optax(kw, dtype, x64):
    b1, b2 = kw.get("betas", (0.9, 0.999))
    tx = optax.lamb(learning_rate=kw.get("lr", 1e-3), b1=b1, b2=b2, eps=kw.get("eps", 1e-6),
                    weight_decay=kw.get("weight_decay", 0.0))
    check_against_optax("Lamb", kw, tx, dtype, seed=12)
