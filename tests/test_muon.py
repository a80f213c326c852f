"""Muon against torch.optim.Muon as torch runs it (Newton-Schulz in bfloat16), the AdamW
groups of optax's convention, and what Muon refuses. Its 200-step conformance (Newton-Schulz
in the parameters' dtype on both sides), backend parity, resume and bad input are the
table's tests (tests/cases.py)."""

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")

SHAPES = [(48, 32), (32, 96), (40, 40)]  # tall (transposed), wide, square


def _one_step(ns_dtype, seed, **kw):
    """(fastopt's update, torch.optim.Muon's update, fastopt's buffer, torch's buffer) of a
    step from the same parameters, buffers and gradients."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    bufs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    ours = [p.copy() for p in params]
    opt = fastopt.Muon(ours, ns_dtype=ns_dtype, **kw)
    opt.load_state_dict({"state": {i: {"step": 3, "momentum_buffer": b}
                                   for i, b in enumerate(bufs)},
                         "param_groups": opt.state_dict()["param_groups"]})
    opt.step(grads)
    theirs = [torch.tensor(p) for p in params]
    topt = torch.optim.Muon(theirs, **kw)
    for t, b, g in zip(theirs, bufs, grads):
        topt.state[t]["momentum_buffer"] = torch.tensor(b)
        t.grad = torch.tensor(g)
    topt.step()
    return ([o - p for o, p in zip(ours, params)], [t.numpy() - p for t, p in zip(theirs, params)],
            [opt.state[i]["momentum_buffer"] for i in range(len(SHAPES))],
            [topt.state[t]["momentum_buffer"].numpy() for t in theirs])


# the largest difference of the updates, relative to the largest update entry: measured
# 2.8e-3 (bfloat16, as torch) and 2.4e-2 (float32 against torch's bfloat16) over these seeds
# and configs on AMD EPYC; the bounds below leave a factor of 2-4
TOLERANCE = {"bfloat16": 1e-2, None: 5e-2}


@pytest.mark.parametrize("ns_dtype", ["bfloat16", None])
@pytest.mark.parametrize("kw", [dict(lr=0.02), dict(lr=0.05, nesterov=False, momentum=0.8,
                                                      adjust_lr_fn="match_rms_adamw")])
def test_one_step_against_torch(ns_dtype, kw):
    """The elementwise parts (the momentum buffer) agree to float32 rounding; the
    orthogonalized update to TOLERANCE of its largest entry."""
    for seed in range(3):
        ours, theirs, buf, tbuf = _one_step(ns_dtype, seed, **kw)
        for b, tb in zip(buf, tbuf):
            np.testing.assert_allclose(b, tb, rtol=0, atol=4e-7 * np.abs(tb).max())
        for u, tu in zip(ours, theirs):
            assert np.abs(u - tu).max() <= TOLERANCE[ns_dtype] * np.abs(tu).max()


def test_adamw_groups_are_adamw():
    """A use_muon=False group takes AdamW's update, bit for bit, with the group's lr and
    weight decay and Muon's adam_betas and adam_eps; the matrices beside it are Muon's."""
    rng = np.random.default_rng(0)
    w, b, v = rng.standard_normal((8, 6)), rng.standard_normal(6), rng.standard_normal((3, 2, 2))
    twin_b, twin_v = b.copy(), v.copy()
    opt = fastopt.Muon([{"params": [w]}, {"params": [b, v], "use_muon": False, "lr": 0.01}],
                       lr=0.02, weight_decay=0.05, adam_betas=(0.8, 0.95), adam_eps=1e-6)
    adamw = fastopt.AdamW([twin_b, twin_v], lr=0.01, betas=(0.8, 0.95), eps=1e-6,
                          weight_decay=0.05)
    matrix = fastopt.Muon([w.copy()], lr=0.02, weight_decay=0.05)
    for _ in range(5):
        grads = [rng.standard_normal(w.shape), rng.standard_normal(6),
                 rng.standard_normal((3, 2, 2))]
        opt.step(grads)
        adamw.step(grads[1:])
        matrix.step(grads[:1])
    np.testing.assert_array_equal(b, twin_b)
    np.testing.assert_array_equal(v, twin_v)
    np.testing.assert_array_equal(w, matrix.params()[0])
    assert set(opt.state[0]) == {"step", "momentum_buffer"}
    assert set(opt.state[1]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("shape", [(5,), (), (2, 3, 4)])
def test_refuses_what_is_no_matrix(shape):
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: Muon updates "
                                         r"matrices .* use_muon=False"):
        fastopt.Muon([np.zeros((3, 3)), np.zeros(shape)])
    import fastopt.torch as ftorch
    with pytest.raises(ValueError, match=r"use_muon=False"):
        ftorch.Muon([torch.zeros(3, 3), torch.zeros(shape)])


def test_torch_drop_in_on_a_model():
    """fastopt.torch.Muon on a model's weights, its biases in an AdamW group: the array
    API's result bit for bit, and torch's Muon's (as torch runs it) to the tolerance."""
    import fastopt.torch as ftorch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim != 2]
    arrays = [p.detach().numpy().copy() for p in weights + biases]
    opt = ftorch.Muon([{"params": weights}, {"params": biases, "use_muon": False}], lr=0.02)
    ref = fastopt.Muon([{"params": arrays[:2]}, {"params": arrays[2:], "use_muon": False}],
                       lr=0.02)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        ref.step([p.grad.numpy().copy() for p in weights + biases])
        opt.step()
    for p, a in zip(weights + biases, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    assert opt.state_dict()["param_groups"][1]["use_muon"] is False
