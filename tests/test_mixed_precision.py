"""Low-precision parameters and state through the optimizers (fastopt._backends._formats):
every rule on every CPU backend bit-identical to the NumPy reference for each storage
format, stochastic rounding that does not stall where rounding to nearest does, resume,
composition with masks, clipping and skipped steps, frameworks, and torch's fused bf16
optimizers as the conformance reference of rounding to nearest."""

import copy

import numpy as np
import pytest
from cases import CASES, config_id, spread, tiered
from conftest import CPU_BACKENDS, require_backend

import fastopt
from fastopt._backends import _formats

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
COMPILED = [b for b in CPU_BACKENDS if b != "numpy"]

# (parameter dtype, gradient dtype, optimizer options): each axis met at least once
FORMATS = {
    "bf16": ("bfloat16", "bfloat16", {}),
    "bf16-f32grad-bf16state": ("bfloat16", "float32", dict(state_dtype="bfloat16")),
    "f16-bf16state-nearest": ("float16", "float16",
                              dict(state_dtype="bfloat16", stochastic_rounding=False)),
    "bf16-master": ("bfloat16", "float32", dict(master_weights=True)),
    "f16-f32grad-master-bf16state-sr": ("float16", "float32",
                                        dict(master_weights=True, state_dtype="bfloat16",
                                             stochastic_rounding=True, seed=2**64 - 1)),
    "f32-bf16state": ("float32", "float32", dict(state_dtype="bfloat16", seed=7)),
    "f32-int8": ("float32", "float32", dict(state_dtype="int8")),
    "bf16-int8-master": ("bfloat16", "bfloat16", dict(state_dtype="int8", master_weights=True)),
}
SIZES = (0, 1, 7, 9, 1023, 16385)
STEPS = 4


def _dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def _shapes(case):
    return case.shaped(case.shapes if case.shapes is not None else SIZES)


def run(name, kw, fmt, backend, n_threads, steps=STEPS, seed=0, masks=None, **extra):
    pdtype, gdtype, options = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    shapes = _shapes(CASES[name])
    params = [rng.standard_normal(s).astype(np.float32).astype(_dtype(pdtype))
              for s in shapes]
    opt = getattr(fastopt, name)(params, backend=backend, n_threads=n_threads, masks=masks,
                                 **options, **extra, **kw)
    for _ in range(steps):
        opt.step([rng.standard_normal(s).astype(np.float32).astype(_dtype(gdtype))
                  for s in shapes])
    return params, opt.state, opt


def assert_same(got, want):
    """(params, optimizer state) pairs, bit for bit (as unsigned integers: NaN payloads
    included)."""
    (gp, gstate), (wp, wstate) = got, want
    for i, (a, b) in enumerate(zip(gp, wp)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"params[{i}]")
    assert gstate.keys() == wstate.keys()
    for i, ref in wstate.items():
        assert gstate[i].keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, np.ndarray):
                assert gstate[i][key].dtype == value.dtype, key
                np.testing.assert_array_equal(_bits(gstate[i][key]), _bits(value),
                                              err_msg=f"state[{i}][{key!r}]")
            else:
                assert gstate[i][key] == value, key


def _bits(a):
    return a.view(f"u{a.dtype.itemsize}")


def _grid():
    rows = [dict(case=case, kw=case.richest, rule=name, fmt=fmt, backend=backend)
            for name, case in CASES.items() for fmt in FORMATS for backend in COMPILED]
    rows = spread(rows, "n_threads", [1, 2], against=["rule", "fmt", "backend"])
    return tiered(rows, rows, ["case", "kw", "fmt", "backend", "n_threads"],
                  lambda r: f"{r['backend']}-{r['n_threads']}t-{r['fmt']}-"
                            f"{config_id(r['rule'], r['kw'])}")


@pytest.mark.parametrize("case,kw,fmt,backend,n_threads", _grid())
def test_backend_matches_reference(case, kw, fmt, backend, n_threads):
    require_backend(backend)
    want = run(case.name, kw, fmt, "numpy", 1)
    assert_same(run(case.name, kw, fmt, backend, n_threads)[:2], want[:2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", ["bf16", "f16-bf16state-nearest", "bf16-master", "f32-int8"])
def test_masks_clipping_and_skipped_steps_compose(backend, fmt):
    """Pruned entries stay +0 (their state too), max_grad_norm reads low-precision
    gradients, and a step skipped for a non-finite gradient leaves everything as it was."""
    require_backend(backend)
    rng = np.random.default_rng(3)
    masks = [rng.random(s) > 0.3 for s in SIZES]
    params, state, opt = run("AdamW", dict(lr=1e-2), fmt, backend, 2, masks=masks,
                             max_grad_norm=0.5, skip_nonfinite=True)
    want = run("AdamW", dict(lr=1e-2), fmt, "numpy", 1, masks=masks, max_grad_norm=0.5,
               skip_nonfinite=True)
    assert_same((params, state), want[:2])
    zero_code = {"exp_avg": 127, "exp_avg_sq": 0}  # the maps' 0.0 (signed, unsigned)
    for p, m, st in zip(params, masks, state.values()):
        assert np.all(_bits(p)[~m] == 0)
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            if key in st:
                zero = zero_code[key] if st[key].dtype == np.uint8 else 0
                assert np.all(_bits(st[key])[~m] == zero), key
    before = copy.deepcopy((params, dict(state)))
    grads = [np.ones(s, _dtype(FORMATS[fmt][1])) for s in SIZES]
    grads[3][2] = np.inf
    opt.step(grads)
    assert opt.last_step_skipped
    assert_same((params, opt.state), before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fmt", ["bf16", "bf16-f32grad-bf16state", "bf16-master",
                                 "f16-f32grad-master-bf16state-sr", "bf16-int8-master"])
def test_resume_is_bit_identical(backend, fmt, tmp_path):
    """A checkpoint (fastopt.save/load: bfloat16 state, master copies, step counts) resumes
    exactly, on another backend too, and stochastic rounding continues its stream."""
    require_backend(backend)
    name, kw = "Adam", dict(lr=1e-2, amsgrad=True)
    params, _, opt = run(name, kw, fmt, "numpy", 1, steps=3)
    fastopt.save(opt.state_dict(), tmp_path / "opt.fo")
    resumed_params = [p.copy() for p in params]
    pdtype, gdtype, options = FORMATS[fmt]
    resumed = getattr(fastopt, name)(resumed_params, backend=backend, **options, **kw)
    resumed.load_state_dict(fastopt.load(tmp_path / "opt.fo"))
    rng = np.random.default_rng(11)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32).astype(_dtype(gdtype))
                 for s in SIZES]
        opt.step(grads)
        resumed.step(grads)
    assert_same((resumed_params, resumed.state), (params, opt.state))


# the hyperparameters that move each rule's parameters by about 1e-4 per step (default: lr
# 1e-4; Adadelta's update is scaled by sqrt(eps) / rms(g), Adafactor's by the parameters'
# RMS, Rprop's step size grows while the gradient keeps its sign: capped here)
DRIFT_KW = {"Adadelta": dict(lr=0.1), "Adagrad": dict(lr=3e-4), "RAdam": dict(lr=3e-4),
            "Muon": dict(lr=5e-4, weight_decay=0.0),
            "Prodigy": dict(lr=1.0, d0=2e-5, growth_rate=1.0),  # d fixed after the first step
            "Rprop": dict(lr=1e-4, step_sizes=(0.0, 1e-4))}


@pytest.mark.parametrize("name", list(CASES))
def test_stochastic_rounding_does_not_stall(name):
    """lr 1e-4 on bfloat16 weights of magnitude ~1 for 200 steps: every update is below
    half an ulp (2**-9), so rounding to nearest never moves them, while stochastic rounding
    moves them by the float64 run's distance on average."""
    rng = np.random.default_rng(5)
    shape = (256, 64) if CASES[name].shapes is not None or CASES[name].matrices else 16384
    start = (1 + rng.random(shape)).astype(BF16)  # [1, 2): ulp 2**-7
    direction = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    kw = DRIFT_KW.get(name, dict(lr=1e-4))

    def moved(dtype, **options):
        """Each weight's move against its gradient."""
        p = start.astype(dtype)
        opt = getattr(fastopt, name)([p], backend="cython", **kw, **options)
        for t in range(200):
            opt.step([(direction * (1 + 0.1 * np.cos(t))).astype(np.float32 if dtype == BF16
                                                                   else dtype)])
        return (start.astype(np.float64) - p.astype(np.float64)) * direction

    exact = moved(np.float64).mean()
    assert 5e-3 < exact < 0.1, exact  # the test's premise: a visible drift in float64
    assert np.all(moved(BF16, stochastic_rounding=False) == 0.0)
    assert abs(moved(BF16).mean() - exact) < 0.1 * exact


def _torch_bf16(torch, name, params, grads_seq, fused, **kw):
    ps = [torch.from_numpy(p.view(np.int16).copy()).view(torch.bfloat16) for p in params]
    opt = getattr(torch.optim, name)(ps, **kw, **({"fused": True} if fused else
                                                 {"foreach": False}))
    for grads in grads_seq:
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.view(np.int16).copy()).view(torch.bfloat16)
        opt.step()
    return [p.view(torch.int16).numpy().view(BF16) for p in ps], opt


@pytest.mark.parametrize("name,kw,fused", [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1), True),
    ("Adam", dict(lr=3e-3, weight_decay=0.01, amsgrad=True), True),
])
def test_nearest_rounding_matches_torch_bf16(torch, name, kw, fused):
    """torch's fused CPU Adam and AdamW on bfloat16 parameters keep their state in
    bfloat16, compute in float32 and round every write to nearest: state_dtype="bfloat16",
    stochastic_rounding=False is the same, bit for bit, over 50 steps. torch's fused CPU
    SGD is no reference here: in torch 2.13 it leaves bfloat16 tensors of 33 elements
    unchanged at its first step (test_sgd_nearest_rounding_is_within_an_ulp_of_torch)."""
    rng = np.random.default_rng(1)
    sizes = (1, 33, 4099)
    params = [rng.standard_normal(n).astype(np.float32).astype(BF16) for n in sizes]
    grads_seq = [[rng.standard_normal(n).astype(np.float32).astype(BF16) for n in sizes]
                 for _ in range(50)]
    want, topt = _torch_bf16(torch, name, params, grads_seq, fused, **kw)
    got = [p.copy() for p in params]
    opt = getattr(fastopt, name)(got, state_dtype="bfloat16", stochastic_rounding=False, **kw)
    for grads in grads_seq:
        opt.step(grads)
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"params[{i}]")
    for i, p in enumerate(topt.param_groups[0]["params"]):
        for key, value in topt.state[p].items():
            if key != "step":
                np.testing.assert_array_equal(
                    _bits(opt.state[i][key]), value.view(torch.int16).numpy().view(np.uint16),
                    err_msg=f"state[{i}][{key!r}]")


def test_sgd_nearest_rounding_differs_from_torch_only_by_its_bfloat16_lr(torch):
    """SGD has no bit-exact torch reference on bfloat16: torch 2.13's fused CPU SGD leaves
    bfloat16 tensors of 33 elements unchanged at its first step, and its for-loop step
    rounds lr to bfloat16 before p - lr g. fastopt computes p - lr g in float32 with lr in
    float32 and rounds once; with lr rounded to bfloat16 first, it is torch's step, bit
    for bit, but for a few elements at the ends of torch's chunks (its scalar tail loop
    computes differently from its vector loop)."""
    rng = np.random.default_rng(8)
    p = rng.standard_normal(100000).astype(np.float32).astype(BF16)
    g = rng.standard_normal(100000).astype(np.float32).astype(BF16)
    want, _ = _torch_bf16(torch, "SGD", [p], [[g]], False, lr=0.05)
    exact = (p.astype(np.float32) + np.float32(-0.05) * g.astype(np.float32)).astype(BF16)
    got = p.copy()
    fastopt.SGD([got], lr=0.05, stochastic_rounding=False).step([g])
    np.testing.assert_array_equal(_bits(got), _bits(exact))
    lr_bf16 = float(np.float32(0.05).astype(BF16))
    got = p.copy()
    fastopt.SGD([got], lr=lr_bf16, stochastic_rounding=False).step([g])
    assert np.sum(_bits(got) != _bits(want[0])) <= 4


def test_torch_bfloat16_and_float16_parameters_update_in_place(torch):
    rng = np.random.default_rng(2)
    for dtype, np_dtype in ((torch.bfloat16, BF16), (torch.float16, np.float16)):
        w = torch.from_numpy(rng.standard_normal(5000).astype(np.float32)).to(dtype)
        start = w.clone()
        ref = w.view(torch.int16).numpy().copy().view(np_dtype)
        g = rng.standard_normal(5000).astype(np.float32)
        fastopt.AdamW([w], lr=1e-2).step([torch.from_numpy(g)])
        fastopt.AdamW([ref], lr=1e-2, backend="numpy").step([g])
        assert not torch.equal(w, start)
        np.testing.assert_array_equal(w.view(torch.int16).numpy(), ref.view(np.int16))


def test_jax_bfloat16_parameters_get_new_arrays():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(4)
    start = rng.standard_normal(3000).astype(np.float32).astype(BF16)
    g = rng.standard_normal(3000).astype(np.float32)
    opt = fastopt.Lion([jnp.asarray(start)], lr=1e-2)
    opt.step([jnp.asarray(g)])
    ref = start.copy()
    fastopt.Lion([ref], lr=1e-2, backend="numpy").step([g])
    (w,) = opt.params()
    assert w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(w).view(np.uint16), ref.view(np.uint16))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(state_dtype="int4"), ValueError, "state_dtype must be None, 'float32', 'bfloat16' "
                                           "or 'int8'"),
    (dict(stochastic_rounding=1), TypeError, "stochastic_rounding must be"),
    (dict(master_weights=None), TypeError, "master_weights must be"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(seed=2**64), ValueError, "seed must be <="),
    (dict(seed=1.0), TypeError, "seed must be an integer"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastopt.Adam([np.zeros(3, BF16)], **kwargs)


def test_bad_gradient_dtype_is_refused_before_anything_changes():
    p = np.ones(4, BF16)
    opt = fastopt.Adam([p], lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\]: dtype float64 does not match params\[0\] "
                                        r"dtype bfloat16; a bfloat16/float16 parameter also"):
        opt.step([np.ones(4)])
    assert opt.state == {} and np.all(p == 1)
    with pytest.raises(TypeError, match=r"grads\[0\]: dtype float16 does not match"):
        opt.step([np.ones(4, np.float16)])


def test_state_of_another_format_is_refused_on_load():
    p = np.ones(5000, BF16)
    opt = fastopt.Adam([p], lr=0.1)
    opt.step([np.ones(5000, np.float32)])
    other = fastopt.Adam([p.copy()], lr=0.1, state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"\['exp_avg'\]: shape \(5000,\) and dtype float32 "
                                         r"do not fit the parameter's \(\(5000,\), bfloat16\)"):
        other.load_state_dict(opt.state_dict())


def test_random_bits_depend_on_element_stream_step_and_key_only():
    """fastopt/lowp.h's counter: any window of a tensor's bits is the same slice of the
    whole; streams, steps and keys give other bits."""
    whole = _formats.round_bits(1000, 1, 5, (3, 4))
    np.testing.assert_array_equal(_formats.round_bits(37, 1, 5, (3, 4), lo=501), whole[501:538])
    for other in (_formats.round_bits(1000, 2, 5, (3, 4)), _formats.round_bits(1000, 1, 6, (3, 4)),
                  _formats.round_bits(1000, 1, 5, (4, 4))):
        assert np.mean(other == whole) < 0.01
    assert whole.max() < 2**16 and abs(whole.mean() / 2**16 - 0.5) < 0.05


def test_convert_state_between_float32_and_bfloat16():
    rng = np.random.default_rng(9)
    p = rng.standard_normal(5000).astype(np.float32).astype(BF16)
    opt = fastopt.Adam([p], lr=0.1, master_weights=True)
    opt.step([rng.standard_normal(5000).astype(np.float32)])
    sd = fastopt.convert_state(opt.state_dict(), "bfloat16")
    st = opt.state[0]
    assert sd["state"][0]["master_param"] is st["master_param"]  # float32 copies stay
    assert sd["state"][0]["step"] == 1
    np.testing.assert_array_equal(_bits(sd["state"][0]["exp_avg"]),
                                  _bits(st["exp_avg"].astype(BF16)))
    fastopt.Adam([p.copy()], lr=0.1, master_weights=True,
                 state_dtype="bfloat16").load_state_dict(sd)
    back = fastopt.convert_state(sd, "float32")
    np.testing.assert_array_equal(back["state"][0]["exp_avg"],
                                  sd["state"][0]["exp_avg"].astype(np.float32))
    assert opt.state[0]["exp_avg"].dtype == np.float32  # the source is left alone
    with pytest.raises(ValueError, match="state_dtype must be 'float32', 'bfloat16' or 'int8'"):
        fastopt.convert_state(sd, "int4")
    with pytest.raises(TypeError, match="state_dict: expected"):
        fastopt.convert_state([], "float32")


def test_convert_state_to_and_from_int8():
    rng = np.random.default_rng(10)
    ps = [rng.standard_normal(n).astype(np.float32) for n in (5000, 100)]
    opt = fastopt.Adam(ps, lr=0.1)
    opt.step([rng.standard_normal(p.size).astype(np.float32) for p in ps])
    sd = fastopt.convert_state(opt.state_dict(), "int8")
    big, small = sd["state"][0], sd["state"][1]
    assert big["exp_avg"].dtype == np.uint8 and big["exp_avg_absmax"].shape == (20,)
    assert small["exp_avg"].dtype == np.float32  # under 4096 elements: float32, as a step
    fastopt.Adam([p.copy() for p in ps], lr=0.1, state_dtype="int8").load_state_dict(sd)
    back = fastopt.convert_state(sd, "float32")["state"][0]
    assert set(back) == {"step", "exp_avg", "exp_avg_sq"}
    want = opt.state[0]["exp_avg"]
    assert np.max(np.abs(back["exp_avg"] - want)) <= 0.02 * np.max(np.abs(want))


def test_dynamic_maps_are_bitsandbytes_and_torchaos():
    """The 8-bit maps (fastopt._backends._qmaps) against their definition, and the
    quantizer's codes and block scales against torchao's, bit for bit, where it is
    installed."""
    from fastopt._backends import _qmaps

    def definition(signed):  # bitsandbytes' create_dynamic_map(signed, 7, 8), in float64
        data = []
        for i in range(7):
            n = 2 ** (i + (0 if signed else 1)) + 1
            bounds = np.linspace(0.1, 1, n)
            means = (bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)
            data += list(means) + (list(-means) if signed else [])
        return np.sort(np.array(data + [0.0, 1.0]))

    for qmap, signed in ((_qmaps.SIGNED, True), (_qmaps.UNSIGNED, False)):
        assert qmap.dtype == np.float32 and qmap.size == 256 and np.all(np.diff(qmap) > 0)
        np.testing.assert_allclose(qmap, definition(signed), rtol=1e-6, atol=0)
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    for code, signed in ((_formats.Q8S, True), (_formats.Q8U, False)):
        qmap = torch.tensor(quant_utils.create_dynamic_map(signed), dtype=torch.float32)
        np.testing.assert_array_equal(qmap.numpy(), _formats.QMAPS[code])
        x = (rng.standard_normal(256 * 64) * np.exp(rng.uniform(-9, 3, 256 * 64))
             ).astype(np.float32)
        x = x if signed else np.abs(x)
        x[:256] = 0.0
        scaled, scale = quant_utils.scale_tensor(torch.from_numpy(x.copy()), 256)
        codes, absmax = np.empty(x.size, np.uint8), np.empty(64, np.float32)
        _formats.q8_store(codes, absmax, x, code)
        np.testing.assert_array_equal(absmax, scale.numpy())
        np.testing.assert_array_equal(codes,
                                      quant_utils.quantize_8bit_with_qmap(scaled, qmap).numpy())


def test_two_layer_model_trains_with_bfloat16_weights_and_int8_state():
    """A 2-layer tanh network regressing a teacher, 300 AdamW steps: with bfloat16 weights
    and 8-bit state (the first layer's 8192 weights quantized, the second's 2048 float32)
    the loss ends within 2% of the float32 run's."""
    def train(dtype, **options):
        rng = np.random.default_rng(0)
        teacher = [rng.standard_normal((64, 128)) / 8, rng.standard_normal((128, 16)) / 11]
        params = [(rng.standard_normal((64, 128)) / 8).astype(np.float32).astype(dtype),
                  (rng.standard_normal((128, 16)) / 11).astype(np.float32).astype(dtype)]
        opt = fastopt.AdamW(params, lr=3e-3, weight_decay=0.0, **options)
        losses = []
        for _ in range(300):
            x = rng.standard_normal((256, 64)).astype(np.float32)
            y = np.tanh(x @ teacher[0]) @ teacher[1]
            a, b = (p.astype(np.float32) for p in params)
            h = np.tanh(x @ a)
            err = h @ b - y
            losses.append(float(np.mean(err ** 2)))
            g_out = err * np.float32(2 / err.size)
            opt.step([(x.T @ (g_out @ b.T * (1 - h * h))).astype(np.float32),
                      (h.T @ g_out).astype(np.float32)])
        if options:
            assert opt.state[0]["exp_avg"].dtype == np.uint8
            assert opt.state[1]["exp_avg"].dtype == np.float32
        return np.mean(losses[-20:]), losses[0]

    want, first = train(np.float32)
    got, _ = train(BF16, state_dtype="int8")
    assert want < 0.1 * first  # it trains
    assert abs(got / want - 1) < 0.02
