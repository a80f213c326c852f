"""fastopt.quant: codes bit-exact against torch's quantize/dequantize/fake-quantize (and
autograd) on every backend, 4-bit packing, parameter choice and observers against torch's
observers, bad input."""

import numpy as np
import pytest
from cases import spread, tiered
from conftest import CPU_BACKENDS, require_backend

from fastopt import _backends, quant

BACKENDS = [b for b in _backends.OPS["quant_loop"] if b in CPU_BACKENDS]  # GPU: test_cuda
# torch 2.13 deprecates its quantized tensor types, the reference these tests compare with
pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning")


def _halfway(rng, shape, scales, axis):
    """Values at code + 0.5 (the rounding ties) and at random, in range and beyond it."""
    x = rng.integers(-140, 140, shape).astype(np.float64) + 0.5
    s = np.asarray(scales, np.float32)
    if axis is not None:
        s = s.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    x = x * s
    noise = rng.standard_normal(shape) * 200 * s
    return np.where(rng.random(shape) < 0.5, x, noise).astype(np.float32)


def _per_tensor_grid():
    """Full: every backend x (dtype, zero point) x scale. Fast: every (dtype, zero point)
    with every scale, the backends spread pairwise over them."""
    rows = [dict(q=q, scale=scale) for q in [("int8", "qint8", -3), ("uint8", "quint8", 130),
                                             ("int8", "qint8", 0)]
            for scale in (0.0137, 0.1, 3e-3)]
    full = [dict(row, backend=b) for b in BACKENDS for row in rows]
    fast = spread(rows, "backend", BACKENDS, against=["q", "scale"])

    def flat(r):
        qdtype, tdtype, zp = r["q"]
        return dict(backend=r["backend"], qdtype=qdtype, tdtype=tdtype, zp=zp, scale=r["scale"])
    args = ["backend", "qdtype", "tdtype", "zp", "scale"]
    return tiered([flat(r) for r in full], [flat(r) for r in fast], args,
                  lambda r: "-".join(str(r[a]) for a in args))


# tdtype: the name of torch's quantized dtype (torch.qint8, ...)
@pytest.mark.parametrize("backend, qdtype, tdtype, zp, scale", _per_tensor_grid())
def test_per_tensor_matches_torch(backend, qdtype, tdtype, zp, scale, torch):
    require_backend(backend)
    tdtype = getattr(torch, tdtype)
    x = _halfway(np.random.default_rng(1), (200003,), scale, None)
    q = quant.quantize(x, scale, zp, qdtype, backend=backend)
    tq = torch.quantize_per_tensor(torch.from_numpy(x), scale, zp, tdtype)
    assert q.dtype == tq.int_repr().numpy().dtype
    np.testing.assert_array_equal(q, tq.int_repr().numpy())
    np.testing.assert_array_equal(quant.dequantize(q, scale, zp, backend=backend),
                                  tq.dequantize().numpy())


def _per_channel_grid():
    """Full: every backend x dtype x (shape, axis). Fast: every (shape, axis) on every
    backend, the dtypes spread pairwise over them."""
    # (260, 100) and (3, 70, 100) cross the first 16384-element chunk inside a slice's run
    cases = [((64, 300), 0), ((300, 64), 1), ((3, 40, 5, 7), 1), ((5, 7, 3), 2), ((1000,), 0),
             ((260, 100), 1), ((3, 70, 100), 1)]
    qdtypes = [("int8", "qint8"), ("uint8", "quint8")]
    rows = [dict(case=case, backend=b) for b in BACKENDS for case in cases]
    full = [dict(row, q=q) for q in qdtypes for row in rows]
    fast = spread(rows, "q", qdtypes, against=["case", "backend"])

    def flat(r):
        return dict(backend=r["backend"], qdtype=r["q"][0], tdtype=r["q"][1],
                    shape=r["case"][0], axis=r["case"][1])
    args = ["backend", "qdtype", "tdtype", "shape", "axis"]
    return tiered([flat(r) for r in full], [flat(r) for r in fast], args,
                  lambda r: "-".join(str(r[a]) for a in args))


@pytest.mark.parametrize("backend, qdtype, tdtype, shape, axis", _per_channel_grid())
def test_per_channel_matches_torch(backend, qdtype, tdtype, shape, axis, torch):
    require_backend(backend)
    tdtype = getattr(torch, tdtype)
    rng = np.random.default_rng(2)
    scales = np.abs(rng.standard_normal(shape[axis])) * 0.02 + 1e-3
    zps = rng.integers(-10, 10, shape[axis]) + (128 if qdtype == "uint8" else 0)
    x = _halfway(rng, shape, scales, axis)
    q = quant.quantize(x, scales, zps, qdtype, axis=axis, backend=backend)
    tq = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scales),
                                    torch.from_numpy(zps), axis, tdtype)
    np.testing.assert_array_equal(q, tq.int_repr().numpy())
    np.testing.assert_array_equal(quant.dequantize(q, scales, zps, axis=axis, backend=backend),
                                  tq.dequantize().numpy())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qmin, qmax, zp", [(-128, 127, 2), (0, 255, 128), (-8, 7, 0), (0, 15, 3)])
def test_fake_quantize_matches_torch_and_autograd(backend, qmin, qmax, zp, torch):
    require_backend(backend)
    rng = np.random.default_rng(3)
    scale = 0.021
    x = _halfway(rng, (50001,), scale, None)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    ty = torch.fake_quantize_per_tensor_affine(tx, scale, zp, qmin, qmax)
    ty.backward(torch.from_numpy(gy))
    np.testing.assert_array_equal(quant.fake_quantize(x, scale, zp, qmin, qmax, backend=backend),
                                  ty.detach().numpy())
    np.testing.assert_array_equal(
        quant.fake_quantize_backward(gy, x, scale, zp, qmin, qmax, backend=backend),
        tx.grad.numpy())
    # per channel
    X = _halfway(rng, (30, 400), np.full(30, scale), 0)
    scales = (np.abs(rng.standard_normal(30)) * 0.02 + 1e-3).astype(np.float32)
    zps = rng.integers(qmin, qmax + 1, 30).astype(np.int32)
    gY = rng.standard_normal(X.shape).astype(np.float32)
    tX = torch.from_numpy(X.copy()).requires_grad_()
    tY = torch.fake_quantize_per_channel_affine(tX, torch.from_numpy(scales),
                                                torch.from_numpy(zps), 0, qmin, qmax)
    tY.backward(torch.from_numpy(gY))
    np.testing.assert_array_equal(
        quant.fake_quantize(X, scales, zps, qmin, qmax, axis=0, backend=backend),
        tY.detach().numpy())
    np.testing.assert_array_equal(
        quant.fake_quantize_backward(gY, X, scales, zps, qmin, qmax, axis=0, backend=backend),
        tX.grad.numpy())


def test_fused_rounding_reference():
    """The reference's float32 fma agrees with a correctly rounded fma on the hard cases:
    sums landing near halfway between two floats."""
    from fractions import Fraction

    from fastopt._backends._numpy.compress import fma_f32
    rng = np.random.default_rng(4)
    a = rng.standard_normal(3000).astype(np.float32)
    b = np.float32(1) / np.float32(0.0137)
    c = rng.integers(-200, 200, 3000).astype(np.float32)
    # force sums near float32 midpoints: a*b + c = m + tiny
    got = fma_f32(a, b, c)
    for ai, ci, g in zip(a[:3000], c, got):
        exact = Fraction(float(ai)) * Fraction(float(b)) + Fraction(float(ci))
        assert g == np.float32(_round_f32(exact))


def _round_f32(exact):
    """Correct rounding of a Fraction to float32 (half to even)."""
    from fractions import Fraction
    f = np.float32(float(exact))  # float64 first: may double-round; fix by neighbours
    best = f
    for cand in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        d, db = abs(Fraction(float(cand)) - exact), abs(Fraction(float(best)) - exact)
        if d < db or (d == db and int(cand.view(np.uint32)) % 2 == 0):
            best = cand
    return best


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_frameworks(backend):
    require_backend(backend)
    x = np.random.default_rng(5).standard_normal((16, 9))
    q = quant.quantize(x, 0.05, 3, "int4", backend=backend)
    expected = np.clip(np.rint(x * (1 / 0.05) + 3), -8, 7)
    np.testing.assert_array_equal(q, expected)
    assert q.dtype == np.int8
    y = quant.dequantize(q, 0.05, 3, dtype="float64", backend=backend)
    np.testing.assert_array_equal(y, (expected - 3) * 0.05)
    torch = pytest.importorskip("torch")
    tq = quant.quantize(torch.from_numpy(x), 0.05, 3, "uint8", backend=backend)
    assert isinstance(tq, torch.Tensor) and tq.dtype == torch.uint8
    jnp = pytest.importorskip("jax.numpy")
    jq = quant.quantize(jnp.asarray(x, jnp.float32), 0.05, 3, backend=backend)
    assert type(jq).__module__.startswith("jax") and jq.dtype == jnp.int8
    tf = pytest.importorskip("tensorflow")
    tfq = quant.fake_quantize(tf.constant(x.astype(np.float32)), 0.05, 3, -8, 7, backend=backend)
    assert isinstance(tfq, tf.Tensor)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_pack_int4_roundtrip(n):
    rng = np.random.default_rng(6)
    for codes in (rng.integers(-8, 8, n).astype(np.int8), rng.integers(0, 16, n).astype(np.uint8)):
        packed = quant.pack_int4(codes)
        assert packed.dtype == np.uint8 and packed.size == (n + 1) // 2
        if n >= 2:
            assert packed[0] == (int(codes[0]) & 0xF) | ((int(codes[1]) & 0xF) << 4)
        out = quant.unpack_int4(packed, n, signed=codes.dtype == np.int8)
        np.testing.assert_array_equal(out, codes)
        assert out.dtype == codes.dtype
    torch = pytest.importorskip("torch")
    tq = quant.pack_int4(torch.tensor([1, -2, 3], dtype=torch.int8))
    assert isinstance(tq, torch.Tensor) and tq.tolist() == [0xE1, 0x03]


# tdtype and scheme: the names of torch's quantized dtype and quantization scheme
ObserverCases = [
    ("uint8", None, False, "quint8", "per_tensor_affine"),
    ("int8", None, True, "qint8", "per_tensor_symmetric"),
    ("uint8", None, True, "quint8", "per_tensor_symmetric"),
    ("int8", 0, False, "qint8", "per_channel_affine"),
    ("uint8", 1, True, "quint8", "per_channel_symmetric"),
]


@pytest.mark.parametrize("qdtype, axis, symmetric, tdtype, scheme", ObserverCases)
def test_qparams_minmax_matches_torch_observers(qdtype, axis, symmetric, tdtype, scheme, torch):
    from torch.ao.quantization import observer as tobs
    tdtype, scheme = getattr(torch, tdtype), getattr(torch, scheme)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((32, 24)) * 3 + 0.7).astype(np.float32)
    if axis is None:
        obs = tobs.MinMaxObserver(dtype=tdtype, qscheme=scheme)
    else:
        obs = tobs.PerChannelMinMaxObserver(ch_axis=axis, dtype=tdtype, qscheme=scheme)
    obs(torch.from_numpy(x))
    ts, tz = obs.calculate_qparams()
    scale, zp = quant.qparams(x, qdtype, axis=axis, symmetric=symmetric)
    np.testing.assert_array_equal(np.atleast_1d(scale).astype(np.float32), ts.numpy().reshape(-1))
    np.testing.assert_array_equal(np.atleast_1d(zp), tz.numpy().reshape(-1))


@pytest.mark.parametrize("qdtype, axis, symmetric, tdtype, scheme", ObserverCases)
@pytest.mark.parametrize("c", [0.01, 0.3, None])
def test_observer_over_batches_matches_torch(qdtype, axis, symmetric, tdtype, scheme, c, torch):
    from torch.ao.quantization import observer as tobs
    tdtype, scheme = getattr(torch, tdtype), getattr(torch, scheme)
    kw = dict(dtype=tdtype, qscheme=scheme)
    if axis is None:
        obs = (tobs.MinMaxObserver(**kw) if c is None
               else tobs.MovingAverageMinMaxObserver(averaging_constant=c, **kw))
    else:
        obs = (tobs.PerChannelMinMaxObserver(ch_axis=axis, **kw) if c is None else
               tobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=c, ch_axis=axis,
                                                          **kw))
    ours = quant.MovingAverageObserver(qdtype, axis=axis, symmetric=symmetric,
                                       averaging_constant=c)
    rng = np.random.default_rng(8)
    for k in range(6):
        x = (rng.standard_normal((16, 12)) * (1 + k) - 0.3 * k).astype(np.float32)
        obs(torch.from_numpy(x))
        ours.observe(x)
    np.testing.assert_array_equal(np.atleast_1d(ours.min_val), obs.min_val.numpy().reshape(-1))
    np.testing.assert_array_equal(np.atleast_1d(ours.max_val), obs.max_val.numpy().reshape(-1))
    ts, tz = obs.calculate_qparams()
    scale, zp = ours.qparams()
    np.testing.assert_array_equal(np.atleast_1d(scale).astype(np.float32), ts.numpy().reshape(-1))
    np.testing.assert_array_equal(np.atleast_1d(zp), tz.numpy().reshape(-1))


def test_percentile_and_mse_clip_outliers():
    rng = np.random.default_rng(9)
    x = rng.standard_t(3, 100000).astype(np.float32)  # heavy tails
    s_mm, _ = quant.qparams(x, "int8", symmetric=True)
    s_pc, _ = quant.qparams(x, "int8", symmetric=True, method="percentile", percentile=99.9)
    s_mse, _ = quant.qparams(x, "int8", symmetric=True, method="mse")
    assert s_pc < s_mm and s_mse < s_mm

    def err(s):
        return np.sum(((quant.fake_quantize(x, s, 0, -128, 127) - x).astype(np.float64)) ** 2)
    # the mse choice is the best of its grid: k / 100 of the min-max range
    amax = np.float32(np.abs(x).max())
    grid = [np.float32(amax * np.float32(k / 100)) / np.float32(127.5) for k in range(1, 101)]
    assert err(s_mse) <= min(err(float(g)) for g in grid) * (1 + 1e-9)
    assert err(s_mse) < err(s_mm) and err(s_mse) <= err(s_pc)
    # per channel: one value per channel, each no larger than the min-max one
    X = rng.standard_normal((8, 500)).astype(np.float32)
    s_c, z_c = quant.qparams(X, "uint8", axis=0, method="mse", grid=20)
    assert s_c.shape == z_c.shape == (8,)
    assert (s_c <= quant.qparams(X, "uint8", axis=0)[0] * (1 + 1e-6)).all()


BAD = [
    (lambda x: quant.quantize(x, 0.0, 0), ValueError, "scale must be finite and > 0"),
    (lambda x: quant.quantize(x, float("nan"), 0), ValueError, "scale"),
    (lambda x: quant.quantize(x, 0.1, 200), ValueError, r"zero_point=200 is outside"),
    (lambda x: quant.quantize(x, 0.1, -1, "uint8"), ValueError, "zero_point"),
    (lambda x: quant.quantize(x, 0.1, 8, "int4"), ValueError, "zero_point"),
    (lambda x: quant.quantize(x, 0.1, 0.5), TypeError, "zero_point: expected integers"),
    (lambda x: quant.quantize(x, 0.1, 0, "int16"), ValueError, "dtype"),
    (lambda x: quant.quantize(x, 0.1, 0, axis=2), ValueError, "axis=2"),
    (lambda x: quant.quantize(x, [0.1, 0.2], [0, 0], axis=0), ValueError, "takes 3 values"),
    (lambda x: quant.quantize(x, [0.1, 0.2, -1.0], [0, 0, 0], axis=0), ValueError,
     r"scale\[2\]"),
    (lambda x: quant.quantize(x, [0.1] * 3, 0), ValueError, "takes one value"),
    (lambda x: quant.quantize(x.astype(np.int32), 0.1, 0), TypeError, "x: dtype int32"),
    (lambda x: quant.quantize(np.where(x > 3, np.nan, x), 0.1, 0), ValueError, "x: holds 1 NaN"),
    (lambda x: quant.dequantize(x, 0.1, 0), TypeError, "q: dtype float32"),
    (lambda x: quant.fake_quantize(x, 0.1, 0, 5, 2), ValueError, "qmin must be <= qmax"),
    (lambda x: quant.fake_quantize(x, 0.1, 9, 0, 7), ValueError, "zero_point"),
    (lambda x: quant.fake_quantize_backward(x[:2], x, 0.1, 0, -8, 7), ValueError, "grad_y"),
    (lambda x: quant.pack_int4(np.array([8], np.int8)), ValueError, r"outside \[-8, 7\]"),
    (lambda x: quant.unpack_int4(np.zeros(2, np.uint8), 5), ValueError, "n=5"),
    (lambda x: quant.qparams(x, "int8", method="kl"), ValueError, "method"),
    (lambda x: quant.qparams(np.where(x > 3, np.inf, x), "int8"), ValueError, "NaN or inf"),
    (lambda x: quant.MovingAverageObserver("int8", averaging_constant=0), ValueError,
     "averaging_constant"),
    (lambda x: quant.MovingAverageObserver("int8").qparams(), ValueError, "nothing observed"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 - 2.0
    before = x.copy()
    with pytest.raises(error, match=match):
        call(x)
    np.testing.assert_array_equal(x, before)
