"""The plan a step keeps for the next one (Optimizer._steady): a step that reuses it does
exactly what a step planned anew does, for every change a user can make between steps,
and the common step reuses it."""

import numpy as np
import pytest
from conftest import require_backend

import fastopt

RULES = {
    "Adam": {"lr": 0.01},
    "SGD": {"lr": 0.01, "momentum": 0.9},
    "NAdam": {"lr": 0.01},
    "Adafactor": {"lr": 0.01},
    "Prodigy": {},
    "AdamWScheduleFree": {"lr": 0.01, "warmup_steps": 3},
}
SHAPES = [(3, 4), (3, 4), (5,)]


class Sub(np.ndarray):
    pass


def _numpy_edits():
    """name -> edit(opt, params, grads): changes the optimizer or its arrays and returns the
    gradients of the next step."""
    rng = np.random.default_rng(7)

    def new_like(p):
        return rng.standard_normal(p.shape).astype(p.dtype)

    def group_params(opt):
        return opt.param_groups[0]["params"]

    def set_state(opt, key, value):
        opt.state[0][key] = value

    def add_param(opt, params, grads):
        extra = new_like(params[2])
        group_params(opt).append(extra)
        return grads + [np.ones_like(extra)]

    def add_group(opt, params, grads):
        extra = new_like(params[2])
        opt.add_param_group({"params": [extra]})
        return grads + [np.ones_like(extra)]

    return {
        "none": lambda opt, params, grads: grads,
        "grad_float64": lambda opt, params, grads: [grads[0].astype(np.float64)] + grads[1:],
        "grad_big_endian": lambda opt, params, grads: [grads[0].astype(">f4")] + grads[1:],
        "grad_none": lambda opt, params, grads: [grads[0], None, grads[2]],
        "grad_all_none": lambda opt, params, grads: [None] * 3,
        "grad_strided": lambda opt, params, grads: [
            np.repeat(grads[0], 2, axis=1)[:, ::2]] + grads[1:],
        "grad_subclass": lambda opt, params, grads: [grads[0].view(Sub)] + grads[1:],
        "grad_shape": lambda opt, params, grads: [grads[0].reshape(4, 3)] + grads[1:],
        "grad_tuple": lambda opt, params, grads: tuple(grads),
        "grad_generator": lambda opt, params, grads: (g for g in grads),
        "grad_fewer": lambda opt, params, grads: grads[:2],
        "grad_is_other_param": lambda opt, params, grads: [params[1]] + grads[1:],
        "grad_is_state": lambda opt, params, grads: [next(  # Adafactor's are factored
            (v for v in opt.state[0].values() if getattr(v, "shape", None) == (3, 4)),
            grads[0])] + grads[1:],
        "param_replaced": lambda opt, params, grads: (
            group_params(opt).__setitem__(0, new_like(params[0])), grads)[1],
        "param_read_only": lambda opt, params, grads: (
            setattr(params[0].flags, "writeable", False), grads)[1],
        "param_reshaped": lambda opt, params, grads: (
            setattr(params[0], "shape", (4, 3)), grads)[1],
        "param_appended": add_param,
        "params_list_replaced": lambda opt, params, grads: (
            opt.param_groups[0].__setitem__("params", list(group_params(opt))), grads)[1],
        "state_replaced": lambda opt, params, grads: (
            opt.state.__setitem__(0, dict(opt.state[0])), grads)[1],
        "state_buffer_wrong": lambda opt, params, grads: (
            set_state(opt, next(k for k, v in opt.state[0].items() if hasattr(v, "shape")),
                      np.zeros(5, np.float32)), grads)[1],
        "state_step_edited": lambda opt, params, grads: (
            set_state(opt, "step", opt.state[0].get("step", 0) + 5), grads)[1],
        "state_cleared": lambda opt, params, grads: (opt.state.clear(), grads)[1],
        "group_replaced": lambda opt, params, grads: (
            opt.param_groups.__setitem__(0, dict(opt.param_groups[0])), grads)[1],
        "group_lr": lambda opt, params, grads: (
            opt.param_groups[0].__setitem__("lr", 0.5), grads)[1],
        "group_bad_lr": lambda opt, params, grads: (
            opt.param_groups[0].__setitem__("lr", -1.0), grads)[1],
        "group_added": add_group,
        "masks": lambda opt, params, grads: (
            opt.set_masks([np.arange(12).reshape(3, 4) % 3 != 0, None, None]), grads)[1],
        "reloaded": lambda opt, params, grads: (
            opt.load_state_dict(opt.state_dict()), grads)[1],
        "max_grad_norm": lambda opt, params, grads: (
            setattr(opt, "max_grad_norm", 0.5), grads)[1],
    }


NUMPY_EDITS = _numpy_edits()


def _snapshot(opt, params):
    def copy(v):  # NumPy arrays and torch tensors
        if hasattr(v, "detach"):
            return v.detach().numpy().copy()
        return np.array(v, copy=True) if hasattr(v, "shape") else v
    return ([copy(p) for p in opt.params()] + [copy(p) for p in params],
            {i: {k: copy(v) for k, v in s.items()} for i, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            (opt.last_step_skipped, opt.last_grad_norm))


def _assert_same(a, b):
    assert len(a[0]) == len(b[0])
    for x, y in zip(a[0], b[0]):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            np.testing.assert_array_equal(a[1][i][k], b[1][i][k])
    assert a[2] == b[2] and a[3] == b[3]


def _outcome(opt, params, grads):
    """What a step does: its exception (type and message) or None, then the state."""
    try:
        opt.step(grads)
        error = None
    except (TypeError, ValueError) as e:
        error = (type(e), str(e))
    return error, _snapshot(opt, params)


def _numpy_run(rule, edit, kept, backend):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = getattr(fastopt, rule)(params, backend=backend, **RULES[rule])
    for _ in range(3):
        opt.step([rng.standard_normal(s).astype(np.float32) for s in SHAPES])
    assert opt._steady is not None  # the plan is kept for NumPy parameters
    if not kept:
        opt._steady = None
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    first = _outcome(opt, params, _numpy_edits()[edit](opt, params, grads))
    follow = [rng.standard_normal(p.shape).astype(p.dtype) for p in opt.params()]
    return first, _outcome(opt, params, follow), opt


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("edit", NUMPY_EDITS)
def test_kept_plan_does_what_a_new_plan_does(rule, edit):
    """After three steps, `edit`, then two steps: the optimizer that kept its plan raises
    the same errors and writes the same bits as one made to plan each step anew."""
    require_backend("cython")
    kept = _numpy_run(rule, edit, True, "cython")
    anew = _numpy_run(rule, edit, False, "cython")
    for a, b in zip(kept[:2], anew[:2]):
        assert a[0] == b[0]
        _assert_same(a[1], b[1])
    if edit == "none":
        assert kept[0][0] is None


@pytest.mark.parametrize("backend", ["numpy", "cython", "numba"])
@pytest.mark.parametrize("edit", ["none", "group_lr", "max_grad_norm"])
def test_the_common_step_reuses_the_plan(monkeypatch, backend, edit):
    """Steps after the first plan nothing anew while the parameters, states and kinds of
    gradients stay as they were (a learning rate changed by a schedule included)."""
    require_backend(backend)
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = fastopt.Adam(params, lr=0.01, backend=backend)
    opt.step([np.ones_like(p) for p in params])
    planned = []
    prepare = opt._prepare
    monkeypatch.setattr(opt, "_prepare", lambda grads: planned.append(1) or prepare(grads))
    grads = [np.ones_like(p) for p in params]
    NUMPY_EDITS[edit](opt, params, grads)
    for _ in range(3):
        opt.step(grads)
    assert planned == []
    assert opt.state[0]["step"] == 4


def _torch_edits(torch):
    def rebound(opt, params, grads):
        params[0].data = torch.full_like(params[0], 2.0)
        return grads
    return {
        "none": lambda opt, params, grads: grads,
        "grad_float64": lambda opt, params, grads: [grads[0].double()] + grads[1:],
        "grad_none": lambda opt, params, grads: [grads[0], None, grads[2]],
        "grad_strided": lambda opt, params, grads: [
            grads[0].t().contiguous().t()] + grads[1:],
        "grad_requires_grad": lambda opt, params, grads: [
            grads[0].requires_grad_()] + grads[1:],
        "grad_numpy": lambda opt, params, grads: [grads[0].numpy()] + grads[1:],
        "grad_negated_view": lambda opt, params, grads: [
            torch.ones(3, 4)._neg_view()] + grads[1:],
        "param_rebound": rebound,
        "param_transposed": lambda opt, params, grads: (params[0].t_(), grads)[1],
        "state_replaced": lambda opt, params, grads: (
            opt.state.__setitem__(0, dict(opt.state[0])), grads)[1],
    }


def _torch_run(torch, rule, edit, kept):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = getattr(fastopt, rule)(params, backend="cython", **RULES[rule])
    for _ in range(3):
        opt.step([torch.randn(s, generator=gen) for s in SHAPES])
    assert opt._steady is not None and not opt._steady.numpy and opt._steady.torch
    if not kept:
        opt._steady = None
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    first = _outcome(opt, params, _torch_edits(torch)[edit](opt, params, grads))
    return first, _outcome(opt, params, [torch.randn(p.shape, generator=gen) for p in params])


@pytest.mark.parametrize("rule", ["Adam", "SGD", "Adafactor"])
@pytest.mark.parametrize("edit", ["none", "grad_float64", "grad_none", "grad_strided",
                                  "grad_requires_grad", "grad_numpy", "grad_negated_view",
                                  "param_rebound", "param_transposed", "state_replaced"])
def test_kept_plan_of_torch_tensors_does_what_a_new_plan_does(torch, rule, edit):
    require_backend("cython")
    kept = _torch_run(torch, rule, edit, True)
    anew = _torch_run(torch, rule, edit, False)
    for a, b in zip(kept, anew):
        assert a[0] == b[0]
        _assert_same(a[1], b[1])
    if edit == "none":
        assert kept[0][0] is None


def test_torch_steps_plan_nothing_anew(torch, monkeypatch):
    """torch CPU parameters: with new gradient tensors at every step (zero_grad's
    set_to_none), parameters that require grad (autograd leaves, as fastopt.torch steps
    them) and a 0-d one, steps after the first plan nothing anew (the check runs in C,
    _runtime.steady_grads) and give the bits of steps planned anew."""
    require_backend("cython")
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,), ()]
    runs = []
    for kept in (True, False):
        params = [torch.randn(s, generator=gen.manual_seed(3)) for s in shapes]
        opt = fastopt.AdamW(params, lr=0.01, backend="cython")
        opt.step([torch.ones(s) for s in shapes])
        assert opt._steady is not None and opt._steady.torch
        planned = []
        prepare = opt._prepare
        monkeypatch.setattr(opt, "_prepare", lambda grads: planned.append(1) or prepare(grads))
        for t in range(3):
            if not kept:
                opt._steady = None
            opt.step([torch.full(s, 0.5 + t) for s in shapes])
        assert planned == ([] if kept else [1, 1, 1])
        runs.append([p.clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_failed_step_drops_the_plan(monkeypatch):
    """A step that raises after planning leaves no plan behind: the next one checks
    everything again."""
    require_backend("cython")
    params = [np.ones(4, np.float32)]
    opt = fastopt.Adam(params, lr=0.1, backend="cython")
    opt.step([np.ones(4, np.float32)])
    assert opt._steady is not None

    def fail(plan):
        raise RuntimeError("injected")
    monkeypatch.setattr(opt, "_check_kernels", fail)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step([np.ones(4, np.float32)])
    assert opt._steady is None
    monkeypatch.undo()
    opt.step([np.ones(4, np.float32)])
    assert opt.state[0]["step"] == 2


SEQUENCES = {  # which parameters each step has gradients for
    "skip_then_all": [(1, 1, 1), (1, 0, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1)],
    "first_skipped": [(1, 0, 0), (1, 1, 0), (1, 1, 1), (0, 1, 1), (1, 1, 1), (1, 1, 1)],
    "late_first": [(1, 0, 0), (1, 1, 0), (1, 1, 0), (1, 1, 0)],
}
SEQUENCE_RULES = {
    "SGD": {"lr": 0.01, "momentum": 0.9},
    "SGD-bf16": {"lr": 0.01, "momentum": 0.9, "dtype": "bfloat16"},
    "Lion-bf16": {"lr": 0.01, "dtype": "bfloat16"},
    "ASGD": {"lr": 0.01, "t0": 2},
    "NAdam": {"lr": 0.01},
    "Prodigy": {},
    "Adam-int8": {"lr": 0.01, "state_dtype": "int8", "sizes": (5000, 10, 4096)},
}


def _sequence_run(rule, sequence, kept):
    hyper = dict(SEQUENCE_RULES[rule])
    dtype = np.dtype(fastopt._interop.bfloat16() if hyper.pop("dtype", None) else np.float32)
    sizes = hyper.pop("sizes", (12, 12, 5))
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    opt = getattr(fastopt, rule.split("-")[0])(params, backend="cython", **hyper)
    for pattern in SEQUENCES[sequence]:
        if not kept:
            opt._steady = None
        opt.step([rng.standard_normal(n).astype(dtype) if on else None
                  for n, on in zip(sizes, pattern)])
    return _snapshot(opt, params), opt


@pytest.mark.parametrize("rule", SEQUENCE_RULES)
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_kept_plan_follows_parameters_that_skipped_steps(rule, sequence):
    """Parameters whose gradients were None at some steps have other step counts (and SGD
    its momentum buffer only later): the calls a kept plan makes are those of a new plan,
    and each parameter keeps its own step count."""
    require_backend("cython")
    kept, opt = _sequence_run(rule, sequence, True)
    anew, _ = _sequence_run(rule, sequence, False)
    _assert_same(kept, anew)
    taken = [sum(pattern[t] for pattern in SEQUENCES[sequence]) for t in range(3)]
    if "step" in opt.state[0]:
        assert [opt.state[t]["step"] for t in range(3) if t in opt.state] == taken[:len(
            opt.state)]
    kept_plan = opt._steady
    assert kept_plan is not None
    grads = [np.ones(p.shape, p.dtype) if on else None
             for p, on in zip(opt.params(), SEQUENCES[sequence][-1])]
    new_plan, _ = opt._prepare(grads)  # checks and plans only: writes nothing

    def split(plan):
        return [[item[0] for item in call.items] for call in plan.calls]
    assert split(kept_plan) == split(new_plan)


@pytest.mark.parametrize("edit", ["state_dtype", "defaultdict_state", "tuple_groups",
                                  "no_runtime"])
def test_kept_plan_after_changes_to_the_optimizer(monkeypatch, edit):
    """Changes to the optimizer object itself between steps: a kept plan does what a new
    one does (the 8-bit split of state_dtype, containers of another type, the compiled
    helper gone)."""
    require_backend("cython")

    def run(kept):
        rng = np.random.default_rng(5)
        sizes = (10, 5000)
        params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        opt = fastopt.Adam(params, lr=0.01, backend="cython",
                           state_dtype="int8" if edit == "state_dtype" else None)
        for _ in range(2):
            opt.step([rng.standard_normal(n).astype(np.float32) for n in sizes])
        if not kept:
            opt._steady = None
        if edit == "state_dtype":
            opt.state_dtype = None
        elif edit == "defaultdict_state":
            opt.state = __import__("collections").defaultdict(dict, opt.state)
        elif edit == "tuple_groups":
            opt.param_groups = tuple(opt.param_groups)
        else:
            monkeypatch.setattr(fastopt._interop, "_runtime", None)
        outcomes = []
        for _ in range(2):
            outcomes.append(_outcome(opt, params, [rng.standard_normal(n).astype(np.float32)
                                                   for n in sizes]))
        monkeypatch.undo()
        return outcomes
    for a, b in zip(run(True), run(False)):
        assert a[0] == b[0]
        _assert_same(a[1], b[1])


def test_set_masks_waits_for_a_step_in_another_thread(monkeypatch):
    """set_masks and add_param_group take the step's lock: masks set while another thread
    steps apply from the next step on, not lost with the plan that step keeps."""
    import threading
    require_backend("cython")
    params = [np.ones(8, np.float32)]
    opt = fastopt.SGD(params, lr=0.5, backend="cython")
    opt.step([np.ones(8, np.float32)])
    inside, release = threading.Event(), threading.Event()
    run_staged = opt._run_staged

    def paused(staged):
        inside.set()
        release.wait(10)
        run_staged(staged)
    monkeypatch.setattr(opt, "_run_staged", paused)
    stepper = threading.Thread(target=opt.step, args=([np.ones(8, np.float32)],))
    stepper.start()
    assert inside.wait(10)
    masker = threading.Thread(target=opt.set_masks, args=([np.arange(8) % 2 == 0],))
    masker.start()
    masker.join(0.2)
    assert masker.is_alive()  # waits for the step
    release.set()
    stepper.join(10)
    masker.join(10)
    monkeypatch.undo()
    opt.step([np.ones(8, np.float32)])
    assert params[0].tolist() == [-0.5, 0.0] * 4


def test_state_made_by_a_reused_plan_splits_the_calls_anew():
    """SGD with momentum turned off, then on again, over parameters of which one skipped
    the first step: the step that makes the second momentum buffer plans the next step's
    calls anew (one call, as a new plan makes), with the bits of a plan made each step."""
    require_backend("cython")

    def run(kept):
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(8).astype(np.float32) for _ in range(2)]
        opt = fastopt.SGD(params, lr=0.1, momentum=0.9, backend="cython")
        calls = []
        for t, momentum in enumerate([0.9, 0.0, 0.9, 0.9, 0.9]):
            opt.param_groups[0]["momentum"] = momentum
            if not kept:
                opt._steady = None
            grads = [rng.standard_normal(8).astype(np.float32) for _ in range(2)]
            opt.step([grads[0], None] if t == 0 else grads)
            calls.append(None if opt._steady is None else len(opt._steady.calls))
        return _snapshot(opt, params), calls
    kept, calls = run(True)
    anew, _ = run(False)
    _assert_same(kept, anew)
    assert calls[-1] == 1
