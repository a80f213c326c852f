"""Every backend against the NumPy reference: same trajectories, bit for bit.

The compiled kernels follow the reference's operation order, cast scalars the same way,
and are built without FMA contraction (-ffp-contract=off, NVRTC --fmad=false), and every
operation used (+, -, *, /, sqrt) is correctly rounded, so results must be identical, not
merely close: any difference is a bug in operation order or scalar handling.

The rules and their configs come from tests/cases.py. The fast tier runs every config in
each dtype on each compiled backend at small sizes, thread counts 1 and 2 spread pairwise
over them, plus per rule its richest config at full size on 2 threads (the large tensors
split into chunks across threads) in float32 on each compiled backend; the slow tier runs
every config at full size on 2 threads on each compiled backend, in one dtype (each rule
in both).
"""

import numpy as np
import pytest
from cases import (
    CASES,
    config_id,
    configs,
    spread,
    tiered,
)
from conftest import CPU_BACKENDS, require_backend

import fastopt

STEPS = 100
COMPILED = [b for b in CPU_BACKENDS if b != "numpy"]
DTYPES = (np.float32, np.float64)

# for the modules that run every config of every rule through this file's trajectory
# (test_cuda.py, test_prune.py): (name, config) pairs
CONFIGS = [(case.name, kw) for case, kw in configs()]


def _ids(config):
    return config_id(*config)


POOL = 2 ** 20  # more elements than any parity tensor
_POOLS = {}


def gradients(rng, sizes, dtype):
    """One step's gradients, a tensor per size (an int or a shape): windows of a pool of
    normal samples (drawn once per dtype) at offsets drawn from `rng`, copied. As good as
    fresh draws for comparing backends, at a twentieth of their cost: drawing them was
    half of this file's time."""
    dtype = np.dtype(dtype)
    if dtype not in _POOLS:
        _POOLS[dtype] = np.asarray(np.random.default_rng(1).standard_normal(POOL), dtype)
    pool = _POOLS[dtype]
    grads = []
    for n in sizes:
        size = int(np.prod(n))
        at = int(rng.integers(0, POOL - size + 1))
        grads.append(pool[at:at + size].reshape(n).copy())
    return grads


def run_trajectory(name, kw, dtype, backend, n_threads, sizes, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(n), dtype) for n in sizes]
    opt = getattr(fastopt, name)(params, backend=backend, n_threads=n_threads, **kw)
    for step in range(steps):
        grads = gradients(rng, sizes, dtype)
        if step == steps // 2:  # hyperparameters changed mid-run take effect at once
            opt.param_groups[0]["lr"] *= 0.5
        opt.step(grads)
    return params, opt.state


_reference_cache = {}


def reference(name, kw, dtype, sizes=None):
    """The NumPy backend's trajectory (cached): at `sizes`, by default the rule's full-size
    parity shapes."""
    sizes = CASES[name].parity_shapes(large=True) if sizes is None else sizes
    key = (name, config_id(name, kw), np.dtype(dtype).name, sizes)
    if key not in _reference_cache:
        if len(_reference_cache) >= 8:  # the tests of one reference run follow each other
            _reference_cache.clear()
        _reference_cache[key] = run_trajectory(name, kw, dtype, "numpy", 1, sizes)
    return _reference_cache[key]


def _grid():
    """Small sizes: every config x dtype x compiled backend, 1 and 2 threads spread pairwise
    (fast). Full sizes on 2 threads: every config on each compiled backend, in one dtype
    (each rule in both; the backends share the reference run) (slow), and each rule's
    richest config in float32 on each backend (fast)."""
    configs_ = [dict(case=case, kw=kw, config=config_id(case.name, kw), rule=case.name)
                for case, kw in configs()]
    rows = [dict(row, dtype=dtype, backend=backend, large=False)
            for row in configs_ for dtype in DTYPES for backend in COMPILED]
    small = spread(rows, "n_threads", [1, 2], against=["config", "dtype", "backend"])
    chunked = [dict(row, dtype=np.float32, backend=backend, large=True, n_threads=2)
               for row in configs_ if row["kw"] is row["case"].richest for backend in COMPILED]
    full = [dict(row, backend=backend, large=True, n_threads=2)
            for row in spread(configs_, "dtype", DTYPES, against=["rule"])
            for backend in COMPILED]
    full += [row for row in chunked if row not in full]
    return tiered(small + full, small + chunked,
                  ["backend", "n_threads", "dtype", "large", "case", "kw"],
                  lambda r: f"{r['backend']}-{r['n_threads']}t-{np.dtype(r['dtype']).name}-"
                            f"{'full' if r['large'] else 'small'}-{r['config']}")


@pytest.mark.parametrize("backend,n_threads,dtype,large,case,kw", _grid())
def test_backend_matches_reference(backend, n_threads, dtype, large, case, kw):
    require_backend(backend)
    sizes = case.parity_shapes(large)
    ref_params, ref_state = reference(case.name, kw, dtype, sizes)
    params, state = run_trajectory(case.name, kw, dtype, backend, n_threads, sizes)
    for i, (got, want) in enumerate(zip(params, ref_params)):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want, err_msg=f"params[{i}]")
        assert state[i].keys() == ref_state[i].keys()
        for key, value in ref_state[i].items():
            np.testing.assert_array_equal(state[i][key], value, err_msg=f"state[{i}][{key!r}]")


def test_every_rule_has_a_case():
    """A rule added to fastopt.optim needs its entry in tests/cases.py (configs, reference,
    bad inputs, state keys); entries of rules that no longer exist are stale."""
    rules = set(fastopt.optim.__all__) - {"Optimizer", "convert_state"}
    assert sorted(rules - set(CASES)) == [], "rules without a case in tests/cases.py"
    assert sorted(set(CASES) - rules) == [], "cases of rules fastopt.optim does not export"
    for name, case in CASES.items():
        assert getattr(fastopt, name) is getattr(fastopt.optim, name)
        assert case.configs and case.bad and case.state, name
        assert len({config_id(name, kw) for kw in case.configs}) == len(case.configs), name
        assert case.reference.kind in ("torch", "optax"), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_moves_parameters(backend):
    """Guard against a trajectory test that passes because nothing moved."""
    require_backend(backend)
    sizes = CASES["Adam"].parity_shapes(large=True)
    params, _ = run_trajectory("Adam", dict(lr=1e-2), np.float32, backend, 2, sizes, steps=3)
    rng = np.random.default_rng(0)
    initial = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    for got, start in zip(params[1:], initial[1:]):
        assert np.all(got != start)


@pytest.mark.parametrize("backend", COMPILED)
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
