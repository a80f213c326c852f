"""Every backend against the NumPy reference: same trajectories, bit for bit.

The compiled kernels follow the reference's operation order, cast scalars the same way,
and are built without FMA contraction (-ffp-contract=off, NVRTC --fmad=false), and every
operation used (+, -, *, /, sqrt) is correctly rounded, so results must be identical, not
merely close: any difference is a bug in operation order or scalar handling.
"""

import numpy as np
import pytest

import fastopt
from conftest import CPU_BACKENDS, require_backend

SIZES = (0, 1, 7, 1023, 100003)
# Adafactor factors tensors of 2+ dims: 0-d and 1-d tensors, one column block, several
# blocks and slices, a matrix large enough for both threads, a conv weight (many 3 x 3
# slices), a column, and empty ones
SHAPES = {"Adafactor": ((), 7, (33, 5), (2, 3, 700), (300, 1100), (64, 32, 3, 3), (9, 1),
                        (0, 3), (4, 0, 2))}
STEPS = 100

CONFIGS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, weight_decay=0.01, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.02, momentum=0.8, dampening=0.3, weight_decay=1e-3)),
    ("SGD", dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=3e-3, betas=(0.5, 0.99), weight_decay=0.2, amsgrad=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)),
    ("RMSprop", dict(lr=0.01, maximize=True)),
    ("RMSprop", dict(lr=0.01, alpha=0.3, centered=True, momentum=0.9, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.5)),
    ("Adadelta", dict(lr=1.0, rho=0.8, weight_decay=0.01)),
    ("Adamax", dict(lr=0.01, betas=(0.3, 0.9), weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, momentum_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.95))),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    ("Lion", dict(lr=1e-3, betas=(0.5, 0.2), maximize=True)),
    ("Lamb", dict(lr=1e-2)),
    ("Lamb", dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1, maximize=True)),
    ("Adafactor", dict(lr=1e-2)),
    ("Adafactor", dict(lr=0.05, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=2.0, weight_decay=0.1,
                       maximize=True)),
]


def _ids(config):
    name, kw = config
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def run_trajectory(name, kw, dtype, backend, n_threads, sizes=None, steps=STEPS, seed=0):
    sizes = SHAPES.get(name, SIZES) if sizes is None else sizes
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(n), dtype) for n in sizes]
    opt = getattr(fastopt, name)(params, backend=backend, n_threads=n_threads, **kw)
    for step in range(steps):
        grads = [np.asarray(rng.standard_normal(n), dtype) for n in sizes]
        if step == steps // 2:  # hyperparameters changed mid-run take effect at once
            opt.param_groups[0]["lr"] *= 0.5
        opt.step(grads)
    return params, opt.state


_reference_cache = {}


def reference(name, kw, dtype):
    key = (name, tuple(sorted(kw.items())), np.dtype(dtype).name)
    if key not in _reference_cache:
        _reference_cache[key] = run_trajectory(name, kw, dtype, "numpy", 1)
    return _reference_cache[key]


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "numpy"])
def test_backend_matches_reference(backend, n_threads, dtype, config):
    require_backend(backend)
    name, kw = config
    ref_params, ref_state = reference(name, kw, dtype)
    params, state = run_trajectory(name, kw, dtype, backend, n_threads)
    for i, (got, want) in enumerate(zip(params, ref_params)):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want, err_msg=f"params[{i}]")
        assert state[i].keys() == ref_state[i].keys()
        for key, value in ref_state[i].items():
            np.testing.assert_array_equal(state[i][key], value, err_msg=f"state[{i}][{key!r}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_moves_parameters(backend):
    """Guard against a trajectory test that passes because nothing moved."""
    require_backend(backend)
    params, _ = run_trajectory("Adam", dict(lr=1e-2), np.float32, backend, 2, steps=3)
    rng = np.random.default_rng(0)
    initial = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    for got, start in zip(params[1:], initial[1:]):
        assert np.all(got != start)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "numpy"])
def test_groups_and_skipped_grads(backend):
    """Several param groups, and None grads that skip a parameter (its step count lags,
    so Adam's bias corrections differ between tensors of one group)."""
    require_backend(backend)

    def run(be):
        rng = np.random.default_rng(7)
        a, b, c = (rng.standard_normal(n).astype(np.float32) for n in (5, 40000, 33))
        opt = fastopt.Adam([{"params": [a, b]}, {"params": [c], "lr": 0.1, "amsgrad": True}],
                           lr=0.01, backend=be)
        for step in range(20):
            grads = [rng.standard_normal(x.shape).astype(np.float32) for x in (a, b, c)]
            if step % 3 == 0:
                grads[1] = None
            opt.step(grads)
        return (a, b, c), opt.state

    (got, got_state), (want, want_state) = run(backend), run("numpy")
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    assert got_state[1]["step"] == want_state[1]["step"] == 13
    assert got_state[0]["step"] == 20
