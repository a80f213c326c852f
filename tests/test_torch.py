"""fastopt.torch: every rule as a torch.optim.Optimizer, each part of the protocol tested
against torch's own optimizer doing the same (or, where torch has no such rule, against
fastopt's array API on the same numbers, bit for bit)."""

import copy
import io
import math
import pickle

import numpy as np
import pytest
from cases import CASES

import fastopt
from fastopt import _rules

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")

TORCH_RULES = [r.name for r in _rules.RULES if r.reference.startswith("torch.optim.")]
SHAPES = [(6, 5), (5,), (2, 3, 4), ()]


def params_like(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def grads_for(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [scale * (0.5 * p.detach() + torch.randn(p.shape, generator=g, dtype=p.dtype))
            for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def train(opt, params, steps, start=0, skip=()):
    """`steps` steps of known gradients; the parameters of index in `skip` get none."""
    for t in range(start, start + steps):
        grads = grads_for(params, t)
        set_grads(params, [None if i in skip and t % 2 else g for i, g in enumerate(grads)])
        opt.step()


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach()), (x, y)


def richest(name):
    return dict(CASES[name].richest)


# -- the update: the array API's, bit for bit; torch's, to float64 rounding ----------------

@pytest.mark.parametrize("name", [r.name for r in _rules.RULES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_as_array_api(name, dtype):
    """fastopt.torch.X on nn.Parameters = fastopt.X on NumPy copies: parameters and every
    state array, bit for bit, also with groups and parameters skipped (no .grad)."""
    kw = richest(name)
    params = params_like(dtype, shapes=CASES[name].shaped(SHAPES))
    arrays = [p.detach().numpy().copy() for p in params]
    second = CASES[name].second_group(kw)
    opt = getattr(ft, name)([{"params": params[:2]}, {"params": params[2:], **second}], **kw)
    ref = getattr(fastopt, name)([{"params": arrays[:2]}, {"params": arrays[2:], **second}],
                                 **kw)
    for t in range(12):
        grads = grads_for(params, t)
        grads[1] = None if t % 3 == 0 else grads[1]
        set_grads(params, grads)
        opt.step()
        ref.step([None if g is None else g.numpy() for g in grads])
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    saved, want = opt.state_dict()["state"], ref.state_dict()["state"]
    assert saved.keys() == want.keys()
    for i, entry in want.items():
        assert saved[i].keys() == entry.keys()
        for key, value in entry.items():
            got = saved[i][key]
            if key == "step":
                assert got.dtype == torch.float32 and got.item() == value
            elif isinstance(value, np.ndarray):
                assert isinstance(got, torch.Tensor)
                np.testing.assert_array_equal(got.numpy(), value)
            else:
                assert got.item() == value


@pytest.mark.parametrize("name", TORCH_RULES)
def test_same_as_torch(name):
    """Two param groups, a parameter without a gradient every other step, 30 steps: the
    parameters and state equal torch's (for-loop) in float64."""
    kw = richest(name)
    ours, theirs = params_like(), params_like()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    opt = getattr(ft, name)(groups(ours), **kw)
    ref = getattr(torch.optim, name)(groups(theirs), foreach=False, **kw)
    train(opt, ours, 30, skip={1})
    train(ref, theirs, 30, skip={1})
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for p, q in zip(ours, theirs):
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in ref.state[q].items():
            torch.testing.assert_close(torch.as_tensor(opt.state[p][key], dtype=value.dtype),
                                       value, rtol=0, atol=1e-12)


# -- the protocol --------------------------------------------------------------------------

def test_param_forms_and_defaults():
    params = params_like()
    named = ft.AdamW(list(zip("abcd", params)), lr=0.01)
    assert named.param_groups[0]["param_names"] == list("abcd")
    assert named.defaults["lr"] == 0.01 and named.defaults["betas"] == (0.9, 0.999)
    # torch's implementation flags are group keys, as torch's AdamW has them; fastopt's
    # own arguments (the cautious variant) are the only others
    assert set(ft.AdamW(params_like()).param_groups[0]) == set(
        torch.optim.AdamW(params_like()).param_groups[0]) | {"cautious"}
    single = ft.SGD(params[0:1], lr=0.1, momentum=0.9)
    assert single.defaults["momentum"] == 0.9
    with pytest.raises(TypeError, match="Tensors"):
        ft.Adam([np.zeros(3)])


def test_add_param_group_checked():
    params = params_like()
    opt = ft.Adam(params[:2], lr=0.01)
    opt.add_param_group({"params": params[2:3], "lr": 0.1})
    with pytest.raises(ValueError, match=r"param_groups\[2\]: lr must be"):
        opt.add_param_group({"params": params[3:], "lr": -1.0})
    assert len(opt.param_groups) == 2
    opt.add_param_group({"params": params[3:]})
    train(opt, params, 3)
    ref = torch.optim.Adam([{"params": p} for p in [params_like()[:2]]], lr=0.01,
                           foreach=False)
    theirs = params_like()
    ref = torch.optim.Adam(theirs[:2], lr=0.01, foreach=False)
    ref.add_param_group({"params": theirs[2:3], "lr": 0.1})
    ref.add_param_group({"params": theirs[3:]})
    train(ref, theirs, 3)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_closure_zero_grad_accumulation_hooks():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, dtype=torch.float64)
    opt = ft.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for _ in range(3):
        for o, m in ((opt, model), (ref, twin)):
            def closure(m=m, o=o):
                o.zero_grad()
                assert torch.is_grad_enabled()
                loss = m(x).square().sum()
                loss.backward()
                m(x).sum().backward()  # accumulated into .grad
                return loss
            with torch.no_grad():
                loss = o.step(closure)
            assert isinstance(loss, torch.Tensor)
    assert calls == ["pre", "post"] * 3
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: nothing changes
    assert_same(before, model.parameters())


def test_pre_hook_replaces_arguments():
    params = params_like()
    opt = ft.Adam(params)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0],), {"closure": lambda: 7}))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(kwargs["closure"]()))
    set_grads(params, grads_for(params, 0))
    assert opt.step() == 7 and seen == [7]


def _scheduled(opt_cls, sched_factory, steps, **kw):
    params = params_like(shapes=[(2,)])
    opt = opt_cls(params, **kw)
    sched = sched_factory(opt)
    lrs = []
    for t in range(steps):
        set_grads(params, grads_for(params, t))
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0 / (1 + t // 50))
        else:
            sched.step()
        group = opt.param_groups[0]
        lrs.append((group["lr"], group.get("betas"), group.get("momentum")))
    return lrs, params


LRS = torch.optim.lr_scheduler
SCHEDULERS = {
    "LambdaLR": lambda o: LRS.LambdaLR(o, lambda t: 0.99 ** t),
    "MultiplicativeLR": lambda o: LRS.MultiplicativeLR(o, lambda t: 0.999),
    "StepLR": lambda o: LRS.StepLR(o, step_size=70, gamma=0.5),
    "MultiStepLR": lambda o: LRS.MultiStepLR(o, milestones=[100, 400, 401], gamma=0.3),
    "ConstantLR": lambda o: LRS.ConstantLR(o, factor=0.25, total_iters=300),
    "LinearLR": lambda o: LRS.LinearLR(o, start_factor=0.1, total_iters=500),
    "ExponentialLR": lambda o: LRS.ExponentialLR(o, gamma=0.997),
    "PolynomialLR": lambda o: LRS.PolynomialLR(o, total_iters=800, power=1.5),
    "CosineAnnealingLR": lambda o: LRS.CosineAnnealingLR(o, T_max=250, eta_min=1e-5),
    "CosineAnnealingWarmRestarts":
        lambda o: LRS.CosineAnnealingWarmRestarts(o, T_0=90, T_mult=2, eta_min=1e-6),
    "CyclicLR": lambda o: LRS.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=120,
                                       mode="triangular2"),
    "OneCycleLR": lambda o: LRS.OneCycleLR(o, max_lr=0.05, total_steps=1000),
    "ReduceLROnPlateau": lambda o: LRS.ReduceLROnPlateau(o, patience=3, factor=0.5),
    "SequentialLR": lambda o: LRS.SequentialLR(
        o, [LRS.LinearLR(o, start_factor=0.01, total_iters=100),
            LRS.CosineAnnealingLR(o, T_max=900)], milestones=[100]),
    "ChainedScheduler": lambda o: LRS.ChainedScheduler(
        [LRS.ExponentialLR(o, gamma=0.999), LRS.StepLR(o, step_size=200, gamma=0.5)]),
}


def test_every_scheduler_class_is_covered():
    classes = {name for name, cls in vars(LRS).items() if isinstance(cls, type)
               and issubclass(cls, (LRS.LRScheduler, LRS.ReduceLROnPlateau))
               and cls not in (LRS.LRScheduler, LRS._LRScheduler)}
    assert classes <= set(SCHEDULERS), classes - set(SCHEDULERS)


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_torch_schedulers(sched, name):
    """1000 steps: learning rates (and cycled betas / momentum) equal torch's, and so do
    the parameters."""
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    ours, p1 = _scheduled(getattr(ft, name), SCHEDULERS[sched], 1000, **kw)
    theirs, p2 = _scheduled(getattr(torch.optim, name), SCHEDULERS[sched], 1000,
                            foreach=False, **kw)
    assert ours == theirs
    torch.testing.assert_close(p1[0], p2[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sched", ["OneCycleLR", "CyclicLR", "CosineAnnealingWarmRestarts"])
def test_fastopt_schedulers(sched):
    """fastopt.schedules drive fastopt.torch as they drive the array API."""
    from fastopt import schedules
    factory = {
        "OneCycleLR": lambda o: schedules.OneCycleLR(o, max_lr=0.05, total_steps=300),
        "CyclicLR": lambda o: schedules.CyclicLR(o, base_lr=1e-4, max_lr=1e-2,
                                                 step_size_up=40),
        "CosineAnnealingWarmRestarts":
            lambda o: schedules.CosineAnnealingWarmRestarts(o, T_0=30, T_mult=2),
    }[sched]
    ours, params = _scheduled(ft.AdamW, factory, 300, lr=0.01)
    arrays = [p.detach().numpy().copy() for p in params_like(shapes=[(2,)])]
    ref = fastopt.AdamW(arrays, lr=0.01)
    s = factory(ref)
    want = []
    for t in range(300):
        ref.step([g.numpy() for g in grads_for([torch.from_numpy(arrays[0])], t)])
        s.step()
        group = ref.param_groups[0]
        want.append((group["lr"], group["betas"], None))
    assert ours == want
    np.testing.assert_array_equal(params[0].detach().numpy(), arrays[0])


# -- GradScaler ----------------------------------------------------------------------------

def _amp_run(use_scaler, unscale_first, steps=6, inf_at=None):
    params = params_like(torch.float32)
    opt = ft.AdamW(params, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
    skipped = []
    for t in range(steps):
        grads = grads_for(params, t)
        if t == inf_at:
            grads[2][0, 0, 0] = math.inf
        if scaler is None:
            set_grads(params, grads)
            if t != inf_at:
                opt.step()
            continue
        set_grads(params, [None] * len(params))
        scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        before = scaler.get_scale()
        scaler.update()
        skipped.append(scaler.get_scale() < before)
    return params, opt, skipped


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler(unscale_first):
    """The fused path (the unscale folded into the update pass) and the standard path
    (scaler.unscale_ first): the same bits as the unscaled gradients' steps; a step with
    inf skipped (nothing changes, the scale backs off)."""
    want, ref, _ = _amp_run(False, unscale_first, inf_at=3)
    got, opt, skipped = _amp_run(True, unscale_first, inf_at=3)
    assert skipped == [False, False, False, True, False, False]
    assert_same(got, want)
    for p, q in zip(got, want):
        assert opt.state[p]["step"] == ref.state[q]["step"] == 5
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


def test_grad_scaler_fused_clipping():
    """max_grad_norm with the fused path: the norm of the unscaled gradients clips, as
    unscale_ + clip_grad_norm_ + step does."""
    params, twins = params_like(torch.float32), params_like(torch.float32)
    opt = ft.Adam(params, lr=0.01, max_grad_norm=0.5)
    ref = ft.Adam(twins, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for t in range(4):
        grads = grads_for(params, t)
        set_grads(params, [None] * len(params))
        scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
        scaler.step(opt)
        scaler.update()
        set_grads(twins, grads)
        torch.nn.utils.clip_grad_norm_(twins, 0.5, foreach=False)
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-7)


# -- checkpoints ---------------------------------------------------------------------------

def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", TORCH_RULES)
def test_checkpoints_cross_load(name):
    """torch's checkpoint resumes in fastopt.torch and fastopt.torch's in torch (saved and
    loaded with weights_only=True); each continues as the unbroken run of its source."""
    kw = richest(name)
    unbroken = params_like()
    ref = getattr(torch.optim, name)(unbroken, foreach=False, **kw)
    train(ref, unbroken, 10)
    train(ref, unbroken, 10, start=10)
    for first, second in ((torch.optim, ft), (ft, torch.optim)):
        params = params_like()
        extra = dict(foreach=False) if first is torch.optim else {}
        a = getattr(first, name)(params, **extra, **kw)
        train(a, params, 10)
        extra = dict(foreach=False) if second is torch.optim else {}
        b = getattr(second, name)(params, **extra, **kw)
        b.load_state_dict(_roundtrip(a.state_dict()))
        train(b, params, 10, start=10)
        for p, q in zip(params, unbroken):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [r.name for r in _rules.RULES])
def test_resume_exact(name):
    kw = richest(name)
    shapes = CASES[name].shaped(SHAPES)
    unbroken = params_like(torch.float32, shapes=shapes)
    params = params_like(torch.float32, shapes=shapes)
    ref = getattr(ft, name)(unbroken, **kw)
    train(ref, unbroken, 8)
    opt = getattr(ft, name)(params, **kw)
    train(opt, params, 4)
    resumed = getattr(ft, name)(params, **kw)
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    train(resumed, params, 4, start=4)
    assert_same(params, unbroken)


@pytest.mark.parametrize("options", [dict(), dict(state_dtype="int8"),
                                     dict(master_weights=True), dict(state_dtype="bfloat16")])
def test_bfloat16_checkpoints(options):
    """bfloat16 parameters: the state keeps its dtype through state_dict, torch.save/load
    and load_state_dict (torch's base class would cast float32 state to bfloat16), and the
    resumed run equals the unbroken one."""
    shapes = [(64, 80), (7,)]  # the first large enough for 8-bit state
    unbroken = params_like(torch.bfloat16, shapes=shapes)
    params = params_like(torch.bfloat16, shapes=shapes)
    ref = ft.AdamW(unbroken, lr=1e-3, **options)
    train(ref, unbroken, 6)
    opt = ft.AdamW(params, lr=1e-3, **options)
    train(opt, params, 3)
    dtypes = {k: v.dtype for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    resumed = ft.AdamW(params, lr=1e-3, **options)
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    assert {k: v.dtype for k, v in resumed.state[params[0]].items()
            if isinstance(v, torch.Tensor)} == dtypes
    train(resumed, params, 3, start=3)
    assert_same(params, unbroken)


def test_torch_bfloat16_state_is_widened():
    """torch keeps bfloat16 state for bfloat16 parameters; loaded into fastopt.torch (state
    in float32 by default) it is widened, exactly."""
    params = params_like(torch.bfloat16, shapes=[(5, 3)])
    ref = torch.optim.AdamW(params, foreach=False)
    train(ref, params, 2)
    opt = ft.AdamW(params)
    opt.load_state_dict(ref.state_dict())
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], ref.state[params[0]]["exp_avg"].float())


def test_copies_are_independent():
    params = params_like(torch.float32)
    opt = ft.AdamW(params, lr=0.01)
    train(opt, params, 2)
    clone = copy.deepcopy((params, opt))
    pickled = pickle.loads(pickle.dumps((params, opt)))
    for ps, o in ((params, opt),) + (clone, pickled):
        train(o, ps, 3, start=2)
    assert_same(params, clone[0])
    assert_same(params, pickled[0])
    assert (opt.state[params[0]]["exp_avg"].data_ptr()
            != clone[1].state[clone[0][0]]["exp_avg"].data_ptr())


def test_state_written_through_torch_is_taken_in():
    """State assigned through opt.state (as ZeroRedundancyOptimizer writes it) is used at
    the next step: torch tensors, a float step count."""
    params, twins = params_like(), params_like()
    opt, ref = ft.Adam(params, lr=0.01), ft.Adam(twins, lr=0.01)
    train(opt, params, 3)
    train(ref, twins, 3)
    for p, q in zip(params, twins):
        ref.state[q] = {k: (torch.tensor(float(v)) if k == "step" else v.clone())
                        for k, v in ref.state[q].items()}
    ref.state[twins[0]]["exp_avg"] = ref.state[twins[0]]["exp_avg"].clone()
    train(opt, params, 3, start=3)
    train(ref, twins, 3, start=3)
    assert_same(params, twins)
    assert ref.state[twins[0]]["step"] == 6


# -- bad input -----------------------------------------------------------------------------

def test_refused_arguments():
    params = params_like()
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        ft.AdamW(params, capturable=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        ft.SGD(params, differentiable=True)
    with pytest.raises(TypeError, match="bogus"):
        ft.AdamW(params, bogus=1)
    with pytest.raises(ValueError, match="state_dtype"):
        ft.AdamW(params, state_dtype="int4")
    for bad in CASES["Adam"].bad:
        with pytest.raises(bad.exc, match=bad.match):
            ft.Adam(params, **bad.kwargs)


def test_bad_step_changes_nothing():
    params = params_like()
    opt = ft.AdamW(params, lr=0.01)
    train(opt, params, 2)
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["lr"] = -1.0  # a scheduler gone wrong
    set_grads(params, grads_for(params, 5))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.01
    kept = opt.state[params[1]]["exp_avg"]
    opt.state[params[1]]["exp_avg"] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\]: dtype float64 and shape"):
        opt.step()
    opt.state[params[1]]["exp_avg"] = kept
    assert_same(before, params)
    after = opt.state_dict()
    for i, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][i][key], value)


def test_bad_state_dict_changes_nothing():
    params = params_like()
    opt = ft.Adam(params, lr=0.01)
    train(opt, params, 2)
    good = _roundtrip(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['exp_avg'\]: shape"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["betas"] = (1.5, 0.9)
    with pytest.raises(ValueError, match=r"betas\[0\] must be"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    del bad["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match="incomplete"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i, entry in good["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][i][key], value)


# -- torch.compile -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step(backend):
    """opt.step() compiles with fullgraph=True into one custom op (fastopt::step): no graph
    break, the same bits as eager, and the learning rate read when the op runs, so a
    scheduler changing it every step recompiles once (dynamo then treats it as dynamic)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    params, twins = params_like(torch.float32), params_like(torch.float32)
    opt, ref = ft.AdamW(params, lr=0.01), ft.AdamW(twins, lr=0.01)
    compiled = torch.compile(lambda: opt.step(), fullgraph=True, backend=backend)
    for t in range(6):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(twins, grads)
        compiled()
        ref.step()
        for o in (opt, ref):
            o.param_groups[0]["lr"] *= 0.9
    assert_same(params, twins)
    assert opt.state[params[0]]["step"] == 6
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 2


def test_compiled_then_eager_steps():
    """Eager steps after compiled ones update the parameters themselves (the compiled op may
    hand the step other tensors over the same memory, or copies)."""
    torch._dynamo.reset()
    params, twins = params_like(torch.float32), params_like(torch.float32)
    opt, ref = ft.Adam(params, lr=0.01), ft.Adam(twins, lr=0.01)
    compiled = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
    for t in range(4):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(twins, grads)
        compiled() if t < 2 else opt.step()
        ref.step()
    assert_same(params, twins)


# -- what torch code does to an optimizer ----------------------------------------------------

def test_parameter_replaced_in_its_group():
    """Model surgery: a parameter swapped for another in its group, its state moved."""
    params, twins = params_like(), params_like()
    opt, ref = ft.Adam(params, lr=0.01), torch.optim.Adam(twins, lr=0.01, foreach=False)
    for o, ps in ((opt, params), (ref, twins)):
        train(o, ps, 2)
        new = torch.nn.Parameter(ps[0].detach().clone())
        o.state[new] = o.state.pop(ps[0])
        o.param_groups[0]["params"][0] = ps[0] = new
        train(o, ps, 2, start=2)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opt.state[params[0]]["step"] == 4


def test_state_table_reset():
    params, twins = params_like(), params_like()
    opt, ref = ft.Adam(params, lr=0.01), ft.Adam(twins, lr=0.01)
    train(opt, params, 2)
    train(ref, twins, 2)
    opt.state = __import__("collections").defaultdict(dict)  # a common reset idiom
    ref.state.clear()
    train(opt, params, 3, start=2)
    train(ref, twins, 3, start=2)
    assert_same(params, twins)
    assert opt.state[params[0]]["step"] == 3


def test_step_bumps_the_version_counter():
    """As torch's in-place update: a backward through a graph that saved the parameter's
    old value is refused after a step."""
    w = torch.nn.Parameter(torch.ones(3))
    x = torch.nn.Parameter(torch.ones(3))
    opt = ft.SGD([w], lr=0.1)
    loss = (w * x).sum()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_grad_scaler_skip_is_reported():
    params = params_like(torch.float32)
    opt = ft.AdamW(params, lr=0.01, skip_nonfinite=True)
    scaler = torch.amp.GradScaler("cpu")
    grads = grads_for(params, 0)
    scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
    scaler.step(opt)
    scaler.update()
    assert not opt.last_step_skipped
    opt.zero_grad()
    grads[0][0, 0] = math.inf
    scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
    scaler.step(opt)
    assert opt.last_step_skipped and opt.last_grad_norm is None


def test_state_moved_from_another_optimizer_is_checked():
    params = params_like(torch.float32, shapes=[(80, 64)])
    a = ft.Adam(params, lr=0.01, state_dtype="int8")
    train(a, params, 1)
    b = ft.Adam(params, lr=0.01)
    b.state[params[0]] = a.state[params[0]]
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\]: dtype uint8"):
        train(b, params, 1, start=1)
    assert torch.equal(before, params[0].detach())


def test_hooks_see_what_torch_hooks_see():
    params = params_like()
    opt = ft.Adam(params, lr=0.01)
    train(opt, params, 1)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sd["state"][0]["step"]))
    saved = opt.state_dict()
    assert isinstance(seen[0], torch.Tensor) and seen[0].item() == 1

    def pre(o, sd):
        sd["param_groups"] = [dict(g, lr=0.5) for g in sd["param_groups"]]
    opt.register_load_state_dict_pre_hook(pre)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.5 and saved["param_groups"][0]["lr"] == 0.01


def test_malformed_state_dicts():
    params = params_like()
    opt = ft.Adam(params, lr=0.01)
    train(opt, params, 1)
    good = opt.state_dict()
    cases = [
        ([], TypeError, "state_dict: expected a dict"),
        ({"state": {}}, ValueError, "keys 'state' and 'param_groups'"),
        ({"state": [], "param_groups": good["param_groups"]}, TypeError,
         r"state_dict\['state'\]: expected a dict"),
        ({"state": {}, "param_groups": {"params": []}}, TypeError, "a list of dicts"),
        ({"state": {}, "param_groups": [{"lr": 0.1}]}, TypeError, "under 'params'"),
        ({"state": {}, "param_groups": [dict(good["param_groups"][0], params=[0, 0, 1, 2])]},
         ValueError, "more than once"),
        ({"state": {}, "param_groups": [dict(good["param_groups"][0], capturable=True)]},
         ValueError, "capturable=True"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            opt.load_state_dict(bad)


def test_positional_arguments_follow_torch():
    params = params_like()
    opt = ft.Adagrad(params, 0.1, 0.0, 0.0, 0.0, 1e-10, None)  # foreach, as torch's
    assert opt.param_groups[0]["maximize"] is False
    with pytest.raises(TypeError, match="Adam: too many positional arguments"):
        ft.Adam(params, 1e-3, (0.9, 0.999), 1e-8, 0.0, False, True)
