"""Schedulers against torch.optim.lr_scheduler: 1000 steps, several param groups."""

import copy
import math
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import schedules

STEPS = 1000
LRS = (0.1, 0.02, 0.5)


class Halve:
    def __call__(self, step):
        return 0.5 ** (step // 100)


def lam(step):
    return 1.0 / (1 + 0.01 * step)


def mult(step):
    return 0.999 if step % 7 else 1.01


# (class name, kwargs, optimizer: "sgd" (momentum) or "adam" (betas))
CASES = [
    ("LambdaLR", dict(lr_lambda=lam), "sgd"),
    ("LambdaLR", dict(lr_lambda=[lam, Halve(), lambda s: 1.0]), "sgd"),
    ("MultiplicativeLR", dict(lr_lambda=mult), "sgd"),
    ("StepLR", dict(step_size=30), "sgd"),
    ("StepLR", dict(step_size=7, gamma=0.97), "adam"),
    ("MultiStepLR", dict(milestones=[10, 300, 300, 800], gamma=0.5), "sgd"),
    ("ConstantLR", dict(), "sgd"),
    ("ConstantLR", dict(factor=0.1, total_iters=200), "sgd"),
    ("LinearLR", dict(), "sgd"),
    ("LinearLR", dict(start_factor=0.01, end_factor=0.5, total_iters=333), "adam"),
    ("ExponentialLR", dict(gamma=0.995), "sgd"),
    ("PolynomialLR", dict(total_iters=700, power=2.0), "sgd"),
    ("PolynomialLR", dict(), "sgd"),
    ("CosineAnnealingLR", dict(T_max=250), "sgd"),
    ("CosineAnnealingLR", dict(T_max=77, eta_min=1e-3), "adam"),
    ("CosineAnnealingWarmRestarts", dict(T_0=50), "sgd"),
    ("CosineAnnealingWarmRestarts", dict(T_0=10, T_mult=2, eta_min=1e-4), "sgd"),
    ("CyclicLR", dict(base_lr=1e-3, max_lr=0.1, step_size_up=40), "sgd"),
    ("CyclicLR", dict(base_lr=[1e-3, 1e-4, 1e-2], max_lr=0.2, step_size_up=25,
                      step_size_down=60, mode="triangular2"), "adam"),
    ("CyclicLR", dict(base_lr=1e-3, max_lr=0.1, step_size_up=30, mode="exp_range",
                      gamma=0.999, base_momentum=0.7, max_momentum=0.95), "sgd"),
    ("CyclicLR", dict(base_lr=1e-3, max_lr=0.1, step_size_up=30, cycle_momentum=False), "sgd"),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=STEPS), "sgd"),
    ("OneCycleLR", dict(max_lr=[0.1, 0.05, 1.0], total_steps=STEPS + 10,
                        anneal_strategy="linear", pct_start=0.25), "adam"),
    ("OneCycleLR", dict(max_lr=0.3, epochs=10, steps_per_epoch=100, three_phase=True,
                        div_factor=10.0, final_div_factor=100.0), "sgd"),
]


def _groups(params):
    return [{"params": [p], "lr": lr} for p, lr in zip(params, LRS)]


def make_opt(kind):
    """A fastopt optimizer of three param groups: "sgd" (with momentum) or "adam"."""
    params = [np.zeros(2) for _ in LRS]
    if kind == "sgd":
        return fastopt.SGD(_groups(params), lr=0.1, momentum=0.9)
    return fastopt.Adam(_groups(params), lr=0.1)


def make_pair(kind):
    """make_opt's optimizer and torch's like it."""
    import torch
    tparams = [torch.zeros(2) for _ in LRS]
    if kind == "sgd":
        return make_opt(kind), torch.optim.SGD(_groups(tparams), lr=0.1, momentum=0.9)
    return make_opt(kind), torch.optim.Adam(_groups(tparams), lr=0.1)


def assert_groups_match(opt, topt, where):
    for g, tg in zip(opt.param_groups, topt.param_groups):
        assert g["lr"] == pytest.approx(tg["lr"], rel=1e-12, abs=1e-300), where
        if "momentum" in tg:
            assert g["momentum"] == pytest.approx(tg["momentum"], rel=1e-12), where
        if "betas" in tg:
            assert g["betas"][0] == pytest.approx(tg["betas"][0], rel=1e-12), where
            assert g["betas"][1] == tg["betas"][1]


def _ids(case):
    name, kw, kind = case
    return f"{name}-{kind}-" + ",".join(f"{k}={v}" for k, v in kw.items() if k != "lr_lambda")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_matches_torch(case, torch):
    name, kw, kind = case
    opt, topt = make_pair(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(schedules, name)(opt, **kw)
        tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kw)
        assert_groups_match(opt, topt, "at construction")
        moved = set()
        for step in range(STEPS):
            sched.step()
            tsched.step()
            assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-12)
            assert_groups_match(opt, topt, f"step {step + 1}")
            moved.add(round(opt.param_groups[0]["lr"], 15))
    assert len(moved) > 1 or name == "ConstantLR"


def test_sequential_and_chained_match_torch(torch):
    for build in (
        lambda m, o: m.SequentialLR(o, [m.LinearLR(o, start_factor=0.1, total_iters=50),
                                        m.CosineAnnealingLR(o, T_max=400),
                                        m.ExponentialLR(o, gamma=0.99)], milestones=[50, 450]),
        lambda m, o: m.SequentialLR(o, [m.ConstantLR(o, factor=0.5, total_iters=20),
                                        m.StepLR(o, step_size=100, gamma=0.3)], milestones=[30]),
        lambda m, o: m.ChainedScheduler([m.ConstantLR(o, factor=0.2, total_iters=40),
                                         m.ExponentialLR(o, gamma=0.998)]),
        lambda m, o: m.ChainedScheduler([m.LinearLR(o, start_factor=0.3, total_iters=100),
                                         m.MultiStepLR(o, milestones=[200, 600])], o),
    ):
        opt, topt = make_pair("sgd")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched, tsched = build(schedules, opt), build(torch.optim.lr_scheduler, topt)
            assert_groups_match(opt, topt, "at construction")
            for step in range(STEPS):
                sched.step()
                tsched.step()
                assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-12)
                assert_groups_match(opt, topt, f"step {step + 1}")


@pytest.mark.parametrize("kw", [
    dict(),
    dict(mode="max", factor=0.5, patience=3, threshold=0.01, cooldown=5, min_lr=[1e-3, 0, 0.2]),
    dict(threshold_mode="abs", threshold=0.05, patience=0, eps=1e-2, min_lr=1e-4),
    dict(mode="max", threshold_mode="abs", factor=0.0, patience=20),
])
def test_reduce_on_plateau_matches_torch(kw, torch):
    opt, topt = make_pair("sgd")
    sched = schedules.ReduceLROnPlateau(opt, **kw)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kw)
    rng = np.random.default_rng(5)
    metric = 10.0
    for step in range(STEPS):
        metric = metric * (0.999 if step % 50 < 25 else 1.0005) + 0.01 * rng.standard_normal()
        sched.step(metric)
        tsched.step(metric)
        assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-12)
        assert sched.num_bad_epochs == tsched.num_bad_epochs
        assert_groups_match(opt, topt, f"step {step + 1}")


def test_state_dict_resumes_exactly():
    def build(o):
        return schedules.OneCycleLR(o, max_lr=0.1, total_steps=300, three_phase=True)
    opt = make_opt("adam")
    sched = build(opt)
    for _ in range(120):
        sched.step()
    saved, saved_opt = copy.deepcopy(sched.state_dict()), copy.deepcopy(opt.state_dict())
    want = []
    for _ in range(100):
        sched.step()
        want.append((sched.get_last_lr(), opt.param_groups[0]["betas"]))
    opt2 = make_opt("adam")
    sched2 = build(opt2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    got = []
    for _ in range(100):
        sched2.step()
        got.append((sched2.get_last_lr(), opt2.param_groups[0]["betas"]))
    assert got == want
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        sched2.load_state_dict(dict(saved, bogus=1))


def test_state_survives_save_and_load(tmp_path):
    def build(o):
        first = schedules.MultiStepLR(o, milestones=[3, 3, 9], gamma=0.5)
        return schedules.SequentialLR(o, [first, schedules.StepLR(o, 4)], milestones=[12])
    opt = make_opt("sgd")
    sched = build(opt)
    for _ in range(5):
        sched.step()
    fastopt.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.npz")
    want = []
    for _ in range(20):
        sched.step()
        want.append(sched.get_last_lr())
    opt2 = make_opt("sgd")
    sched2 = build(opt2)
    saved = fastopt.load(tmp_path / "s.npz")
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    got = []
    for _ in range(20):
        sched2.step()
        got.append(sched2.get_last_lr())
    assert got == want


def test_scheduled_lr_reaches_the_kernels():
    w = np.zeros(3)
    opt = fastopt.SGD([w], lr=1.0)
    sched = schedules.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step([np.ones(3)])
        sched.step()
    np.testing.assert_array_equal(w, -(1.0 + 0.5 + 0.25))


BAD = [
    ("StepLR", dict(step_size=0), ValueError, r"step_size must be >= 1"),
    ("StepLR", dict(step_size=-3), ValueError, r"step_size must be >= 1"),
    ("StepLR", dict(step_size=2.5), TypeError, r"step_size must be an integer"),
    ("StepLR", dict(step_size=2, gamma=-0.1), ValueError, r"gamma must be"),
    ("MultiStepLR", dict(milestones=[3, -1]), ValueError, r"milestones\[1\] must be >= 0"),
    ("ConstantLR", dict(factor=1.5), ValueError, r"factor must be"),
    ("LinearLR", dict(start_factor=0.0), ValueError, r"start_factor must be"),
    ("LinearLR", dict(total_iters=0), ValueError, r"total_iters must be >= 1"),
    ("ExponentialLR", dict(gamma=float("nan")), ValueError, r"gamma must be"),
    ("PolynomialLR", dict(total_iters=0), ValueError, r"total_iters must be >= 1"),
    ("CosineAnnealingLR", dict(T_max=0), ValueError, r"T_max must be >= 1"),
    ("CosineAnnealingLR", dict(T_max=10, eta_min=-1.0), ValueError, r"eta_min must be"),
    ("CosineAnnealingWarmRestarts", dict(T_0=0), ValueError, r"T_0 must be >= 1"),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=0), ValueError, r"T_mult must be >= 1"),
    ("CyclicLR", dict(base_lr=0.1, max_lr=1.0, mode="cosine"), ValueError, r"mode must be one of"),
    ("CyclicLR", dict(base_lr=[0.1], max_lr=1.0), ValueError, r"base_lr: expected 3 values"),
    ("CyclicLR", dict(base_lr=0.1, max_lr=1.0, step_size_up=0), ValueError, r"step_size_up"),
    ("OneCycleLR", dict(max_lr=0.1), ValueError, r"needs total_steps"),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=100, last_epoch=150), ValueError,
     r"last_epoch 150 is past total_steps 100"),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=100, anneal_strategy="exp"), ValueError,
     r"anneal_strategy must be one of"),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=100, pct_start=1.5), ValueError, r"pct_start"),
    ("ReduceLROnPlateau", dict(mode="lowest"), ValueError, r"mode must be one of"),
    ("ReduceLROnPlateau", dict(factor=1.0), ValueError, r"factor must be"),
    ("ReduceLROnPlateau", dict(threshold_mode="pct"), ValueError, r"threshold_mode must be"),
    ("ReduceLROnPlateau", dict(patience=-1), ValueError, r"patience must be >= 0"),
]


@pytest.mark.parametrize("name,kw,exc,message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_arguments_raise_at_construction(name, kw, exc, message):
    opt = make_opt("sgd")
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(exc, match=message):
        getattr(schedules, name)(opt, **kw)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in before]


def test_misuse():
    opt = make_opt("adam")
    with pytest.raises(TypeError, match="must be a fastopt optimizer"):
        schedules.StepLR(object(), step_size=3)
    with pytest.raises(ValueError, match="neither momentum nor betas"):
        schedules.CyclicLR(fastopt.Adagrad([np.zeros(2)]), base_lr=0.1, max_lr=1.0)
    sched = schedules.OneCycleLR(opt, max_lr=0.1, total_steps=5)
    for _ in range(5):
        sched.step()
    lr = opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="past total_steps"):
        sched.step()
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 5
    plateau = schedules.ReduceLROnPlateau(opt)
    with pytest.raises(TypeError, match="metrics must be a real number"):
        plateau.step("low")
    assert math.isfinite(opt.param_groups[0]["lr"])


# -- closed-form schedules --------------------------------------------------------------

def test_closed_forms_match_torch_schedulers(torch):
    steps = np.arange(STEPS)
    pairs = [
        (schedules.step_decay(0.1, step_size=30, gamma=0.5), "StepLR",
         dict(step_size=30, gamma=0.5)),
        # optax's cosine_decay holds its end value; torch's cosine turns back up after T_max
        (schedules.cosine_decay(0.1, STEPS - 1), "CosineAnnealingLR", dict(T_max=STEPS - 1)),
        (schedules.sgdr(0.1, T_0=10, T_mult=2, eta_min=1e-4), "CosineAnnealingWarmRestarts",
         dict(T_0=10, T_mult=2, eta_min=1e-4)),
        (schedules.sgdr(0.1, T_0=50), "CosineAnnealingWarmRestarts", dict(T_0=50)),
        (schedules.cyclic_triangular(1e-3, 0.1, 25, 60, mode="triangular2"), "CyclicLR",
         dict(base_lr=1e-3, max_lr=0.1, step_size_up=25, step_size_down=60,
              mode="triangular2")),
        (schedules.cyclic_triangular(1e-3, 0.1, 30, mode="exp_range", gamma=0.999), "CyclicLR",
         dict(base_lr=1e-3, max_lr=0.1, step_size_up=30, mode="exp_range", gamma=0.999)),
        (schedules.one_cycle(STEPS, 0.1), "OneCycleLR", dict(max_lr=0.1, total_steps=STEPS)),
        (schedules.one_cycle(STEPS, 0.3, pct_start=0.25, anneal_strategy="linear",
                             three_phase=True), "OneCycleLR",
         dict(max_lr=0.3, total_steps=STEPS, pct_start=0.25, anneal_strategy="linear",
              three_phase=True)),
    ]
    for schedule, name, kw in pairs:
        topt = torch.optim.SGD([torch.zeros(1)], lr=0.1, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kw)
            want, want_m = [], []
            for _ in steps:
                want.append(topt.param_groups[0]["lr"])
                want_m.append(topt.param_groups[0]["momentum"])
                if len(want) < STEPS:
                    tsched.step()
        np.testing.assert_allclose(schedule(steps), want, rtol=1e-12, atol=1e-15, err_msg=name)
        if schedule.momentum is not None:
            np.testing.assert_allclose(schedule.momentum(steps), want_m, rtol=1e-12,
                                       err_msg=name)
        assert schedule(7) == schedule(steps)[7]


def test_closed_forms_match_optax():
    optax = pytest.importorskip("optax")
    steps = np.arange(0, 1200, 3)
    pairs = [
        (schedules.linear(0.1, 0.01, 500, transition_begin=100),
         optax.linear_schedule(0.1, 0.01, 500, transition_begin=100)),
        (schedules.polynomial(0.1, 0.001, 2.0, 800),
         optax.polynomial_schedule(0.1, 0.001, 2.0, 800)),
        (schedules.exponential_decay(0.1, 100, 0.5, transition_begin=50, staircase=True,
                                     end_value=0.01),
         optax.exponential_decay(0.1, 100, 0.5, transition_begin=50, staircase=True,
                                 end_value=0.01)),
        (schedules.cosine_decay(0.1, 700, alpha=0.1, exponent=2.0),
         optax.cosine_decay_schedule(0.1, 700, alpha=0.1, exponent=2.0)),
        (schedules.warmup_cosine_decay(0.0, 0.1, 100, 1000, end_value=1e-3),
         optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 1000, end_value=1e-3)),
        (schedules.join([schedules.constant(0.5), schedules.linear(0.1, 0.0, 300)], [200]),
         optax.join_schedules([optax.constant_schedule(0.5), optax.linear_schedule(0.1, 0.0, 300)],
                              [200])),
    ]
    for ours, theirs in pairs:
        want = np.array([float(theirs(int(t))) for t in steps])
        np.testing.assert_allclose(ours(steps), want, rtol=2e-6, atol=1e-9)  # optax: float32


def test_warmup_linear_and_constant():
    s = schedules.warmup_linear(0.0, 1.0, 10, 110, end_value=0.5)
    np.testing.assert_allclose(s([0, 5, 10, 60, 110, 500]), [0, 0.5, 1.0, 0.75, 0.5, 0.5])
    assert schedules.constant(0.3)(np.arange(4)).tolist() == [0.3] * 4


def test_closed_form_bad_arguments():
    with pytest.raises(ValueError, match="decay_steps must be >= 1"):
        schedules.cosine_decay(0.1, 0)
    with pytest.raises(ValueError, match="step_size must be >= 1"):
        schedules.step_decay(0.1, -5)
    with pytest.raises(ValueError, match=r"boundaries: expected 1"):
        schedules.join([schedules.constant(1.0), schedules.constant(2.0)], [])
    with pytest.raises(ValueError, match="mode must be one of"):
        schedules.cyclic_triangular(0.1, 1.0, 10, mode="sine")
    with pytest.raises(ValueError, match="decay_steps must be >= 11"):
        schedules.warmup_cosine_decay(0.0, 0.1, 10, 5)
    with pytest.raises(TypeError, match="step must be a number"):
        schedules.linear(1.0, 0.0, 10)("three")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = schedules.plot(schedules.one_cycle(500, 0.1), 500, tmp_path / "one_cycle.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    schedules.plot(schedules.warmup_cosine_decay(0, 1, 10, 100), np.arange(100),
                   tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000
