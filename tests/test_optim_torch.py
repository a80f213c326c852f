"""The NumPy reference against torch.optim (for-loop implementation) over 200 steps.

float64 must agree to ~1e-12 relative. float32 cannot agree bit for bit: torch's vectorized
CPU kernels contract a*b+c into one FMA (its lerp is fmadd-based) where fastopt rounds twice
(-ffp-contract=off keeps every fastopt backend identical instead). That is at most a couple
of float32 ulps per operation and step; the differences then add up over the trajectory as a
random walk. Over these configs and 200 steps the largest difference seen was 3.8e-7 of the
parameter scale (about 3 ulps; float64: 8.9e-16). The float32 tolerance is 4e-6 of the scale,
about 34 ulps: ten times what was seen, far below any real discrepancy in the rule.
"""

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")

STEPS = 200
# () and (3, 2, 600): a 0-d parameter, and Adafactor's factored sums over several column blocks
SHAPES = [(3,), (17, 5), (2, 3, 4), (1000,), (), (3, 2, 600)]

CONFIGS = [
    ("SGD", dict(lr=0.01)),
    ("SGD", dict(lr=0.01, maximize=True, weight_decay=0.05)),
    ("SGD", dict(lr=0.01, momentum=0.9)),
    ("SGD", dict(lr=0.005, momentum=0.5, dampening=0.5, weight_decay=1e-3)),
    ("SGD", dict(lr=0.005, momentum=0.99, nesterov=True)),
    ("SGD", dict(lr=0.003, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("Adam", dict()),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    ("Adam", dict(lr=1e-2, betas=(0.2, 0.5))),
    ("Adam", dict(lr=5e-3, weight_decay=0.1)),
    ("Adam", dict(lr=5e-3, amsgrad=True)),
    ("Adam", dict(lr=5e-3, amsgrad=True, weight_decay=0.01, maximize=True)),
    ("Adam", dict(lr=1e-3, betas=(0.0, 0.0), eps=0.0)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=1e-2, weight_decay=0.3)),
    ("AdamW", dict(lr=1e-2, betas=(0.5, 0.9), amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=2e-3, weight_decay=0.0, eps=1e-4)),
    ("Adagrad", dict()),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1,
                     eps=1e-6, maximize=True)),
    ("RMSprop", dict()),
    ("RMSprop", dict(lr=3e-3, alpha=0.9, momentum=0.9, weight_decay=1e-2)),
    ("RMSprop", dict(lr=1e-3, alpha=0.99, centered=True, maximize=True)),
    ("RMSprop", dict(lr=1e-3, alpha=0.5, centered=True, momentum=0.5, eps=1e-6)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.7, eps=1e-4, weight_decay=0.05, maximize=True)),
    ("Adamax", dict()),
    ("Adamax", dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-5, weight_decay=0.1)),
    ("NAdam", dict()),
    ("NAdam", dict(lr=1e-2, betas=(0.8, 0.99), momentum_decay=1e-2, weight_decay=0.1)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("RAdam", dict()),
    ("RAdam", dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("Adafactor", dict()),
    ("Adafactor", dict(lr=0.05, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=2.0, weight_decay=0.1,
                       maximize=True)),
    ("Adafactor", dict(lr=1e-3, beta2_decay=0.0, eps=(1e-3, 0.0), weight_decay=0.5)),
]

TOLERANCE = {np.float64: 1e-12, np.float32: 4e-6}


def _ids(config):
    name, kw = config
    return name + "(" + ",".join(f"{k}={v}" for k, v in kw.items()) + ")"


def assert_close(got, want, dtype, what):
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_reference_matches_torch(config, dtype):
    name, kw = config
    rng = np.random.default_rng(2024)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.tensor(p.copy()) for p in params]
    opt = getattr(fastopt, name)(params, backend="numpy", **kw)
    topt = getattr(torch.optim, name)(tparams, foreach=False, **kw)
    for _ in range(STEPS):
        # gradients of a quadratic bowl plus noise: a realistic, non-stationary signal
        grads = [np.asarray(0.5 * p + rng.standard_normal(p.shape), dtype) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        opt.step(grads)
        topt.step()
    for i, (p, tp) in enumerate(zip(params, tparams)):
        assert_close(p, tp.numpy(), dtype, f"params[{i}]")
        tstate = topt.state[tp]
        for key, value in opt.state[i].items():
            if key == "step":
                assert value == int(tstate["step"]) == STEPS
            elif key == "mu_product":
                assert value == float(tstate["mu_product"])
            else:
                assert_close(value, tstate[key].numpy(), dtype, f"state[{i}][{key!r}]")


def test_param_groups_match_torch():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(10), rng.standard_normal((4, 4))
    ta, tb = torch.tensor(a.copy()), torch.tensor(b.copy())
    groups = lambda x, y: [{"params": [x], "lr": 0.1, "momentum": 0.9},
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
