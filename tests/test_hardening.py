"""Inputs that would be read wrong: refused with a TypeError naming the argument, before
anything is written."""

import numpy as np
import pytest
from conftest import CPU_BACKENDS, require_backend

import fastopt


def _big(a):
    return a.astype(a.dtype.newbyteorder(">"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["param", "grad", "both"])
def test_optimizer_refuses_non_native_byte_order(backend, dtype, which):
    require_backend(backend)
    w = np.linspace(-1, 1, 9).astype(dtype)
    g = np.full(9, 6.0, dtype)
    p = _big(w) if which in ("param", "both") else w
    grad = _big(g) if which in ("grad", "both") else g
    before = p.copy()
    opt = fastopt.Adam([p], lr=0.1, backend=backend, max_grad_norm=1.0)
    name = r"params\[0\]" if which in ("param", "both") else r"grads\[0\]"
    with pytest.raises(TypeError, match=rf"{name}: byte order of dtype '>f[48]'"):
        opt.step([grad])
    np.testing.assert_array_equal(p, before)
    assert opt.state == {} or all(not s for s in opt.state.values())


@pytest.mark.parametrize("call, name", [
    (lambda x: fastopt.clip_grad_norm_([x], 1.0), r"grads\[0\]"),
    (lambda x: fastopt.clip_grad_value_([x], 1.0), r"grads\[0\]"),
    (lambda x: fastopt.prune.magnitude_mask(x, 0.5), "w"),
    (lambda x: fastopt.init.uniform_(x, seed=0), "tensor"),
    (lambda x: fastopt.quant.quantize(x, 0.1, 0, "int8"), "x"),
    (lambda x: fastopt.quant.qparams(x, "int8"), "x"),
    (lambda x: fastopt.weight_norm(x.reshape(3, 4), np.ones((3, 1), x.dtype)), "v"),
    (lambda x: fastopt.distill.kd_loss(x.reshape(3, 4), np.zeros((3, 4), np.float32)),
     "student_logits"),
], ids=["clip_grad_norm_", "clip_grad_value_", "magnitude_mask", "uniform_", "quantize",
        "qparams", "weight_norm", "kd_loss"])
def test_public_functions_refuse_non_native_byte_order(call, name):
    x = _big(np.linspace(-3, 3, 12).astype(np.float32))
    before = x.copy()
    with pytest.raises(TypeError, match=rf"{name}: byte order of dtype '>f4' is not this"):
        call(x)
    np.testing.assert_array_equal(x, before)


def test_values_that_are_only_read_may_have_any_byte_order():
    """Quantization parameters are values, read with their dtype: converted, not refused."""
    q = np.array([1, 2, 3, 4], np.int8)
    got = fastopt.quant.dequantize(q, np.array([0.5], ">f8"), np.array([1], ">i8"))
    np.testing.assert_array_equal(got, fastopt.quant.dequantize(q, 0.5, 1))


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (2**31, ValueError), (-3, ValueError),
                                      (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_thread_counts_are_checked_up_front(bad, exc):
    w = np.zeros(3, np.float32)
    with pytest.raises(exc, match="n_threads must be an integer >= 1"):
        fastopt.Adam([w], n_threads=bad)
    with pytest.raises(exc, match="n must be an integer >= 1"):
        fastopt.set_num_threads(bad)
    opt = fastopt.Adam([w], n_threads=np.int64(2))  # NumPy integers are integers
    assert opt.n_threads == 2 and type(opt.n_threads) is int


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 10**400, 2**60, -1, 1.5, True,
                                 "3", [3]])
def test_loaded_step_counts_are_finite_integers(bad):
    w = np.zeros(3)
    opt = fastopt.Adam([w])
    opt.step([np.ones(3)])
    saved = opt.state_dict()
    saved["state"][0] = dict(saved["state"][0], step=bad)
    fresh = fastopt.Adam([np.zeros(3)])
    with pytest.raises(ValueError, match=r"\['step'\]: expected an integer >= 0 \(at most "):
        fresh.load_state_dict(saved)
    assert fresh.state == {}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concurrent_steps_of_one_optimizer_serialize(backend):
    """Two threads stepping one optimizer: the same as the steps one after the other."""
    import threading
    require_backend(backend)
    rng = np.random.default_rng(3)
    start = [rng.standard_normal(n).astype(np.float32) for n in (70001, 5)]
    grads = [np.full_like(w, 0.5) for w in start]

    def run(threads):
        params = [w.copy() for w in start]
        opt = fastopt.Adam(params, lr=1e-2, backend=backend)
        barrier = threading.Barrier(threads)

        def work():
            barrier.wait()
            for _ in range(40 // threads):
                opt.step(grads)
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        return params, opt.state

    (got, got_state), (want, want_state) = run(2), run(1)
    assert got_state[0]["step"] == want_state[0]["step"] == 40
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_optimizer_copies_get_their_own_lock():
    import copy
    w = np.zeros(3)
    opt = fastopt.Adam([w], lr=0.1)
    twin = copy.deepcopy(opt)
    twin.step([np.ones(3)])
    assert twin.state[0]["step"] == 1 and opt.state == {}


def test_numba_backend_leaves_openmp_unnested():
    """Numba's OpenMP layer turns nesting on in the libgomp that a fastopt extension loaded
    first and torch then shares (torch's per-tensor steps went 20-40x slower); loading the
    backend turns it off again."""
    import subprocess
    import sys
    require_backend("numba")
    code = ("import ctypes\n"
            "from fastopt._cpu import _stream\n"  # loads the system libgomp first
            "from fastopt import _backends, _config\n"
            "assert _backends.available('numba')\n"
            "levels = [ctypes.CDLL(p).omp_get_max_active_levels()\n"
            "          for p in _config.openmp_runtimes() if 'libgomp' in p]\n"
            "print(levels)\n"
            "assert levels and all(level == 1 for level in levels), levels\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_NESTED", "OMP_MAX_ACTIVE_LEVELS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- what every test below checks: a refused call changed nothing --------------------------

def _snapshot(opt, params):
    """Bytes of the parameters and a deep copy of the optimizer's state and step report."""
    def host(x):
        return x.detach().numpy().copy() if hasattr(x, "detach") else np.array(x, copy=True)
    state = {i: {k: host(v) if hasattr(v, "shape") else v for k, v in s.items()}
             for i, s in opt.state.items()}
    return [host(p) for p in params], state, (opt.last_step_skipped, opt.last_grad_norm)


def _assert_unchanged(opt, params, snap):
    got = _snapshot(opt, params)
    for x, y in zip(got[0], snap[0]):
        np.testing.assert_array_equal(x, y)
    assert got[1].keys() == snap[1].keys()
    for i in snap[1]:
        assert got[1][i].keys() == snap[1][i].keys()
        for k in snap[1][i]:
            np.testing.assert_array_equal(got[1][i][k], snap[1][i][k])
    assert got[2] == snap[2]


def _stepped(rule, backend, shapes=((3, 4), (5,)), **hyper):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = getattr(fastopt, rule)(params, backend=backend, **hyper)
    opt.step([np.ones_like(p) for p in params])
    return opt, params


# -- class 1: arrays that change between steps ---------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["Adam", "Adafactor", "Lamb"])
@pytest.mark.parametrize("change", ["reshape", "retype_wider", "retype_int"])
def test_numpy_parameter_changed_in_place_is_checked_again(backend, rule, change):
    """After a step, w.shape = ... or w.dtype = ... in place: the next step checks the
    parameter and its state as a fresh optimizer would (the Numba Adafactor kernel wrote
    past its state here before)."""
    require_backend(backend)
    opt, params = _stepped(rule, backend)
    w = params[0]
    if change == "reshape":
        w.shape = (4, 3)
    elif change == "retype_wider":
        w.dtype = np.float64  # 12 float32 -> 6 float64: shape (3, 2)
    else:
        w.dtype = np.int32
    snap = _snapshot(opt, params)
    grads = [np.ones(w.shape, np.float32 if change == "retype_int" else w.dtype),
             np.ones_like(params[1])]
    if change == "retype_int":
        with pytest.raises(TypeError, match=r"params\[0\]: dtype int32 is not supported"):
            opt.step(grads)
    else:
        with pytest.raises((ValueError, TypeError), match=r"state\[0\]|params\[0\]|grads\[0\]"):
            opt.step(grads)
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("change", ["t_", "data_t", "as_strided_", "data_other_shape",
                                    "data_retyped"])
def test_torch_parameter_changed_between_steps_is_checked_again(torch, backend, change):
    """A torch parameter rebound or re-strided after a step: refused as a fresh optimizer
    refuses it (a transposed parameter used to receive its update at the wrong elements)."""
    require_backend(backend)
    p = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
    opt = fastopt.Adam([p], lr=0.1, backend=backend)
    opt.step([torch.ones(4, 4)])
    if change == "t_":
        p.t_()
    elif change == "data_t":
        p.data = p.data.t()
    elif change == "as_strided_":
        p.as_strided_((4, 4), (1, 4))
    elif change == "data_other_shape":
        p.data = torch.zeros(2, 8)
    else:
        p.data = p.data.view(torch.int32)
    snap = _snapshot(opt, [p])
    g = torch.ones(p.shape, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=r"params\[0\]|state\[0\]|grads\[0\]"):
        opt.step([g])
    _assert_unchanged(opt, [p], snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_parameter_rebound_to_new_memory_is_updated_there(torch, backend):
    """p.data = other memory of the same layout: the step updates the new memory."""
    require_backend(backend)
    p = torch.zeros(6)
    opt = fastopt.SGD([p], lr=0.5, backend=backend)
    opt.step([torch.ones(6)])
    old = p.data
    p.data = torch.full((6,), 2.0)
    opt.step([torch.ones(6)])
    assert torch.equal(p, torch.full((6,), 1.5)) and torch.equal(old, torch.full((6,), -0.5))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_mask_rebound_between_steps_is_followed(torch, backend):
    require_backend(backend)
    p = torch.ones(8)
    mask = torch.ones(8, dtype=torch.bool)
    opt = fastopt.SGD([p], lr=0.5, backend=backend, masks=[mask])
    opt.step([torch.ones(8)])
    mask.data = torch.arange(8) % 2 == 0  # prune the odd entries from now on
    opt.step([torch.ones(8)])
    assert p.tolist() == [0.0, 0.0] * 4
    mask.data = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks\[0\]: shape \(4,\) does not match"):
        opt.step([torch.ones(8)])


# -- class 3: state buffers -----------------------------------------------------------------

def _read_only_memmap(path, like):
    like.tofile(path)
    return np.memmap(path, like.dtype, "r", shape=like.shape)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad, error, message", [
    ("memmap", ValueError, "read-only"),
    ("frombuffer", ValueError, "read-only"),
    ("wrong_size", ValueError, "do not fit"),
    ("wrong_dtype", ValueError, "do not fit"),
    ("big_endian", ValueError, "do not fit"),
    ("strided", ValueError, "not C-contiguous"),
    ("list", TypeError, "expected a numpy.ndarray"),
])
def test_state_buffers_are_checked_before_anything_is_written(backend, bad, error, message,
                                                              tmp_path):
    require_backend(backend)
    opt, params = _stepped("Adam", backend)
    good = opt.state[0]["exp_avg"]
    buf = {"memmap": lambda: _read_only_memmap(tmp_path / "m.bin", good),
           "frombuffer": lambda: np.frombuffer(good.tobytes(), good.dtype).reshape(good.shape),
           "wrong_size": lambda: np.zeros(5, good.dtype),
           "wrong_dtype": lambda: good.astype(np.float64),
           "big_endian": lambda: good.astype(">f4"),
           "strided": lambda: np.zeros((3, 8), good.dtype)[:, ::2],
           "list": lambda: good.tolist()}[bad]()
    opt.state[0]["exp_avg"] = buf
    snap = _snapshot(opt, params)
    with pytest.raises(error, match=rf"state\[0\]\['exp_avg'\]: .*{message}"):
        opt.step([np.ones_like(p) for p in params])
    _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("bad", [10**400, float("inf"), -1, "3", 2.5])
def test_edited_step_counts_are_checked(bad):
    opt, params = _stepped("Adam", "numpy")
    opt.state[1]["step"] = bad
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state\[1\]\['step'\]: expected an integer"):
        opt.step([np.ones_like(p) for p in params])
    _assert_unchanged(opt, params, snap)


def test_unknown_state_keys_are_refused():
    opt, params = _stepped("Adam", "numpy")
    opt.state[0]["exp_avg_sqr"] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"state\[0\]: unknown key 'exp_avg_sqr'"):
        opt.step([np.ones_like(p) for p in params])


@pytest.mark.parametrize("rule, hyper, drop", [
    ("Adam", {}, "exp_avg_sq"), ("Adam", {"amsgrad": True}, "max_exp_avg_sq"),
    ("Adam", {}, "step"), ("NAdam", {}, "mu_product"), ("RMSprop", {"momentum": 0.9},
                                                            "momentum_buffer"),
    ("RMSprop", {"centered": True}, "grad_avg"), ("Adafactor", {}, "col_var"),
])
def test_loaded_state_must_be_complete(rule, hyper, drop):
    opt, params = _stepped(rule, "numpy", **hyper)
    saved = opt.state_dict()
    del saved["state"][0][drop]
    fresh = getattr(fastopt, rule)([p.copy() for p in params], **hyper)
    with pytest.raises(ValueError, match=rf"incomplete, missing \['{drop}'\]"):
        fresh.load_state_dict(saved)
    assert fresh.state == {}
    saved["state"][0] = {}  # an empty entry is a parameter not stepped yet
    fresh.load_state_dict(saved)
    assert 0 not in fresh.state and fresh.state[1]


@pytest.mark.parametrize("key", ["initial_lr", "max_lr", "base_momentum"])
@pytest.mark.parametrize("value", [float("nan"), [0.1], "0.1", -1.0, None])
def test_loaded_schedule_keys_must_be_numbers(key, value):
    opt, params = _stepped("SGD", "numpy", lr=0.1)
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    with pytest.raises((ValueError, TypeError), match=rf"\['param_groups'\]\[0\]: {key}"):
        fastopt.SGD([p.copy() for p in params], lr=0.1).load_state_dict(saved)


# -- class 4: a failed call changes nothing ---------------------------------------------------

class Injected(Exception):
    pass


def _failing(calls, fail_at):
    """A stand-in that raises Injected at call number `fail_at` (from 0) and otherwise
    calls the real function."""
    def wrap(real):
        def call(*args, **kwargs):
            calls.append(None)
            if len(calls) - 1 == fail_at:
                raise Injected()
            return real(*args, **kwargs)
        return call
    return wrap


def _two_bucket_problem(rule, backend, **options):
    """Parameters of two dtypes (two kernel calls per step), stepped twice."""
    rng = np.random.default_rng(1)
    params = [rng.standard_normal((3, 4)).astype(np.float32),
              rng.standard_normal(7).astype(np.float64)]
    opt = getattr(fastopt, rule)(params, backend=backend, **options)
    grads = [np.full_like(p, 0.5) for p in params]
    return opt, params, grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["Adam", "NAdam", "Adafactor", "Lamb", "SGD"])
@pytest.mark.parametrize("stage, first_step", [  # state is created at the first step
    ("norm", True), ("norm", False), ("state", True), ("kernel", True), ("kernel", False)])
def test_a_failure_at_any_stage_of_a_step_changes_nothing(monkeypatch, backend, rule, stage,
                                                          first_step):
    """A failure injected before the first kernel of a step writes (the norm pass, state
    creation, the kernel's entry) leaves parameters, state, step counts and the step report
    bit for bit as they were; the next step then runs as if the failed one never happened."""
    from fastopt import _backends, _interop
    from fastopt.optim import _clip
    require_backend(backend)
    hyper = {"momentum": 0.9} if rule == "SGD" else {}
    opt, params, grads = _two_bucket_problem(rule, backend, max_grad_norm=1.0, **hyper)
    twin, twin_params, _ = _two_bucket_problem(rule, backend, max_grad_norm=1.0, **hyper)
    if not first_step:
        opt.step(grads)
        twin.step(grads)
    snap = _snapshot(opt, params)
    calls = []
    if stage == "norm":
        monkeypatch.setattr(_clip, "total_norm", _failing(calls, 0)(_clip.total_norm))
    elif stage == "state":  # the second buffer made: Adam's, or SGD's of the 2nd call
        monkeypatch.setattr(_interop, "full_like", _failing(calls, 1)(_interop.full_like))
    else:
        resolve = _backends.resolve

        def failing_resolve(op, *args):
            kernel = resolve(op, *args)
            return _failing(calls, 0)(kernel) if op == opt._op else kernel
        monkeypatch.setattr(_backends, "resolve", failing_resolve)
    with pytest.raises(Injected):
        opt.step(grads)
    _assert_unchanged(opt, params, snap)
    monkeypatch.undo()
    opt.step(grads)
    twin.step(grads)
    _assert_unchanged(opt, params, _snapshot(twin, twin_params))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_kernel_failing_after_another_ran_leaves_each_state_matching_its_parameter(
        monkeypatch, backend):
    """Should the second kernel call of a step fail (after every check passed, so only an
    internal error could), the first call's parameters moved with their step counts and
    the second call's parameters and state are as they were."""
    from fastopt import _backends
    require_backend(backend)
    opt, params, grads = _two_bucket_problem("Adam", backend)
    ref, ref_params, _ = _two_bucket_problem("Adam", backend)
    opt.step(grads)
    ref.step(grads)
    before = _snapshot(opt, params)
    resolve, calls = _backends.resolve, []

    def failing_resolve(op, *args):
        kernel = resolve(op, *args)
        return _failing(calls, 1)(kernel) if op == "adam_step" else kernel
    monkeypatch.setattr(_backends, "resolve", failing_resolve)
    with pytest.raises(Injected):
        opt.step(grads)
    ref.step([grads[0], None])  # what the first call did: parameter 0 only
    np.testing.assert_array_equal(params[0], ref_params[0])
    assert opt.state[0]["step"] == 2
    np.testing.assert_array_equal(params[1], before[0][1])
    assert opt.state[1]["step"] == 1
    np.testing.assert_array_equal(opt.state[1]["exp_avg"], before[1][1]["exp_avg"])


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_a_kernel_failing_after_another_ran_settles_the_first_call(monkeypatch, backend):
    """As above, with JAX parameters (the kernel writes new arrays, which the optimizer
    hands back after the calls) and a weight EMA (moved inside the Cython update pass, after
    the calls elsewhere): the first call's parameter is handed back and its average moved,
    as a step of that parameter alone does; the second call's are as they were."""
    jnp = pytest.importorskip("jax.numpy")
    import importlib
    require_backend(backend)
    module = importlib.import_module(f"fastopt._backends._{backend}")
    rng = np.random.default_rng(2)
    values = [rng.standard_normal(s).astype(np.float32) for s in ((30,), (7,))]
    grads = [jnp.full(v.shape, 0.5, jnp.float32) for v in values]

    def problem():
        opt = fastopt.AdamW([jnp.asarray(v) for v in values], backend=backend, ema_decay=0.9)
        opt.step([grads[0], None])  # parameter 0 a step ahead: two kernel calls per step
        opt.step([grads[0], None])  # and an average to move
        return opt
    opt, ref = problem(), problem()
    real, calls = module.elementwise, []

    def failing(kernel, *args, **kwargs):
        calls.append(kernel)
        if calls.count("adam") == 2:  # the second call's update (Numba: after call 1's EMA)
            raise Injected()
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(module, "elementwise", failing)
    with pytest.raises(Injected):
        opt.step(grads)
    monkeypatch.setattr(module, "elementwise", real)
    ref.step([grads[0], None])
    ours, theirs = opt.param_groups[0]["params"], ref.param_groups[0]["params"]
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    assert opt.state[0]["step"] == 3
    np.testing.assert_array_equal(opt.state[0]["ema"], ref.state[0]["ema"])
    np.testing.assert_array_equal(np.asarray(ours[1]), values[1])
    assert 1 not in opt.state


# -- class 5: overlapping memory --------------------------------------------------------------

@pytest.mark.parametrize("views", [
    lambda b: [b[:], b[:]], lambda b: [b[:6], b[4:]], lambda b: [b[::2], b[1::2]],
    lambda b: [b.reshape(2, 5), b[3:5]]])
def test_overlapping_parameters_are_refused(views):
    buf = np.zeros(10)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        fastopt.Adam(views(buf))


def test_strided_views_that_interleave_are_refused_as_overlapping():
    """Parameters must be contiguous to be stepped, and the spans of two interleaved views
    overlap: refused (a conservative check, exact for the contiguous arrays steps take)."""
    buf = np.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        fastopt.SGD([buf[::2], buf[1::2]])


def test_overlapping_parameters_added_later_are_refused():
    buf = np.zeros(10)
    opt = fastopt.Adam([buf[:5]])
    with pytest.raises(ValueError, match=r"params\[1\] and params\[0\] share memory|"
                                         r"params\[0\] and params\[1\] share memory"):
        opt.add_param_group({"params": [buf[4:]]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [buf[5:]]})  # adjacent is fine


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("search", ["compiled", "python"])
def test_gradients_overlapping_what_a_step_writes_are_refused(monkeypatch, backend, search):
    """Checked every step, in C (fastopt._cpu._runtime) or, where it is not built, in
    Python."""
    from fastopt import _interop
    require_backend(backend)
    if search == "python":
        monkeypatch.setattr(_interop, "_runtime", None)
    opt, params = _stepped("Adam", backend, shapes=((6,), (6,)))
    snap = _snapshot(opt, params)
    cases = {r"grads\[0\] and params\[1\]": [params[1], np.ones(6, np.float32)],
             r"grads\[1\] and state\[0\]\['exp_avg'\]": [np.ones(6, np.float32),
                                                          opt.state[0]["exp_avg"]]}
    for message, grads in cases.items():
        with pytest.raises(ValueError, match=message + " share memory"):
            opt.step(grads)
        _assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_gradient_may_be_its_own_parameter(backend):
    """g is p (an update from the parameter's own values, as in weight-decay-only tests):
    the same result as a copy of it."""
    require_backend(backend)
    w = np.linspace(-1, 1, 7)
    twin = w.copy()
    fastopt.Adam([w], lr=0.1, backend=backend).step([w])
    fastopt.Adam([twin], lr=0.1, backend=backend).step([twin.copy()])
    np.testing.assert_array_equal(w, twin)
    w = np.linspace(-1, 1, 8)
    with pytest.raises(ValueError, match=r"grads\[0\] and params\[0\] share memory"):
        fastopt.Adam([w[:4]], backend=backend).step([w[2:6]])  # part of itself: refused


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_or_parameter_memory_shared_after_a_step_is_refused(torch, backend):
    require_backend(backend)
    opt, params = _stepped("Adam", backend, shapes=((6,), (6,)))
    opt.state[0]["exp_avg"] = params[1]
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"params\[1\] and state\[0\]\['exp_avg'\] share"):
        opt.step([np.ones(6, np.float32)] * 2)
    _assert_unchanged(opt, params, snap)
    a, b = torch.zeros(5), torch.zeros(5)
    opt = fastopt.SGD([a, b], lr=0.1, backend=backend)
    opt.step([torch.ones(5), torch.ones(5)])
    b.data = a.data
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        opt.step([torch.ones(5), torch.ones(5)])
    assert torch.equal(a, torch.full((5,), -0.1))


# -- class 8: errors of the right kind --------------------------------------------------------

@pytest.mark.parametrize("edit, error, message", [
    (lambda s: s.update(state=[]), TypeError, r"\['state'\]: expected a dict, got list"),
    (lambda s: s.update(param_groups={}), TypeError, r"\['param_groups'\]: expected a list"),
    (lambda s: s["param_groups"].__setitem__(0, [1]), TypeError,
     r"\['param_groups'\]: expected a list of dicts"),
    (lambda s: s["param_groups"][0].update(params=3), TypeError,
     r"\['params'\]: expected a list of parameter indices"),
    (lambda s: s["state"].__setitem__(0, []), TypeError, r"\[0\]: expected a dict, got list"),
    (lambda s: s["state"][0].update(exp_avg=[0.0] * 5), TypeError,
     r"\['exp_avg'\]: expected an array, got list"),
    (lambda s: s["state"][0].update(exp_avg=0.5), TypeError,
     r"\['exp_avg'\]: expected an array, got float"),
    (lambda s: s["param_groups"][0].update(params=[0, 0]), ValueError, "distinct integer"),
])
def test_load_state_dict_refuses_wrong_kinds_by_name(edit, error, message):
    opt, params = _stepped("Adam", "numpy", shapes=((5,), (5,)))
    saved = opt.state_dict()
    saved = {"state": {i: dict(s) for i, s in saved["state"].items()},
             "param_groups": [dict(g) for g in saved["param_groups"]]}
    edit(saved)
    fresh = fastopt.Adam([p.copy() for p in params])
    with pytest.raises(error, match=message):
        fresh.load_state_dict(saved)
    assert fresh.state == {}


def test_unknown_hyperparameters_are_refused_by_the_constructor_as_by_load():
    w = np.zeros(3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: unknown keys \['learning_rate'\]"):
        fastopt.Adam([{"params": [w], "learning_rate": 0.1}])
    opt = fastopt.Adam([{"params": [w], "lr": 0.1, "initial_lr": 0.1}])  # schedules' keys
    fastopt.Adam([np.zeros(3)]).load_state_dict(opt.state_dict())


def test_a_torch_parameter_list_is_a_list(torch):
    plist = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(3), requires_grad=False),
                                    torch.nn.Parameter(torch.ones(2), requires_grad=False)])
    opt = fastopt.SGD(plist, lr=0.5)
    opt.step([torch.ones(3), torch.ones(2)])
    assert [p.tolist() for p in plist] == [[0.5] * 3, [0.5] * 2]
    opt = fastopt.SGD([{"params": plist}], lr=0.5)
    assert len(opt.param_groups[0]["params"]) == 2
