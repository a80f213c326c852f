"""fastopt.distill.kd_loss against torch's loss and autograd gradient, bit-identity across
backends, large logits, bad input."""

import numpy as np
import pytest
from cases import spread, tiered
from conftest import CPU_BACKENDS, kd_case, require_backend

import fastopt
from fastopt import _backends, distill

BACKENDS = [b for b in _backends.OPS["kd_rows"] if b in CPU_BACKENDS]  # GPU: test_cuda
# torch warns that kl_div's reduction="mean" (the reference for ours) will change meaning
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")


def _torch(s, t, labels, T, alpha, reduction):
    import torch
    F = torch.nn.functional
    ts = torch.from_numpy(s.copy()).requires_grad_()
    log_s, log_t = F.log_softmax(ts / T, dim=1), F.log_softmax(torch.from_numpy(t) / T, dim=1)
    if reduction == "none":
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    else:
        kl = F.kl_div(log_s, log_t, reduction=reduction, log_target=True)
    loss = alpha * T * T * kl
    if labels is not None:
        ce_red = "mean" if reduction == "batchmean" else reduction
        loss = loss + (1 - alpha) * F.cross_entropy(ts, torch.from_numpy(labels),
                                                    reduction=ce_red)
    loss.sum().backward()
    return loss.detach().numpy(), ts.grad.numpy()


KD_CASES = [(1.0, 4.0, 0.9, (16, 1000)), (3.0, 3.0, 0.5, (7, 33)), (1e4, 2.5, 0.7, (9, 517)),
            (1e4, 1.0, 0.0, (4, 16)), (30.0, 2.0, 0.4, (6, 700)), (1e4, 8.0, 0.3, (5, 300)),
            (0.1, 0.5, 1.0, (3, 1))]  # (scale, T, alpha, shape)
TOLERANCES = [(np.float32, 2e-5), (np.float64, 1e-12)]  # (dtype, rtol)


def _flat(row):
    """A grid row with its case and tolerance unpacked into the test's arguments."""
    scale, T, alpha, shape = row["case"]
    dtype, rtol = row["tol"]
    return dict(backend=row["backend"], dtype=dtype, rtol=rtol, reduction=row["reduction"],
                with_labels=row["with_labels"], scale=scale, T=T, alpha=alpha, shape=shape)


def _torch_grid():
    """Full: every case x reduction x labels x dtype x backend. Fast: every case with every
    reduction, the labels, dtype and backend spread pairwise over them."""
    full = [dict(case=case, reduction=red, with_labels=wl, tol=tol, backend=backend)
            for backend in BACKENDS for tol in TOLERANCES for red in distill.REDUCTIONS
            for wl in (True, False) for case in KD_CASES]
    rows = [dict(case=case, reduction=red) for case in KD_CASES for red in distill.REDUCTIONS]
    rows = spread(rows, "with_labels", [True, False], against=["case", "reduction"])
    rows = spread(rows, "tol", TOLERANCES, against=["case", "reduction", "with_labels"])
    fast = spread(rows, "backend", BACKENDS, against=["case", "reduction", "with_labels", "tol"])
    args = ["backend", "dtype", "rtol", "reduction", "with_labels", "scale", "T", "alpha", "shape"]
    return tiered([_flat(r) for r in full], [_flat(r) for r in fast], args,
                  lambda r: "-".join(str(r[a]) if a != "dtype" else np.dtype(r[a]).name
                                     for a in args))


@pytest.mark.parametrize(
    "backend, dtype, rtol, reduction, with_labels, scale, T, alpha, shape", _torch_grid())
def test_matches_torch(backend, dtype, rtol, reduction, with_labels, scale, T, alpha, shape,
                       torch):
    require_backend(backend)
    rng = np.random.default_rng(1)
    s = (rng.standard_normal(shape) * scale).astype(dtype)
    t = (rng.standard_normal(shape) * scale).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0]) if with_labels else None
    loss, grad = distill.kd_loss(s, t, labels, T, alpha, reduction, backend=backend)
    t_loss, t_grad = _torch(s, t, labels, T, alpha, reduction)
    assert grad.dtype == dtype and grad.shape == shape
    assert np.isfinite(grad).all() and np.isfinite(loss).all()
    # the loss relative to its terms' size (KL is a difference of log-sum-exps)
    size = np.abs(t_loss) + 1e-6 * np.abs(s).max()
    assert np.all(np.abs(np.asarray(loss) - t_loss) <= rtol * size + 1e-300)
    np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=rtol * np.abs(t_grad).max())


@pytest.mark.parametrize("dtype, lowest", [(np.float32, -125.0), (np.float64, -1021.0)])
def test_exp2_within_1_2_ulp(dtype, lowest):
    # the reference's 2^u (the kernels equal it bit for bit, tests below) against long
    # double exp2, densely where f = u - round(u) nears -1/2, the polynomial's edge;
    # measured: 0.946 ulp (float32), 1.133 (float64)
    from fastopt._backends._numpy.compress import exp2_neg
    rng = np.random.default_rng(5)
    u = np.concatenate([rng.uniform(lowest, 0, 500_000), rng.uniform(-1, 0, 200_000),
                        rng.uniform(-1.5, -1.49, 100_000), [0.0, -0.0, lowest, -0.5]])
    u = u.astype(dtype)
    exact = np.exp2(u.astype(np.longdouble))
    ulps = np.abs(exp2_neg(u) - exact) / np.spacing(exact.astype(dtype))
    assert ulps.max() < 1.2
    below = np.nextafter(dtype(lowest), dtype(-np.inf))
    special = exp2_neg(np.array([0.0, lowest, below, -np.inf], dtype))
    assert special.tolist() == [1.0, 2.0 ** lowest, 0.0, 0.0]


def _identity_grid():
    """Full: every dtype x T x labels. Fast: every T with and without labels, the dtypes
    spread pairwise over them."""
    rows = [dict(T=T, with_labels=wl) for T in (3.0, 4.0, 1.0, 0.5, 2.0, 8.0, 16.0)
            for wl in (True, False)]
    full = [dict(row, dtype=dtype) for dtype in (np.float32, np.float64) for row in rows]
    fast = spread(rows, "dtype", [np.float32, np.float64], against=["T", "with_labels"])
    return tiered(full, fast, ["dtype", "T", "with_labels"],
                  lambda r: f"{r['with_labels']}-{r['T']}-{np.dtype(r['dtype']).name}")


# the kernels share exponentials at T = 1 and square them at T = 2, 4, 8
@pytest.mark.parametrize("dtype, T, with_labels", _identity_grid())
def test_backends_bit_identical(dtype, T, with_labels):
    s, t, labels = kd_case(dtype, 33, with_labels, seed=2)
    ref = distill.kd_loss(s, t, labels, T, backend="numpy")
    for backend in BACKENDS:
        require_backend(backend)
        loss, grad = distill.kd_loss(s, t, labels, T, backend=backend)
        assert loss == ref[0]
        np.testing.assert_array_equal(grad, ref[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T, with_labels", [(4.0, True), (3.0, True), (1.0, False)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_streamed_gradient_identical(dtype, T, with_labels, n_threads):
    # a large gradient is written with non-temporal stores (kernels/cpu/distill_loops.h),
    # forced here on a small one: rows of 1531 classes start off 16-byte boundaries, and
    # so does the whole gradient (one element past a 64-byte boundary)
    require_backend("cython")
    from fastopt._backends._numpy.compress import kd_rows
    from fastopt._cpu import _distill
    from fastopt._interop import aligned_empty
    s, t, labels = kd_case(dtype, 7, with_labels, seed=9)
    want = np.empty_like(s)
    want_rows = kd_rows(s, t, want, labels, T, 0.3, 0.05)
    got = aligned_empty(s.size + 1, dtype)[1:].reshape(s.shape)
    for stream in (True, False):
        got[...] = np.nan
        rows = _distill.kd_rows(s, t, got, labels, T, 0.3, 0.05, n_threads, stream=stream)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(got, want)


def test_identical_logits_give_zero_kl_and_frameworks():
    s = np.random.default_rng(3).standard_normal((5, 40)).astype(np.float32) * 1e4
    loss, grad = distill.kd_loss(s, s, alpha=1.0)
    assert loss == 0.0 and not grad.any()
    torch = pytest.importorskip("torch")
    ts = torch.from_numpy(s)
    loss, grad = distill.kd_loss(ts, ts.clone(), torch.tensor([0, 1, 2, 3, 4]), reduction="none")
    assert isinstance(loss, torch.Tensor) and loss.shape == (5,)
    assert isinstance(grad, torch.Tensor) and grad.dtype == torch.float32
    jnp = pytest.importorskip("jax.numpy")
    _, jgrad = distill.kd_loss(jnp.asarray(s), jnp.asarray(s))
    assert type(jgrad).__module__.startswith("jax")


@pytest.fixture
def recycled(monkeypatch):
    """Every host gradient recycled (not only those of REUSE_MIN_BYTES or more)."""
    from fastopt import _interop
    fastopt.empty_cache()
    monkeypatch.setattr(_interop, "REUSE_MIN_BYTES", 0)
    yield _interop._RECYCLER
    fastopt.empty_cache()


def _kd(seed, **kwargs):
    s, t, labels = kd_case(np.float32, 3, True, seed)
    return distill.kd_loss(s, t, labels, **kwargs)[1]


def test_gradient_buffer_recycled_once_nothing_refers_to_it(recycled):
    first = _kd(1)
    at = first.ctypes.data
    del first
    again = _kd(2)  # the first buffer, free again
    assert again.ctypes.data == at
    np.testing.assert_array_equal(again, _kd(2, backend="numpy"))
    kept = again.copy()
    view = again[1:]
    del again
    held = [_kd(seed) for seed in (3, 4, 5)]  # the view keeps the buffer: never handed out
    assert at not in [g.ctypes.data for g in held]
    np.testing.assert_array_equal(view, kept[1:])
    for seed, g in zip((3, 4, 5), held):
        np.testing.assert_array_equal(g, _kd(seed, backend="numpy"))
    assert len(recycled._buffers) == recycled.slots
    fastopt.empty_cache()
    assert recycled._buffers == []


@pytest.mark.parametrize("framework", ["torch", "jax.numpy", "tensorflow"])
def test_recycled_buffer_kept_by_framework_arrays(recycled, framework):
    # the gradient handed to a framework (zero-copy where it takes DLPack) keeps its buffer
    fw = pytest.importorskip(framework)
    convert = getattr(fw, {"torch": "from_numpy", "jax.numpy": "asarray",
                           "tensorflow": "constant"}[framework])
    s, t, _ = kd_case(np.float32, 3, False, 6)
    grad = distill.kd_loss(convert(s), convert(t))[1]
    host = np.asarray if framework == "jax.numpy" else (lambda g: g.numpy())
    before = host(grad).copy()
    for seed in (7, 8, 9):
        _kd(seed)
    np.testing.assert_array_equal(host(grad), before)


def test_gradient_buffers_recycled_across_threads(recycled):
    import threading
    want = {seed: _kd(seed, backend="numpy") for seed in range(8)}
    wrong = []

    def work(seeds):
        for _ in range(5):
            for seed in seeds:
                if not np.array_equal(_kd(seed), want[seed]):
                    wrong.append(seed)

    threads = [threading.Thread(target=work, args=(range(k, 8, 2),)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


BAD = [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(labels=np.array([0, 5])), ValueError, r"labels\[1\]=5 is outside"),
    (dict(labels=np.array([0, -1])), ValueError, r"labels\[1\]"),
    (dict(labels=np.array([0])), ValueError, r"labels: expected shape \(2,\)"),
    (dict(labels=np.array([0.0, 1.0])), TypeError, "labels: dtype float64"),
    (dict(teacher_logits=np.zeros((2, 4), np.float32)), ValueError, "teacher_logits"),
    (dict(student_logits=np.zeros(5, np.float32)), ValueError, "student_logits"),
    (dict(student_logits=np.array([[np.nan, 0, 0, 0, 0]] * 2, np.float32)), ValueError,
     "student_logits: holds NaN"),
    (dict(teacher_logits=np.array([[np.inf, 0, 0, 0, 0]] * 2, np.float32)), ValueError,
     "teacher_logits: holds NaN or inf"),
]


def _non_finite_grid():
    """Full: every backend x logits x value x position x (labels, T). Fast: each logits
    array with each value at each position, the (labels, T) pairs and the backends spread
    pairwise over them."""
    lt = [(True, 4.0), (True, 1.0), (False, 3.0)]
    rows = [dict(which=which, value=value, at=at) for which in ("student_logits", "teacher_logits")
            for value in (np.nan, np.inf, -np.inf) for at in ((0, 0), (2, 37), (4, 520))]
    full = [dict(row, lt=x, backend=b) for b in BACKENDS for x in lt for row in rows]
    fast = spread(spread(rows, "lt", lt, against=["which", "value", "at"]), "backend", BACKENDS,
                  against=["which", "value", "at", "lt"])

    def flat(r):
        return dict(backend=r["backend"], which=r["which"], value=r["value"], at=r["at"],
                    with_labels=r["lt"][0], T=r["lt"][1])
    args = ["backend", "which", "value", "at", "with_labels", "T"]
    return tiered([flat(r) for r in full], [flat(r) for r in fast], args,
                  lambda r: "-".join(str(r[a]) for a in args))


@pytest.mark.parametrize("backend, which, value, at, with_labels, T", _non_finite_grid())
def test_non_finite_logits_are_named(backend, which, value, at, with_labels, T):
    require_backend(backend)
    rng = np.random.default_rng(4)
    logits = {name: rng.standard_normal((5, 521)).astype(np.float32)
              for name in ("student_logits", "teacher_logits")}
    logits[which][at] = value
    labels = np.array([0, 37, 520, 3, 4]) if with_labels else None
    with pytest.raises(ValueError, match=f"{which}: holds NaN or inf"):
        distill.kd_loss(labels=labels, temperature=T, backend=backend, **logits)


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_input(kwargs, error, match):
    args = dict(student_logits=np.zeros((2, 5), np.float32),
                teacher_logits=np.zeros((2, 5), np.float32), labels=np.array([0, 4]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        distill.kd_loss(**args)
