"""fastopt.init: the Philox generator (known answers, bit-identity across backends and
thread counts), torch.nn.init's fans, gains and bounds, distributions, and bad input."""

import math

import numpy as np
import pytest
from cases import spread, tiered
from conftest import CPU_BACKENDS, require_backend

import fastopt
from fastopt import _backends
from fastopt._backends import _layout
from fastopt._backends._numpy import init as ref
from fastopt.init import _fans, _kaiming_std

# Random123's published known answers for Philox-4x32-10: (counter, key, output)
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    words = ref.philox_rounds(*(np.array([c], np.uint64) for c in counter), *key)
    assert tuple(int(w[0]) for w in words) == expected


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_raw_bits_are_philox(backend):
    """Group 0 of seed 0, stream 0 is the all-zero known answer; its words are elements
    0, 16, 32, 48 (the tile layout of fastopt/random.h)."""
    require_backend(backend)
    out = np.empty(64, np.uint32)
    _backends.load(backend)[0].random_fill(out, _layout.BITS, (0.0,) * 7, 0, 0, n_threads=1)
    assert tuple(int(x) for x in out[::16]) == KAT[0][2]


def _trunc_reals(scipy_stats, mean, std, a, b):
    lo, hi = (a - mean) / std, (b - mean) / std
    p = scipy_stats.norm.cdf(lo)
    return (mean, std, a, b, p, scipy_stats.norm.sf(lo), scipy_stats.norm.cdf(hi) - p)


# the truncated normal's reals: mean, std, a, b, then Phi(lo), 1 - Phi(lo) and the mass
# between the bounds, as scipy.stats computes them (test_trunc_reals_are_scipys), written
# out so that the backend tests run without scipy
TRUNC = (0.1, 2.0, -1.0, 3.0, 0.29115968678834636, 0.7088403132116536, 0.6353110536020052)
TRUNC_TAILS = (0.0, 1.0, -9.0, 9.0, 1.1285884059538324e-19, 1.0, 1.0)

FILLS = [(_layout.UNIFORM, "float32", (-1.5, 3.0)), (_layout.UNIFORM, "float64", (-1.5, 3.0)),
         (_layout.NORMAL, "float32", (0.25, 2.0)), (_layout.NORMAL, "float64", (0.25, 2.0)),
         (_layout.TRUNC_NORMAL, "float32", TRUNC),
         (_layout.TRUNC_NORMAL, "float64", TRUNC),
         (_layout.TRUNC_NORMAL, "float64", TRUNC_TAILS),  # far tails
         (_layout.BITS, "uint32", ())]
FILL_IDS = [f"{name}-{dtype}" for name, dtype in
            [("uniform", "float32"), ("uniform", "float64"), ("normal", "float32"),
             ("normal", "float64"), ("trunc", "float32"), ("trunc", "float64"),
             ("trunc_tails", "float64"), ("bits", "uint32")]]


def test_trunc_reals_are_scipys(scipy_stats):
    assert _trunc_reals(scipy_stats, *TRUNC[:4]) == TRUNC
    assert _trunc_reals(scipy_stats, *TRUNC_TAILS[:4]) == TRUNC_TAILS


def _fill(backend, n, kind, dtype, reals, seed, n_threads):
    out = np.full(n, 7, dtype)
    _backends.load(backend)[0].random_fill(out, kind, tuple(reals) + (0.0,) * (7 - len(reals)),
                                           seed, 3, n_threads=n_threads)
    return out


def _fill_grid():
    """Full: every compiled backend x fill x size. Fast: every fill at every size, the
    backends spread pairwise over them."""
    rows = [dict(fill=i, n=n) for i in range(len(FILLS))
            for n in (0, 1, 5, 63, 64, 65, 16385, 100003)]
    full = [dict(row, backend=b) for b in CPU_BACKENDS[1:] for row in rows]
    fast = spread(rows, "backend", CPU_BACKENDS[1:], against=["fill", "n"])

    def flat(r):
        kind, dtype, reals = FILLS[r["fill"]]
        return dict(backend=r["backend"], kind=kind, dtype=dtype, reals=reals, n=r["n"],
                    id=f"{r['backend']}-{FILL_IDS[r['fill']]}-{r['n']}")
    return tiered([flat(r) for r in full], [flat(r) for r in fast],
                  ["backend", "kind", "dtype", "reals", "n"], lambda r: r["id"])


@pytest.mark.parametrize("backend, kind, dtype, reals, n", _fill_grid())
def test_backends_bit_identical(backend, kind, dtype, reals, n):
    require_backend(backend)
    seed = 2 ** 63 + 12345
    expected = _fill("numpy", n, kind, dtype, reals, seed, 1)
    for n_threads in (1, 2):
        got = _fill(backend, n, kind, dtype, reals, seed, n_threads)
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def test_values_depend_on_index_only():
    """A prefix of a longer fill is the shorter fill; another seed or stream differs."""
    long = _fill("cython", 70001, _layout.NORMAL, "float32", (0.0, 1.0), 5, 2)
    short = _fill("cython", 1234, _layout.NORMAL, "float32", (0.0, 1.0), 5, 1)
    np.testing.assert_array_equal(long[:1234], short)
    assert not np.array_equal(short, _fill("cython", 1234, _layout.NORMAL, "float32", (0.0, 1.0),
                                           6, 1))


INITS = [("uniform_", dict(a=-0.5, b=2.0)), ("normal_", dict(mean=1.0, std=0.5)),
         ("trunc_normal_", dict(mean=0.5, std=2.0, a=-1.0, b=1.5)),
         ("xavier_uniform_", dict(gain=2.0)), ("xavier_normal_", {}),
         ("kaiming_uniform_", dict(a=0.2, mode="fan_out")),
         ("kaiming_normal_", dict(nonlinearity="relu")), ("lecun_uniform_", {}),
         ("lecun_normal_", {}), ("orthogonal_", dict(gain=1.5)),
         ("sparse_", dict(sparsity=0.3, std=0.1))]


@pytest.mark.parametrize("name, kwargs", INITS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_initializers_identical_on_every_backend(name, kwargs, dtype):
    results = []
    for backend in CPU_BACKENDS:
        require_backend(backend)
        w = np.empty((70, 130), dtype)
        getattr(fastopt.init, name)(w, **kwargs, seed=99, backend=backend)
        results.append(w)
    for w in results[1:]:
        np.testing.assert_array_equal(w, results[0])


SHAPES = [(5, 3), (7, 4, 3), (6, 3, 3, 3), (4, 2, 3, 2, 5), (1, 9)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fans_equal_torch(shape, torch):
    assert _fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


@pytest.mark.parametrize("nonlinearity, param", [
    ("linear", None), ("conv1d", None), ("conv2d", None), ("conv3d", None),
    ("conv_transpose1d", None), ("conv_transpose2d", None), ("conv_transpose3d", None),
    ("sigmoid", None), ("tanh", None), ("relu", None), ("selu", None),
    ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 3)])
def test_gain_equals_torch(nonlinearity, param, torch):
    assert fastopt.init.calculate_gain(nonlinearity, param) == pytest.approx(
        torch.nn.init.calculate_gain(nonlinearity, param), rel=1e-15)


def _kaiming_grid():
    """Full: every shape x mode x nonlinearity. Fast: every shape with every nonlinearity,
    the modes spread pairwise over them."""
    rows = [dict(shape=shape, nl=nl) for shape in SHAPES
            for nl in [("leaky_relu", 0.0), ("leaky_relu", 0.3), ("relu", 0.0), ("tanh", 0.0),
                       ("selu", 0.0)]]
    full = [dict(row, mode=mode) for mode in ("fan_in", "fan_out") for row in rows]
    fast = spread(rows, "mode", ["fan_in", "fan_out"], against=["shape", "nl"])

    def flat(r):
        return dict(shape=r["shape"], mode=r["mode"], nonlinearity=r["nl"][0], a=r["nl"][1])
    args = ["shape", "mode", "nonlinearity", "a"]
    return tiered([flat(r) for r in full], [flat(r) for r in fast], args,
                  lambda r: "-".join(str(r[k]) for k in args))


@pytest.mark.parametrize("shape, mode, nonlinearity, a", _kaiming_grid())
def test_kaiming_scale_equals_torch(shape, mode, nonlinearity, a, torch):
    t = torch.empty(shape)
    expected = (torch.nn.init.calculate_gain(nonlinearity, a)
                / math.sqrt(torch.nn.init._calculate_correct_fan(t, mode)))
    assert _kaiming_std(shape, a, mode, nonlinearity) == pytest.approx(expected, rel=1e-15)


def _bound_and_std(name, shape, kwargs):
    """The uniform bound or normal std torch's initializer uses for this shape."""
    import torch
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    if name.startswith("xavier"):
        std = kwargs.get("gain", 1.0) * math.sqrt(2.0 / (fan_in + fan_out))
    elif name.startswith("kaiming"):
        fan = fan_in if kwargs.get("mode", "fan_in") == "fan_in" else fan_out
        std = torch.nn.init.calculate_gain(kwargs.get("nonlinearity", "leaky_relu"),
                                           kwargs.get("a", 0)) / math.sqrt(fan)
    else:  # lecun
        std = math.sqrt(1.0 / fan_in)
    return math.sqrt(3.0) * std, std


@pytest.mark.parametrize("name, kwargs", [
    ("xavier_uniform_", dict(gain=0.7)), ("kaiming_uniform_", dict(a=0.1, mode="fan_out")),
    ("kaiming_uniform_", {}), ("lecun_uniform_", {})])
@pytest.mark.parametrize("shape", [(300, 200), (64, 32, 3, 3), (20, 10, 3, 3, 3)])
def test_uniform_family_bounds_and_distribution(name, kwargs, shape, torch, scipy_stats):
    w = np.empty(shape, np.float64)
    getattr(fastopt.init, name)(w, **kwargs, seed=1)
    bound, _ = _bound_and_std(name, shape, kwargs)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert scipy_stats.kstest(w.ravel(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3


@pytest.mark.parametrize("name, kwargs", [
    ("xavier_normal_", dict(gain=1.3)), ("kaiming_normal_", dict(mode="fan_out")),
    ("kaiming_normal_", dict(nonlinearity="relu"))])
@pytest.mark.parametrize("shape", [(300, 200), (64, 32, 3, 3)])
def test_normal_family_distribution(name, kwargs, shape, torch, scipy_stats):
    w = np.empty(shape, np.float64)
    getattr(fastopt.init, name)(w, **kwargs, seed=2)
    _, std = _bound_and_std(name, shape, kwargs)
    assert scipy_stats.kstest(w.ravel(), "norm", args=(0.0, std)).pvalue > 1e-3
    n = w.size  # mean and variance within 5 standard errors
    assert abs(w.mean()) < 5 * std / math.sqrt(n)
    assert abs(w.var() / std ** 2 - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mean, std, a, b", [(0.0, 1.0, -2.0, 2.0), (1.0, 0.5, 0.0, 3.0),
                                             (0.0, 1.0, 1.5, 4.0), (0.0, 1.0, -6.0, -5.0)])
def test_trunc_normal_distribution(dtype, mean, std, a, b, scipy_stats):
    w = np.empty(200_000, dtype)
    fastopt.init.trunc_normal_(w, mean, std, a, b, seed=3)
    assert w.min() >= np.asarray(a, dtype) and w.max() <= np.asarray(b, dtype)
    dist = scipy_stats.truncnorm((a - mean) / std, (b - mean) / std, loc=mean, scale=std)
    assert scipy_stats.kstest(w.astype(np.float64), dist.cdf).pvalue > 1e-3


def test_lecun_normal_is_jax_truncated_normal(scipy_stats):
    w = np.empty((400, 500), np.float64)
    fastopt.init.lecun_normal_(w, seed=4)
    std = math.sqrt(1 / 500) / 0.87962566103423978
    assert np.abs(w).max() <= 2 * std
    dist = scipy_stats.truncnorm(-2, 2, scale=std)
    assert scipy_stats.kstest(w.ravel(), dist.cdf).pvalue > 1e-3
    assert abs(w.var() * 500 - 1) < 0.02  # variance 1 / fan_in


@pytest.mark.parametrize("name, kwargs, fn", [
    ("normal_", dict(mean=0.5, std=2.0), "normal_"), ("uniform_", dict(a=-3.0, b=1.0), "uniform_"),
    ("trunc_normal_", dict(std=1.5, a=-1.0, b=2.0), "trunc_normal_"),
    ("kaiming_normal_", dict(nonlinearity="relu"), "kaiming_normal_")])
def test_same_distribution_as_torch(name, kwargs, fn, torch, scipy_stats):
    """Two-sample KS test against torch's own initializer on the same shape."""
    ours = np.empty((512, 256), np.float32)
    getattr(fastopt.init, name)(ours, **kwargs, seed=5)
    theirs = torch.empty(512, 256)
    getattr(torch.nn.init, fn)(theirs, **kwargs, generator=torch.Generator().manual_seed(5))
    assert scipy_stats.ks_2samp(ours.ravel(), theirs.numpy().ravel()).pvalue > 1e-3


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (16, 4, 3, 3), (50, 50)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_orthogonal(shape, dtype):
    w = np.empty(shape, dtype)
    fastopt.init.orthogonal_(w, gain=2.0, seed=6)
    flat = w.reshape(shape[0], -1).astype(np.float64) / 2.0
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-5)


def test_sparse_zeros_per_column():
    w = np.empty((101, 40), np.float32)
    fastopt.init.sparse_(w, 0.25, std=0.5, seed=8)
    assert ((w == 0).sum(axis=0) == math.ceil(0.25 * 101)).all()
    kept = w[w != 0]
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.kstest(kept.astype(np.float64), "norm", args=(0, 0.5)).pvalue > 1e-3


@pytest.mark.parametrize("shape, groups", [((4, 2, 3), 1), ((6, 3, 3, 3), 2), ((4, 4, 3, 3, 3), 4),
                                           ((2, 5, 2, 2), 1)])
def test_dirac_equals_torch(shape, groups, torch):
    w = np.empty(shape, np.float32)
    fastopt.init.dirac_(w, groups)
    np.testing.assert_array_equal(w, torch.nn.init.dirac_(torch.empty(shape), groups).numpy())


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_eye_constant_ones_zeros_equal_torch(shape, torch):
    for name, args in [("eye_", ()), ("ones_", ()), ("zeros_", ()), ("constant_", (0.3,))]:
        w = np.empty(shape, np.float32)
        getattr(fastopt.init, name)(w, *args)
        expected = getattr(torch.nn.init, name)(torch.empty(shape), *args).numpy()
        np.testing.assert_array_equal(w, expected)


def test_torch_parameter_is_filled_in_place(torch):
    layer = torch.nn.Linear(30, 20)
    before = layer.weight.data_ptr()
    fastopt.init.xavier_uniform_(layer.weight, seed=0)
    expected = np.empty((20, 30), np.float32)
    fastopt.init.xavier_uniform_(expected, seed=0)
    assert layer.weight.requires_grad and layer.weight.data_ptr() == before
    np.testing.assert_array_equal(layer.weight.detach().numpy(), expected)


@pytest.mark.parametrize("like", [None, "numpy", "torch", "jax", "tensorflow", "tf"])
def test_functional_returns_the_framework(like):
    if like == "torch":
        pytest.importorskip("torch")
    if like in ("jax",):
        pytest.importorskip("jax")
    if like in ("tensorflow", "tf"):
        pytest.importorskip("tensorflow")
    # float32: JAX holds float64 only with jax_enable_x64
    w = fastopt.init.kaiming_normal((40, 30), "float32", like=like, seed=11, mode="fan_out")
    expected = np.empty((40, 30), np.float32)
    fastopt.init.kaiming_normal_(expected, mode="fan_out", seed=11)
    fw = fastopt._interop.framework_of(w)
    assert fw == {None: "numpy", "tf": "tensorflow"}.get(like, like)
    np.testing.assert_array_equal(np.asarray(w), expected)


def test_functional_takes_dtype_and_device_from_like(torch):
    w = fastopt.init.ones(3, like=torch.zeros(1, dtype=torch.float64))
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64
    assert fastopt.init.zeros((2, 2), dtype=torch.float32).dtype == np.float32
    assert fastopt.init.eye((2, 3)).tolist() == [[1, 0, 0], [0, 1, 0]]


BAD = [
    ("xavier_uniform_", (4,), {}, ValueError, "2 or more dims"),
    ("kaiming_normal_", (4,), {}, ValueError, "2 or more dims"),
    ("lecun_uniform_", (), {}, ValueError, "2 or more dims"),
    ("orthogonal_", (5,), {}, ValueError, "2 or more dims"),
    ("eye_", (2, 2, 2), {}, ValueError, "2-D"),
    ("sparse_", (4,), dict(sparsity=0.1), ValueError, "2-D"),
    ("dirac_", (4, 4), {}, ValueError, "3-, 4- or 5-D"),
    ("dirac_", (5, 2, 3), dict(groups=2), ValueError, "divisible by groups"),
    ("kaiming_uniform_", (4, 4), dict(mode="fan_avg"), ValueError, "mode"),
    ("kaiming_uniform_", (4, 4), dict(nonlinearity="gelu"), ValueError, "nonlinearity"),
    ("uniform_", (4,), dict(a=1.0, b=0.0), ValueError, "a must be <= b"),
    ("normal_", (4,), dict(std=-1.0), ValueError, "std"),
    ("normal_", (4,), dict(mean=float("nan")), ValueError, "mean"),
    ("trunc_normal_", (4,), dict(a=1.0, b=1.0), ValueError, "a must be < b"),
    ("trunc_normal_", (4,), dict(std=0.0), ValueError, "std"),
    ("sparse_", (4, 4), dict(sparsity=1.5), ValueError, "sparsity"),
    ("xavier_uniform_", (4, 4), dict(gain=float("inf")), ValueError, "gain"),
    ("uniform_", (4,), dict(seed=-1), ValueError, "seed"),
    ("uniform_", (4,), dict(seed=2 ** 64), ValueError, "seed"),
    ("uniform_", (4,), dict(seed=1.5), TypeError, "seed"),
    ("uniform_", (4,), dict(backend="fortran"), ValueError, "backend"),
]


@pytest.mark.parametrize("name, shape, kwargs, error, match", BAD)
def test_bad_input_raises_and_writes_nothing(name, shape, kwargs, error, match):
    w = np.full(shape, 7.0, np.float32)
    if "seed" in fastopt.init.__dict__[name].__code__.co_varnames:
        kwargs = {"seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        getattr(fastopt.init, name)(w, **kwargs)
    assert (w == 7.0).all()


def test_bad_arrays():
    with pytest.raises(TypeError, match="seed"):
        fastopt.init.normal_(np.empty(3))  # seed is required
    with pytest.raises(TypeError, match="dtype int32"):
        fastopt.init.normal_(np.empty(3, np.int32), seed=0)
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastopt.init.normal_(read_only, seed=0)
    with pytest.raises(ValueError, match="not C-contiguous"):
        fastopt.init.normal_(np.zeros((4, 4))[:, ::2], seed=0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastopt.init.normal((3,), "int64", seed=0)
    with pytest.raises(ValueError, match="like must be"):
        fastopt.init.normal((3,), like="mxnet", seed=0)


def test_immutable_frameworks_point_to_the_functional_form():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="functional form"):
        fastopt.init.normal_(jnp.zeros(3), seed=0)


def test_zero_element_tensors_are_left_alone():
    for name in ("xavier_uniform_", "kaiming_normal_", "orthogonal_", "trunc_normal_"):
        getattr(fastopt.init, name)(np.empty((0, 4), np.float32), seed=0)


# -- on a GPU -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, reals", FILLS)
def test_cupy_fill_identical(kind, dtype, reals):
    import cupy
    n = 100_003
    expected = _fill("numpy", n, kind, dtype, reals, 77, 1)
    out = cupy.full(n, 7, dtype)
    _backends.load("cupy")[0].random_fill(out, kind, tuple(reals) + (0.0,) * (7 - len(reals)),
                                          77, 3, n_threads=1)
    np.testing.assert_array_equal(out.get().view(np.uint8), expected.view(np.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("name, kwargs", INITS)
def test_cupy_initializers_identical(name, kwargs):
    import cupy
    w = cupy.empty((70, 130), cupy.float32)
    getattr(fastopt.init, name)(w, **kwargs, seed=99)
    expected = np.empty((70, 130), np.float32)
    getattr(fastopt.init, name)(expected, **kwargs, seed=99)
    np.testing.assert_array_equal(w.get(), expected)
