"""Prodigy's estimate d against the authors' prodigyopt, over param groups (one shared d,
groups frozen with lr 0, per-group d0), its refusals and its no-progress step. The update
itself is tested as every rule's is (tests/cases.py)."""

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")
reference_impls = pytest.importorskip("reference_impls")

SHAPES = [(40,), (6, 7), (3,)]


def _run(dtype, groups_kw, steps=60, **kw):
    """fastopt's and the reference's optimizers after `steps` steps on the same gradients,
    over three parameters in two groups (the first two, then the last)."""
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.tensor(p.copy()) for p in params]
    opt = fastopt.Prodigy([{"params": params[:2]}, {"params": params[2:], **groups_kw}], **kw)
    ref = reference_impls.Prodigy([{"params": tparams[:2]}, {"params": tparams[2:],
                                                             **groups_kw}], **kw)
    for _ in range(steps):
        grads = [np.asarray(0.5 * p + rng.standard_normal(p.shape), dtype) for p in params]
        for t, g in zip(tparams, grads):
            t.grad = torch.tensor(g)
        opt.step(grads)
        ref.step()
    return opt, ref, params, tparams


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("groups_kw, kw", [
    (dict(d0=5e-7), dict(weight_decay=0.05, use_bias_correction=True)),
    (dict(lr=0.0), dict(growth_rate=1.02)),
])
def test_estimate_matches_reference(dtype, rtol, groups_kw, kw):
    """d and its sums within `rtol` of the reference's; the parameters move by steps that
    scale with d, so in float32 they may differ by d's `rtol` times how far they moved (the
    reference sums in float32 in an order that depends on the CPU: on an Intel Xeon d came
    out 3.5e-6 apart, the parameters 8.6e-6 after moving 2.8)."""
    start = [p.copy() for p in _run(dtype, groups_kw, steps=0, **kw)[2]]
    opt, ref, params, tparams = _run(dtype, groups_kw, **kw)
    for key in ("d", "d_max", "d_numerator", "d_hat", "d_denom", "k"):
        for group, tgroup in zip(opt.param_groups, ref.param_groups):
            assert group[key] == pytest.approx(tgroup[key], rel=rtol, abs=1e-300), key
    moved = max(float(np.max(np.abs(p - p0))) for p, p0 in zip(params, start))
    atol = 1e-14 if dtype is np.float64 else rtol * moved
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p, t.numpy(), rtol=0, atol=atol)


def test_groups_share_one_lr_or_are_frozen():
    p, q = np.zeros(3), np.zeros(2)
    opt = fastopt.Prodigy([{"params": [p]}, {"params": [q], "lr": 0.5}])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr 0.5 differs from the "
                                         r"largest, 1.0; .* must be it or 0"):
        opt.step([np.ones(3), np.ones(2)])
    assert not opt.state and p.tolist() == [0, 0, 0]


def test_zero_gradients_change_nothing_as_the_reference():
    """Every gradient 0: |s| sums to 0; the reference returns before its apply loop, so the
    parameters and d stay, and so does fastopt."""
    p = np.array([1.0, -2.0])
    t = torch.tensor(p.copy())
    opt = fastopt.Prodigy([p])
    ref = reference_impls.Prodigy([t])
    t.grad = torch.zeros(2, dtype=torch.float64)
    opt.step([np.zeros(2)])
    ref.step()
    assert p.tolist() == t.tolist() == [1.0, -2.0]
    assert opt.param_groups[0]["d"] == ref.param_groups[0]["d"] == 1e-6
    assert opt.param_groups[0]["k"] == ref.param_groups[0]["k"] == 0


def test_torch_drop_in_reports_the_estimate():
    import fastopt.torch as ftorch
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    opt = ftorch.Prodigy(model.parameters(), d0=1e-5)
    twin = fastopt.Prodigy(arrays, d0=1e-5)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        twin.step([p.grad.numpy().copy() for p in model.parameters()])
        opt.step()
    assert opt.param_groups[0]["d"] == twin.param_groups[0]["d"] > 1e-5
    assert opt.state_dict()["param_groups"][0]["k"] == 10
    for p, a in zip(model.parameters(), arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)


def test_no_progress_leaves_immutable_parameters():
    """JAX parameters get new arrays each step: a step without progress (every gradient 0,
    or every lr 0) hands back their values, not unwritten memory, and counts no step."""
    jnp = pytest.importorskip("jax.numpy")
    for lr, grad in ((1.0, jnp.zeros(4)), (0.0, jnp.ones(4))):
        opt = fastopt.Prodigy([jnp.ones(4)], lr=lr, ema_decay=0.5)
        (w,) = opt.step([grad])
        np.testing.assert_array_equal(np.asarray(w), np.ones(4))
        np.testing.assert_array_equal(opt.state[0]["ema"], np.ones(4))
        assert opt.state[0]["step"] == 0 and opt.param_groups[0]["k"] == 0


def test_first_group_decides_momentum_as_the_reference():
    """prodigyopt reads beta1 once, from the first group: a later group with betas[0] = 0
    still keeps exp_avg and uses the first group's momentum."""
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal(5), rng.standard_normal(4)
    ta, tb = torch.tensor(a.copy()), torch.tensor(b.copy())
    groups = [{"params": [a]}, {"params": [b], "betas": (0.0, 0.999)}]
    opt = fastopt.Prodigy(groups)
    ref = reference_impls.Prodigy([{"params": [ta]}, {"params": [tb], "betas": (0.0, 0.999)}])
    for _ in range(20):
        grads = [rng.standard_normal(5), rng.standard_normal(4)]
        ta.grad, tb.grad = torch.tensor(grads[0]), torch.tensor(grads[1])
        opt.step(grads)
        ref.step()
    assert "exp_avg" in opt.state[1]
    np.testing.assert_allclose(a, ta.numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(b, tb.numpy(), rtol=0, atol=1e-14)
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-12)


@pytest.mark.parametrize("first_betas", [(0.0, 0.999), (0.9, 0.999)])
def test_resume_takes_the_loaded_first_groups_momentum(first_betas):
    """A state dict loaded into a Prodigy made with other betas: the loaded first group's
    beta1 decides which state arrays an entry holds (no exp_avg with beta1 = 0), and the
    run resumes bit for bit."""
    rng = np.random.default_rng(9)
    start = [rng.standard_normal(5), rng.standard_normal(4)]
    grads = [[rng.standard_normal(5), rng.standard_normal(4)] for _ in range(10)]
    groups = [{"params": [start[0].copy()], "betas": first_betas},
              {"params": [start[1].copy()], "betas": (0.5, 0.99)}]
    whole = fastopt.Prodigy(groups)
    for g in grads:
        whole.step(g)
    params = [p.copy() for p in start]
    first = fastopt.Prodigy([{"params": [params[0]], "betas": first_betas},
                             {"params": [params[1]], "betas": (0.5, 0.99)}])
    for g in grads[:5]:
        first.step(g)
    assert ("exp_avg" in first.state[1]) == (first_betas[0] > 0)
    other = (0.9, 0.999) if first_betas[0] == 0 else (0.0, 0.999)
    resumed = fastopt.Prodigy([{"params": [params[0]], "betas": other},
                               {"params": [params[1]]}])
    resumed.load_state_dict(first.state_dict())
    for g in grads[5:]:
        resumed.step(g)
    for p, q in zip(params, whole.params()):
        np.testing.assert_array_equal(p, q)
