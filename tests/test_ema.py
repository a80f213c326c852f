"""The weight EMA: fastopt.ema_update_ against torch's get_ema_multi_avg_fn and across
backends, its refusals, and the optimizers' ema_decay= option (every rule: the average in
the state, updated after each step as ema_update_ would)."""

import numpy as np
import pytest
from cases import CASES, shaped
from conftest import CPU_BACKENDS, require_backend

import fastopt

SIZES = (0, 1, 7, 1023, 100003)


def _arrays(seed, dtype, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ema_update_matches_torch_and_every_backend(dtype):
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import get_ema_multi_avg_fn
    start, params = _arrays(0, dtype), _arrays(1, dtype)
    runs = []
    for backend in CPU_BACKENDS:
        require_backend(backend)
        for n_threads in (1, 2):
            ema = [e.copy() for e in start]
            for decay in (0.999, 0.3, 0.75):
                fastopt.ema_update_(ema, params, decay, backend=backend, n_threads=n_threads)
            runs.append(ema)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            np.testing.assert_array_equal(got, want)
    theirs = [torch.tensor(e) for e in start]
    for decay in (0.999, 0.3, 0.75):
        get_ema_multi_avg_fn(decay)(theirs, [torch.tensor(p) for p in params], None)
    ulp = 2e-7 if dtype is np.float32 else 1e-15  # torch's lerp contracts to one FMA
    for got, want in zip(runs[0], theirs):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=4 * ulp)


def test_ema_update_torch_tensors_in_place():
    torch = pytest.importorskip("torch")
    ema, w = [torch.zeros(3)], [torch.tensor([1.0, -2.0, 4.0])]
    assert fastopt.ema_update_(ema, w, 0.5) is not None
    torch.testing.assert_close(ema[0], torch.tensor([0.5, -1.0, 2.0]))


@pytest.mark.parametrize("ema, params, decay, exc, match", [
    ([np.zeros(3)], [np.zeros(3), np.zeros(2)], 0.9, ValueError, "one average per parameter"),
    ([np.zeros(3)], [np.zeros(4)], 0.9, ValueError, r"params\[0\]: shape \(4,\)"),
    ([np.zeros(3)], [np.zeros(3, np.float32)], 0.9, ValueError, r"dtype float32 do not match"),
    ([np.zeros(3)], [np.zeros(3)], 1.5, ValueError, r"decay must be"),
    ([np.zeros(3)], [np.zeros(3)], "0.9", TypeError, r"decay must be a real number"),
    (np.zeros(3), [np.zeros(3)], 0.9, TypeError, r"ema_params: expected a list"),
    ([np.zeros(3, np.int32)], [np.zeros(3, np.int32)], 0.9, TypeError, r"ema_params\[0\]"),
])
def test_ema_update_refusals(ema, params, decay, exc, match):
    before = [np.copy(e) for e in np.atleast_1d(ema)]
    with pytest.raises(exc, match=match):
        fastopt.ema_update_(ema, params, decay)
    for e, b in zip(np.atleast_1d(ema), before):
        np.testing.assert_array_equal(e, b)


def test_ema_update_refuses_shared_memory_and_low_precision():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.zeros(6)
    with pytest.raises(ValueError, match=r"ema_params\[0\] and params\[0\] share memory"):
        fastopt.ema_update_([x[:4]], [x[2:]])
    with pytest.raises(ValueError, match=r"ema_params\[0\] and ema_params\[1\] share memory"):
        fastopt.ema_update_([x[:4], x[3:]], [np.zeros(4), np.zeros(3)])
    bf16 = np.zeros(3, ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"dtype bfloat16 is not supported"):
        fastopt.ema_update_([bf16], [bf16.copy()])
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"jax arrays are immutable"):
        fastopt.ema_update_([jnp.zeros(3)], [jnp.zeros(3)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_ema_decay_option_is_ema_update_after_each_step(name, backend):
    """Every rule: the state's average is a copy of the parameter after its first step, then
    ema_update_ after each step, bit for bit (a parameter skipped keeps its average)."""
    require_backend(backend)
    kw = CASES[name].richest
    shapes = shaped(name, [(30, 7), (5,), (2000,)])
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    twins = [p.copy() for p in params]
    opt = getattr(fastopt, name)(params, backend=backend, ema_decay=0.9, **kw)
    plain = getattr(fastopt, name)(twins, backend=backend, **kw)
    averages = None
    for t in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if t == 2:
            grads[1] = None
        opt.step(grads)
        plain.step(grads)
        if averages is None:
            averages = [p.copy() for p in twins]
        else:
            stepped = [i for i, g in enumerate(grads) if g is not None]
            fastopt.ema_update_([averages[i] for i in stepped], [twins[i] for i in stepped],
                                0.9, backend=backend)
    for i, (p, q, a) in enumerate(zip(params, twins, averages)):
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(opt.state[i]["ema"], a)


def test_ema_decay_fused_into_the_cython_update_pass(monkeypatch):
    """On the Cython backend an elementwise rule moves the average inside its update pass
    (no pass of the ema kernel after the first step), pruning masks and the cautious
    variant included: the same bits as the NumPy reference's separate pass."""
    require_backend("cython")
    from fastopt._backends import _cython
    calls = []
    run = _cython.elementwise

    def spy(kernel, *args, **kwargs):
        calls.append((kernel, "ema" in kwargs))
        return run(kernel, *args, **kwargs)
    monkeypatch.setattr(_cython, "elementwise", spy)
    rng = np.random.default_rng(4)
    shapes = [(40000,), (7,), (1023,)]
    keep = [rng.random(s) > 0.3 for s in shapes]
    results = {}
    for backend in ("numpy", "cython"):
        for cautious in (False, True):
            params = [np.random.default_rng(5).standard_normal(s).astype(np.float32)
                      for s in shapes]
            opt = fastopt.AdamW(params, lr=0.01, backend=backend, ema_decay=0.9,
                                cautious=cautious, masks=keep)
            grads = np.random.default_rng(6)
            calls.clear()
            kernel = "adam_cautious" if cautious else "adam"
            for _ in range(4):
                opt.step([grads.standard_normal(s).astype(np.float32) for s in shapes])
            results[backend, cautious] = [opt.state[i]["ema"].copy() for i in range(3)]
            if backend == "cython":
                # the first step copies the parameter; the cautious count pass is no
                # elementwise() call here (caution_counts)
                assert calls == [(kernel, False)] + [(kernel, True)] * 3, calls
    for cautious in (False, True):
        for a, b in zip(results["numpy", cautious], results["cython", cautious]):
            np.testing.assert_array_equal(a, b)


def test_ema_decay_with_master_weights_masks_skips_and_resume():
    """bfloat16 parameters with master weights: the float32 average of the master copy;
    pruned entries stay +0; a skipped step leaves the average; a checkpoint resumes it."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    init = rng.standard_normal(5000).astype(np.float32)
    mask = rng.random(5000) > 0.3
    grads = [rng.standard_normal(5000).astype(np.float32) for _ in range(6)]

    def run(steps, state=None):
        p = init.astype(ml_dtypes.bfloat16)
        opt = fastopt.AdamW([p], lr=1e-2, master_weights=True, ema_decay=0.8, masks=[mask],
                            skip_nonfinite=True)
        if state is not None:
            opt.load_state_dict(state)
        for g in steps:
            opt.step([g])
        return opt

    whole = run(grads)
    ema = whole.state[0]["ema"]
    assert ema.dtype == np.float32 and (ema[~mask] == 0).all()
    assert not np.signbit(ema[~mask]).any()
    before = ema.copy()
    bad = grads[0].copy()
    bad[mask.argmax()] = np.nan
    whole.step([bad])
    assert whole.last_step_skipped and np.array_equal(whole.state[0]["ema"], before)
    resumed = run(grads[3:], run(grads[:3]).state_dict())
    np.testing.assert_array_equal(resumed.state[0]["ema"], before)


def test_torch_drop_in_ema_matches_averaged_model():
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    import fastopt.torch as ftorch
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = ftorch.SGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.95)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95))
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        averaged.update_parameters(model)
    for p, a in zip(model.parameters(), averaged.module.parameters()):
        torch.testing.assert_close(opt.state[p]["ema"], a.detach(), rtol=0, atol=1e-6)
