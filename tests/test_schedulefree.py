"""Schedule-Free's two points: train() and eval() against the authors' reference (the
schedulefree package), the mode in state dicts, and the swap for every kind of parameter
(low precision, master weights, immutable frameworks, fastopt.torch). The step itself is
tested as every rule's is (tests/cases.py)."""

import numpy as np
import pytest

import fastopt

CONFIGS = {"AdamWScheduleFree": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05,
                                     warmup_steps=5),
           "SGDScheduleFree": dict(lr=0.05, momentum=0.85, warmup_steps=3, r=1.0)}
SHAPES = [(7,), (3, 4), ()]


def _grads(rng, params, dtype):
    return [np.asarray(0.5 * np.asarray(p, np.float64) + rng.standard_normal(np.shape(p)),
                       dtype) for p in params]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_eval_match_reference(name, dtype):
    """Steps, eval(), train() and more steps: the parameters agree with the reference's
    after each (as the step conformance test's tolerance: ~rounding)."""
    torch = pytest.importorskip("torch")
    reference_impls = pytest.importorskip("reference_impls")
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.tensor(p.copy()) for p in params]
    opt = getattr(fastopt, name)(params, **CONFIGS[name])
    topt = getattr(reference_impls, name)(tparams, **CONFIGS[name])
    atol = 1e-14 if dtype is np.float64 else 2e-6
    for phase in range(3):
        for _ in range(10):
            grads = _grads(rng, params, dtype)
            for tp, g in zip(tparams, grads):
                tp.grad = torch.from_numpy(g.copy())
            opt.step(grads)
            topt.step()
        opt.eval()
        topt.eval()
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.numpy(), rtol=0, atol=atol)
        assert [g["train_mode"] for g in opt.param_groups] == [False]
        opt.train()
        topt.train()
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mode_switches_are_idempotent_and_need_state(name):
    """Before the first step there is no z: eval() changes nothing; calling a mode twice is
    one switch; only stepped parameters move."""
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(5), rng.standard_normal(3)]
    before = [p.copy() for p in params]
    opt = getattr(fastopt, name)(params, **CONFIGS[name])
    opt.eval()
    assert all(np.array_equal(p, b) for p, b in zip(params, before))
    opt.train()
    opt.step([rng.standard_normal(5), None])
    for _ in range(3):
        opt.step([rng.standard_normal(5), None])
    stepped = params[0].copy()
    opt.eval()
    evaluated = params[0].copy()
    opt.eval()
    assert np.array_equal(params[0], evaluated) and not np.array_equal(evaluated, stepped)
    assert np.array_equal(params[1], before[1])  # never stepped: no z, not moved
    opt.train()
    opt.train()
    np.testing.assert_allclose(params[0], stepped, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_in_eval_mode_refused_and_nothing_written(name):
    rng = np.random.default_rng(2)
    p = rng.standard_normal(6)
    opt = getattr(fastopt, name)([p], **CONFIGS[name])
    opt.step([rng.standard_normal(6)])
    opt.eval()
    before, state = p.copy(), {k: np.copy(v) for k, v in opt.state[0].items()}
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] is in eval mode; call "
                                           r"opt.train\(\) before opt.step\(\)"):
        opt.step([rng.standard_normal(6)])
    assert np.array_equal(p, before)
    assert all(np.array_equal(opt.state[0][k], v) for k, v in state.items())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_carries_the_mode(name):
    """A checkpoint saved in eval mode (as the reference advises) resumes exactly: loaded,
    train(), steps: the same bits as the run that never stopped."""
    rng = np.random.default_rng(3)
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(12)]
    init = [rng.standard_normal(s) for s in SHAPES]
    whole = [p.copy() for p in init]
    opt = getattr(fastopt, name)(whole, **CONFIGS[name])
    for g in grads[:6]:
        opt.step(g)
    opt.eval()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["train_mode"] is False
    resumed = [p.copy() for p in whole]
    other = getattr(fastopt, name)(resumed, **CONFIGS[name])
    other.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="eval mode"):
        other.step(grads[6])
    for o in (opt, other):
        o.train()
        for g in grads[6:]:
            o.step(g)
    assert all(np.array_equal(a, b) for a, b in zip(whole, resumed))
    bad = opt.state_dict()
    bad["param_groups"][0]["train_mode"] = "yes"
    with pytest.raises(TypeError, match=r"\['param_groups'\]\[0\]: train_mode must be True "
                                        r"or False"):
        other.load_state_dict(bad)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8", None])
def test_z_starts_as_the_parameter(state_dtype):
    """z is created as a copy of the parameter, in the state's format (bfloat16: rounded to
    nearest even; int8: quantized like any 8-bit state)."""
    rng = np.random.default_rng(4)
    p = rng.standard_normal(5000).astype(np.float32)
    opt = fastopt.SGDScheduleFree([p.copy()], lr=0.0, state_dtype=state_dtype)
    opt.step([np.zeros_like(p)])  # lr 0: z stays the parameter's first value
    z = opt.state[0]["z"]
    if state_dtype == "bfloat16":
        np.testing.assert_array_equal(z, p.astype(z.dtype))
    elif state_dtype == "int8":
        loaded = fastopt.optim._base.load_state(opt.state[0], "z")
        np.testing.assert_allclose(loaded, p, rtol=0, atol=0.02 * np.abs(p).max())
    else:
        np.testing.assert_array_equal(z, p)


def test_low_precision_parameters_and_master_weights():
    """With master weights, eval() moves the float32 copy and writes the parameter as its
    rounded value; without, the parameter is rounded to nearest even."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(6)
    for master in (True, False):
        p = rng.standard_normal(300).astype(bf16)
        opt = fastopt.AdamWScheduleFree([p], lr=0.05, master_weights=master)
        for _ in range(5):
            opt.step([rng.standard_normal(300).astype(np.float32)])
        y = (opt.state[0]["master_param"] if master else p.astype(np.float32)).copy()
        z = opt.state[0]["z"].astype(np.float32)
        w = np.float32(1 - 1 / 0.9)
        x = z - (z - y) * (np.float32(1) - w) if abs(w) >= 0.5 else y + w * (z - y)
        opt.eval()
        np.testing.assert_array_equal(p, x.astype(bf16))
        if master:
            np.testing.assert_array_equal(opt.state[0]["master_param"], x)


def test_immutable_parameters_get_new_arrays():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(7)
    host = rng.standard_normal(8).astype(np.float32)
    opt = fastopt.SGDScheduleFree([jnp.asarray(host)], lr=0.1)
    twin = fastopt.SGDScheduleFree([host.copy()], lr=0.1)
    for _ in range(4):
        g = rng.standard_normal(8).astype(np.float32)
        opt.step([jnp.asarray(g)])
        twin.step([g])
    for o in (opt, twin):
        o.eval()
    np.testing.assert_array_equal(np.asarray(opt.params()[0]), twin.params()[0])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_drop_in_train_eval(name):
    """fastopt.torch's classes have train() and eval(): a training loop with the reference's
    calls gives the reference's parameters, and the mode is in torch's state dict."""
    torch = pytest.importorskip("torch")
    reference_impls = pytest.importorskip("reference_impls")
    import fastopt.torch as ftorch
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    twin = torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    opt = getattr(ftorch, name)(model.parameters(), **CONFIGS[name])
    ref = getattr(reference_impls, name)(twin.parameters(), **CONFIGS[name])
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for o, m in ((opt, model), (ref, twin)):
        for _ in range(8):
            o.train()
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        version = m.weight._version
        o.eval()
        assert m.weight._version > version  # autograd sees the in-place change
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert opt.state_dict()["param_groups"][0]["train_mode"] is False
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
