"""The NumPy reference against torch.optim (for-loop implementation) over 200 steps: every
config of every rule whose reference (tests/cases.py) is a torch.optim-style class.

float64 must agree to ~1e-12 relative. float32 cannot agree bit for bit: torch's vectorized
CPU kernels contract a*b+c into one FMA (its lerp is fmadd-based) where fastopt rounds twice
(-ffp-contract=off keeps every fastopt backend identical instead). That is at most a couple
of float32 ulps per operation and step; the differences then add up over the trajectory as a
random walk. Over these configs and 200 steps the largest difference seen in parameters and
state was 6.5e-7 of the scale (about 5 ulps; float64: 4.6e-15), except for centered RMSprop,
whose v - gbar^2 cancels: up to 3.1e-6 (lr=0.1), and 1.7e-5 with alpha=0.3, which is too
ill-conditioned for float32 to compare directly (its `unchecked` entry in tests/cases.py).
There the test compares through float64: fastopt's float32 run must end at least as close to
the float64 trajectory as torch's float32 run ends to torch's float64 one (measured: 1.0e-5
against 3.8e-5). The float32 tolerance is 4e-6 of the scale, about 34 ulps, far below any
real discrepancy in the rule.

The fast tier runs two configs of each rule (its richest and another, one in each dtype),
the slow tier every config in both dtypes.
"""

import numpy as np
import pytest
from cases import reference_grid

import fastopt

STEPS = 200
# () and (3, 2, 600): a 0-d parameter, and Adafactor's factored sums over several column blocks
SHAPES = [(3,), (17, 5), (2, 3, 4), (1000,), (), (3, 2, 600)]
TOLERANCE = {np.float64: 1e-12, np.float32: 4e-6}
DTYPES = (np.float64, np.float32)


def assert_close(got, want, dtype, what):
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=what)


def _ill_conditioned(case, kw, dtype):
    return any(ckw == kw and cdtype is dtype for ckw, cdtype, _ in case.unchecked)


def _run(torch, case, kw, dtype):
    """fastopt's optimizer (NumPy reference) and the reference's, over their parameters,
    after STEPS steps with the same gradients."""
    rng = np.random.default_rng(case.reference.seed)
    params = [rng.standard_normal(s).astype(dtype) for s in case.shaped(SHAPES)]
    tparams = [torch.tensor(p.copy()) for p in params]
    opt = getattr(fastopt, case.name)(params, backend="numpy", **kw)
    topt = case.reference.build(tparams, kw)
    for _ in range(STEPS):
        # gradients of a quadratic bowl plus noise: a realistic, non-stationary signal
        grads = [np.asarray(0.5 * p + rng.standard_normal(p.shape), dtype) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        opt.step(grads)
        topt.step()
    return opt, topt, params, tparams


def _trajectories(torch, case, kw, dtype):
    """fastopt's and the reference's parameters after STEPS steps."""
    _, _, params, tparams = _run(torch, case, kw, dtype)
    return params, [tp.numpy() for tp in tparams]


def _distance(a, b):
    """Largest difference of two parameter lists, relative to the scale of b."""
    scale = max(1.0, max(float(np.max(np.abs(y))) for y in b if y.size))
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b) if x.size) \
        / scale


@pytest.mark.parametrize("case,kw,dtype", reference_grid("torch", DTYPES))
def test_reference_matches_torch(case, kw, dtype):
    torch = pytest.importorskip("torch")
    if _ill_conditioned(case, kw, dtype):
        ours, theirs = _trajectories(torch, case, kw, dtype)
        ours64, theirs64 = _trajectories(torch, case, kw, np.float64)
        for i, (p, tp) in enumerate(zip(ours64, theirs64)):
            assert_close(p, tp, np.float64, f"params[{i}] in float64")
        assert _distance(ours, ours64) <= _distance(theirs, theirs64)
        return
    opt, topt, params, tparams = _run(torch, case, kw, dtype)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        assert_close(p, tp.numpy(), dtype, f"params[{i}]")
        tstate = topt.state[tp]
        for key, value in opt.state[i].items():
            if key == "step":
                # Schedule-Free's reference counts a group's steps in its "k"; torch's
                # Muon keeps no count
                count = tstate.get("step", topt.param_groups[0].get("k", STEPS))
                assert value == int(count) == STEPS
            elif key == "mu_product":
                assert value == float(tstate["mu_product"])
            elif key in ("lr_max", "weight_sum"):  # Schedule-Free's, per group there
                assert value == topt.param_groups[0][key]
            else:  # (prodigyopt keeps s and p0 flattened)
                assert_close(np.asarray(value), tstate[key].numpy().reshape(np.shape(value)),
                             dtype, f"state[{i}][{key!r}]")


def test_param_groups_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(10), rng.standard_normal((4, 4))
    ta, tb = torch.tensor(a.copy()), torch.tensor(b.copy())

    def groups(x, y):
        return [{"params": [x], "lr": 0.1, "momentum": 0.9},
                {"params": [y], "nesterov": True, "momentum": 0.5}]

    opt = fastopt.SGD(groups(a, b), lr=0.01, backend="numpy")
    topt = torch.optim.SGD(groups(ta, tb), lr=0.01, foreach=False)
    for step in range(50):
        ga, gb = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
        ta.grad, tb.grad = torch.tensor(ga), torch.tensor(gb)
        if step == 25:
            for g in (opt.param_groups + topt.param_groups):
                g["lr"] *= 0.1
        opt.step([ga, gb])
        topt.step()
    assert_close(a, ta.numpy(), np.float64, "a")
    assert_close(b, tb.numpy(), np.float64, "b")
