"""fastopt.prune: masks against torch.nn.utils.prune and the NumPy reference, exact counts
and the tie rule on every CPU backend, masks inside every optimizer, bad input."""

import math

import numpy as np
import pytest
from cases import config_id, shaped, spread, tiered
from conftest import CPU_BACKENDS, require_backend
from test_optim_parity import CONFIGS, gradients

import fastopt
from fastopt import _backends, prune
from fastopt._backends import _select
from fastopt._backends._layout import DIGIT_BITS
from fastopt._backends._numpy.compress import magnitude_keys
from fastopt._backends._select import _shifts, key_bits


def _distinct(rng, shape, dtype):
    """Weights whose magnitudes are all different (so torch's topk order cannot matter)."""
    n = math.prod(shape)
    mags = (rng.permutation(n) + 1).astype(np.float64) / n
    signs = rng.choice([-1.0, 1.0], n)
    return (mags * signs).reshape(shape).astype(dtype)


def _torch_l1(w, amount):
    import torch
    from torch.nn.utils import prune as tprune
    module = torch.nn.Linear(1, 1)
    module.weight = torch.nn.Parameter(torch.from_numpy(w.copy()))
    tprune.l1_unstructured(module, "weight", amount)
    return module.weight_mask.numpy().astype(bool)


def _torch_grid():
    """Full: every backend x dtype x (shape, amount). Fast: every case in each dtype, the
    backends spread pairwise over them."""
    cases = [((7,), 3), ((40, 30), 0.3), ((3, 5, 7, 11), 0.9), ((100003,), 0.25),
             ((10,), 0.25), ((1,), 1.0), ((12,), 0), ((12,), 12), ((64, 64), 0.5)]
    rows = [dict(case=case, dtype=dtype) for dtype in (np.float32, np.float64) for case in cases]
    full = [dict(row, backend=b) for b in CPU_BACKENDS for row in rows]
    fast = spread(rows, "backend", CPU_BACKENDS, against=["case", "dtype"])

    def flat(r):
        return dict(backend=r["backend"], dtype=r["dtype"], shape=r["case"][0],
                    amount=r["case"][1])
    return tiered([flat(r) for r in full], [flat(r) for r in fast],
                  ["backend", "dtype", "shape", "amount"],
                  lambda r: "-".join([r["backend"], np.dtype(r["dtype"]).name, str(r["shape"]),
                                      str(r["amount"])]))


@pytest.mark.parametrize("backend, dtype, shape, amount", _torch_grid())
def test_magnitude_mask_matches_torch(backend, dtype, shape, amount, torch):
    require_backend(backend)
    w = _distinct(np.random.default_rng(1), shape, dtype)
    mask = prune.magnitude_mask(w, amount, backend=backend)
    assert mask.dtype == bool and mask.shape == w.shape
    np.testing.assert_array_equal(mask, _torch_l1(w, amount))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_global_masks_match_torch(backend, torch):
    from torch.nn.utils import prune as tprune
    require_backend(backend)
    rng = np.random.default_rng(2)
    shapes = [(30, 20), (17,), (5, 3, 3, 3), (0, 4), (2000,)]
    flat = _distinct(rng, (sum(math.prod(s) for s in shapes),), np.float32)
    ws, start = [], 0
    for s in shapes:
        ws.append(flat[start:start + math.prod(s)].reshape(s))
        start += math.prod(s)
    modules = [torch.nn.Linear(1, 1) for _ in ws]
    for m, w in zip(modules, ws):
        m.weight = torch.nn.Parameter(torch.from_numpy(w.copy()))
    tprune.global_unstructured([(m, "weight") for m in modules], tprune.L1Unstructured,
                               amount=0.45)
    masks = prune.global_magnitude_masks(ws, 0.45, backend=backend)
    for m, mask in zip(modules, masks):
        np.testing.assert_array_equal(mask, m.weight_mask.numpy().astype(bool))


def _tie_weights(rng, dtype):
    """Many ties: values on a coarse grid, signed zeros, infinities, tiny denormals."""
    w = rng.integers(-6, 7, 150001).astype(dtype) / 4
    w[::13] = -0.0
    w[5::101] = np.inf
    w[7::211] = -np.inf
    w[9::307] = np.finfo(dtype).tiny / 4
    return w


def _ties_grid():
    """Full: every backend x dtype x thread count. Fast: every backend in each dtype, the
    thread counts spread pairwise over them."""
    rows = [dict(backend=b, dtype=d) for b in CPU_BACKENDS for d in (np.float32, np.float64)]
    full = [dict(row, n_threads=n) for n in (1, 2) for row in rows]
    fast = spread(rows, "n_threads", [1, 2], against=["backend", "dtype"])
    return tiered(full, fast, ["backend", "dtype", "n_threads"],
                  lambda r: f"{r['backend']}-{np.dtype(r['dtype']).name}-{r['n_threads']}t")


@pytest.mark.parametrize("backend, dtype, n_threads", _ties_grid())
def test_ties_exact_count_and_rule(backend, dtype, n_threads):
    require_backend(backend)
    w = _tie_weights(np.random.default_rng(3), dtype)
    keys = np.abs(w.astype(np.float64))
    fastopt.set_num_threads(n_threads)
    try:
        for amount in (0, 1, 0.1, 0.5, 0.77, 0.999, len(w) - 1, len(w)):
            mask = prune.magnitude_mask(w, amount, backend=backend)
            k = amount if isinstance(amount, int) else round(amount * len(w))
            assert (~mask).sum() == k
            if 0 < k < len(w):
                assert keys[~mask].max() <= keys[mask].min()
                # the tie rule: at the threshold, the earlier entries are the pruned ones
                thr = keys[~mask].max()
                at = np.flatnonzero(keys == thr)
                pruned_at = at[~mask[at]]
                np.testing.assert_array_equal(pruned_at, at[:len(pruned_at)])
            np.testing.assert_array_equal(mask, prune.magnitude_mask(w, amount, backend="numpy"))
    finally:
        fastopt.set_num_threads(2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_across_tensors_go_to_the_earlier_tensor(backend):
    require_backend(backend)
    ws = [np.full(40000, 0.5, np.float32), np.full(30000, -0.5, np.float32),
          np.full(5, 0.25, np.float32)]
    masks = prune.global_magnitude_masks(ws, 50005, backend=backend)
    assert not masks[2].any()
    assert not masks[0].any()
    np.testing.assert_array_equal(masks[1], np.arange(30000) >= 10000)


def _planted_ties(rng, dtype):
    """Three gaussian tensors whose median magnitude is repeated at 3000 positions spread
    over all of them: the threshold's first digit leaves few keys undecided (the split
    path), and the ties among them span tensors, chunks and both threads' halves."""
    sizes = [70001, 5, 130000]
    w = rng.standard_normal(sum(sizes)).astype(dtype)
    v = np.median(np.abs(w)).astype(dtype)
    at = rng.choice(w.size, 3000, replace=False)
    w[at] = v * rng.choice([-1, 1], at.size)
    return np.split(w, np.cumsum(sizes)[:-1]), v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_split_path_ties_across_tensors(dtype, n_threads, monkeypatch):
    """The Cython backend's split pass (the backend with prune_split): the masks equal the
    reference's, with the threshold's ties pruned by position across the split."""
    backend = "cython"
    require_backend(backend)
    ops = _backends.load(backend)[0].compress  # the select's passes
    calls = []

    def split(*args):
        calls.append(args[2:4])
        return real_split(*args)
    real_split = ops.prune_split
    monkeypatch.setattr(ops, "prune_split", split)
    ws, v = _planted_ties(np.random.default_rng(5), dtype)
    mags = np.abs(np.concatenate(ws))
    below, equal = int((mags < v).sum()), int((mags == v).sum())
    fastopt.set_num_threads(n_threads)
    try:
        for k in (below - 1, below, below + 1, below + equal // 3, below + equal - 1,
                  below + equal, below + equal + 1):
            masks = prune.global_magnitude_masks(ws, k, backend=backend)
            for got, want in zip(masks, prune.global_magnitude_masks(ws, k, backend="numpy")):
                np.testing.assert_array_equal(got, want)
    finally:
        fastopt.set_num_threads(2)
    assert len(calls) == 7  # every k took the split path


def _split_want(ws, lo, hi, bits):
    """The split pass's results by NumPy: the masks outside [lo, hi], the keys inside with
    their flat positions, the count below lo and the largest key."""
    keys = np.concatenate([magnitude_keys(w) for w in ws]).astype(np.uint64)
    inside = (keys >= lo) & (keys <= hi)
    return ((keys > hi).astype(np.uint8), keys[inside], np.flatnonzero(inside),
            int((keys < lo).sum()), int(keys.max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
def test_split_pass_against_numpy(dtype, simd):
    """The Cython split pass, with AVX-512 where the CPU has it (_prune.SIMD) and the
    portable loop: tensors starting at every offset in a cache line, with tails, several
    chunks, one and two threads, brackets holding no key, a few, most, or all."""
    require_backend("cython")
    from fastopt._cpu import _prune
    bits, _ = key_bits(dtype)
    rng = np.random.default_rng(12)
    base = rng.standard_normal(100000).astype(dtype)  # 2 threads (32768 elements each, at least)
    base[rng.random(base.size) < 0.1] = 0
    step = 64 // base.itemsize
    ws = [base[s:s + 37 * s + 5] for s in range(step)] + [base[3:]]
    keys = np.sort(np.concatenate([magnitude_keys(w) for w in ws]))
    brackets = [(2 ** bits - 1, 2 ** bits - 1), (0, 0), (int(keys[100]), int(keys[600])),
                (int(keys[5]), int(keys[-5])), (0, 2 ** bits - 1)]
    for lo, hi in brackets:
        want_m, want_keys, want_pos, want_below, want_max = _split_want(ws, lo, hi, bits)
        for n_threads in (1, 2):
            masks = [np.full(w.size, 7, np.uint8) for w in ws]
            got_keys, got_pos, below, maxkey = _prune.split(ws, masks, lo, hi, n_threads,
                                                            simd=simd)
            np.testing.assert_array_equal(np.concatenate(masks), want_m)
            np.testing.assert_array_equal(got_keys, want_keys)
            np.testing.assert_array_equal(got_pos, want_pos)
            assert (below, maxkey) == (want_below, want_max)


def test_sample_spreads_runs_over_the_tensors():
    """_prune.sample: cache-line runs, one starting in each of the equal ranges at the
    golden-ratio fraction, across tensor boundaries (runs straddle them, and overlap where
    ranges are shorter than a run), on one and two threads."""
    require_backend("cython")
    from fastopt._cpu import _prune
    rng = np.random.default_rng(13)
    for dtype in (np.float32, np.float64):
        ws = [rng.standard_normal(n).astype(dtype) for n in (5001, 3, 240000, 17, 9)]
        flat = np.concatenate([magnitude_keys(w) for w in ws])
        run = 64 // flat.itemsize
        most = (flat.size - run) * run
        for n, n_threads in ((2 * _prune.SAMPLE_PER_THREAD * run, 2), (1024, 1), (run, 2),
                             (flat.size // 3, 2), (most, 2)):
            runs = n // run
            i = np.arange(runs + 1, dtype=np.int64)
            start = i * (flat.size - run) // runs
            at = start[:-1] + ((i[:-1] * 0x9E3779B9 & 0xFFFFFFFF) * np.diff(start) >> 32)
            want = flat[at[:, None] + np.arange(run)]
            np.testing.assert_array_equal(_prune.sample(ws, n, n_threads), want)
        with pytest.raises(ValueError, match="n: expected"):
            _prune.sample(ws, most + run, 2)


def _sampled_cases(rng):
    """Weights for the sampled select (more than SAMPLED_MIN keys): gaussian, sorted
    magnitudes, columns of very different scales, values from a small set (every
    threshold a run of ties), and a list of tensors that the sample's runs straddle."""
    n = _select.SAMPLED_MIN + 12345
    cols = rng.standard_normal((n // 1024, 1024)) * np.geomspace(1e-3, 1e3, 1024)
    yield "gaussian", [rng.standard_normal(n)]
    yield "sorted", [np.linspace(-1, 1, n)]
    yield "column scales", [cols.ravel()]
    yield "few values", [rng.integers(-300, 300, n) / 64]
    yield "list", np.split(rng.standard_normal(n), [7, 100000, 100001, 100002, 200000])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sampled_select_against_numpy(dtype, monkeypatch):
    """The Cython backend's select over more than SAMPLED_MIN keys: a sample brackets the
    threshold and one pass splits the weights. The masks equal the reference's for every
    kind of weights and amount (two threads), and where the bracket misses the threshold
    (Z = 0 leaves it too narrow) the select starts over and is still exact."""
    require_backend("cython")
    results = []
    real_split = _select._split

    def split(*args):
        done, maxkey = real_split(*args)
        results.append(done)
        return done, maxkey
    monkeypatch.setattr(_select, "_split", split)
    rng = np.random.default_rng(14)
    fastopt.set_num_threads(2)
    for name, ws in _sampled_cases(rng):
        ws = [w.astype(dtype) for w in ws]
        total = sum(w.size for w in ws)
        for k in (1, total // 5, total // 2, total - 3, 0.999):
            want = prune.global_magnitude_masks(ws, k, backend="numpy")
            for z in (_select.Z, 0.0):
                monkeypatch.setattr(_select, "Z", z)
                monkeypatch.setattr(_select, "SPLIT_SHARE", 16 if z else 1)  # 0: no bail-out
                got = prune.global_magnitude_masks(ws, k, backend="cython")
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w, err_msg=f"{name}, k={k}, Z={z}")
    assert True in results and False in results  # the bracket held, and it missed


def test_sampled_select_refuses_nan_in_or_outside_the_sample(monkeypatch):
    """A NaN in the sample is seen there; one outside it by the split pass's maximum."""
    require_backend("cython")
    from fastopt._cpu import _prune
    calls = []
    real_split = _select._split

    def split(*args):
        calls.append(args[4:6])
        return real_split(*args)
    monkeypatch.setattr(_select, "_split", split)
    w = np.random.default_rng(16).standard_normal(_select.SAMPLED_MIN + 100).astype(np.float32)
    n = min(_select.SAMPLE, w.size // _select.SAMPLE_EVERY)
    unseen = 0
    while True:  # the first position the sample does not read
        w[unseen], was = np.nan, w[unseen]
        if not np.isnan(_prune.sample([w], n, 2).view(np.float32)).any():
            break
        w[unseen] = was
        unseen += 1
    with pytest.raises(ValueError, match=r"ws\[0\]: holds NaN"):
        prune.magnitude_mask(w, 0.5, backend="cython")
    assert len(calls) == 1  # the split pass ran, and found it
    w[unseen], w[0] = 0.5, np.nan
    with pytest.raises(ValueError, match=r"ws\[0\]: holds NaN"):
        prune.magnitude_mask(w, 0.5, backend="cython")
    assert len(calls) == 1  # the sample found it: no split pass


@pytest.mark.parametrize("f64", [False, True])
def test_settle_splits_the_ties_between_threads(f64):
    """_prune.settle on two threads, the threshold's ties running across the boundary of
    their ranges and across tensors: the first `ties` of them pruned, in order."""
    require_backend("cython")
    from fastopt._cpu import _prune
    n = 4 * _prune.SETTLE_PER_THREAD
    rng = np.random.default_rng(15)
    keys = rng.integers(90, 110, n).astype(np.uint64 if f64 else np.uint32)
    keys[n // 2 - 500:n // 2 + 500] = 100
    pos = np.sort(rng.choice(3 * n, n, replace=False)).astype(np.int64)
    sizes = [n, 5, 2 * n - 5]
    eq = np.flatnonzero(keys == 100)
    for ties in (0, 1, eq.size // 2, np.searchsorted(eq, n // 2), eq.size):
        want = np.zeros(3 * n, np.uint8)
        want[pos[keys > 100]] = 1
        want[pos[eq[ties:]]] = 1
        for n_threads in (1, 2):
            masks = [np.zeros(s, np.uint8) for s in sizes]
            _prune.settle(masks, keys, pos, 100, int(ties), n_threads)
            np.testing.assert_array_equal(np.concatenate(masks), want)


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counting_passes_count_each_key_once(backend, dtype):
    """The select's counting passes against np.bincount: weights starting at every offset
    in a cache line (the Cython loop counts blocks from a 64-byte boundary, the rest key
    by key) and of lengths that leave a tail, 60% zeros (one crowded bin: the interleaved
    counters) beside spread keys, and after the first digit prefixes that most keys match
    or few (both loops count the others into a sink that must never reach a bin)."""
    require_backend(backend)
    passes = _backends.load(backend)[0].compress
    bits, _ = key_bits(dtype)
    shifts = _shifts(bits)
    utype = np.uint64 if bits == 63 else np.uint32
    rng = np.random.default_rng(8)
    base = rng.standard_normal(40000).astype(dtype)
    base[rng.random(base.size) < 0.6] = 0
    spread_key = int(base[np.flatnonzero(base)[0]].view(utype) & utype(2 ** bits - 1))
    top = (2 ** DIGIT_BITS - 1) << shifts[0]
    for start in range(64 // base.itemsize):
        w = base[start:start + 1000 + 37 * start]
        if start == 1:
            w = base[start:]  # several chunks
        keys = w.view(utype) & utype(2 ** bits - 1)
        for shift, pmask, prefix in ((shifts[0], 0, 0), (shifts[1], top, 0),
                                     (shifts[1], top, spread_key & top)):
            counts, maxkey = passes.prune_hist([w], shift, pmask, prefix, 2)
            match = keys[(keys & utype(pmask)) == utype(prefix)]
            want = np.bincount((match >> utype(shift)) & utype(2 ** DIGIT_BITS - 1),
                               minlength=2 ** DIGIT_BITS)
            np.testing.assert_array_equal(counts, want)
            if pmask == 0:
                assert maxkey == int(keys.max())


def test_amount_rounds_half_to_even_as_torch(torch):
    for n, amount in [(10, 0.25), (10, 0.35), (6, 0.25), (14, 0.25), (3, 0.5), (5, 0.5)]:
        w = _distinct(np.random.default_rng(n), (n,), np.float32)
        mask = prune.magnitude_mask(w, amount)
        assert (~mask).sum() == round(amount * n)
        np.testing.assert_array_equal(mask, _torch_l1(w, amount))


def test_mask_dtype_and_frameworks():
    w = _distinct(np.random.default_rng(4), (20, 10), np.float32)
    expected = prune.magnitude_mask(w, 0.3)
    m8 = prune.magnitude_mask(w, 0.3, dtype="uint8")
    assert m8.dtype == np.uint8
    np.testing.assert_array_equal(m8, expected)
    # a non-contiguous weight is read through a copy
    np.testing.assert_array_equal(prune.magnitude_mask(w.T, 0.3),
                                  prune.magnitude_mask(np.ascontiguousarray(w.T), 0.3))
    torch = pytest.importorskip("torch")
    mt = prune.magnitude_mask(torch.from_numpy(w), 0.3)
    assert isinstance(mt, torch.Tensor) and mt.dtype == torch.bool
    np.testing.assert_array_equal(mt.numpy(), expected)
    jnp = pytest.importorskip("jax.numpy")
    mj = prune.magnitude_mask(jnp.asarray(w), 0.3)
    assert type(mj).__module__.startswith("jax") and mj.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mj), expected)
    tf = pytest.importorskip("tensorflow")
    mtf = prune.magnitude_mask(tf.constant(w), 0.3)
    assert isinstance(mtf, tf.Tensor) and mtf.dtype == tf.bool
    np.testing.assert_array_equal(mtf.numpy(), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_mask(backend):
    require_backend(backend)
    w = np.zeros((300, 101), np.float32)
    mask = prune.random_mask(w, 0.3, seed=7, backend=backend)
    assert (~mask).sum() == round(0.3 * w.size)
    np.testing.assert_array_equal(mask, prune.random_mask(w, 0.3, seed=7, backend="numpy"))
    assert (mask != prune.random_mask(w, 0.3, seed=8, backend=backend)).any()
    # every position is pruned about as often as any other, over many seeds
    small = np.zeros(20, np.float32)
    counts = sum((~prune.random_mask(small, 5, seed=s, backend=backend)).astype(int)
                 for s in range(400))
    assert counts.sum() == 2000
    assert np.all(np.abs(counts - 100) < 5 * math.sqrt(100 * 0.75))


@pytest.mark.parametrize("n", [1, 2, 3, math.inf, -math.inf, "fro"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_ln_structured_matches_torch(n, dim, torch):
    from torch.nn.utils import prune as tprune
    w = np.random.default_rng(5).standard_normal((12, 9, 3)).astype(np.float32)
    module = torch.nn.Linear(1, 1)
    module.weight = torch.nn.Parameter(torch.from_numpy(w.copy()))
    tprune.ln_structured(module, "weight", amount=0.4, n=n, dim=dim)
    np.testing.assert_array_equal(prune.ln_structured_mask(w, 0.4, n=n, dim=dim),
                                  module.weight_mask.numpy().astype(bool))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ln_structured_backends_agree(backend, dtype):
    """The compiled norms (n 1, 2, 'fro': weight normalization's slice sums) give the
    reference backend's masks on every backend (slices 3 and 7 equal), with equal norms
    pruned lower index first, and a non-finite weight is refused there too."""
    require_backend(backend)
    w = np.random.default_rng(7).standard_normal((40, 300, 2)).astype(dtype)
    w[:, 7] = w[:, 3]
    for n in (1, 2, "fro"):
        for dim in (0, 1, 2):
            for amount in (1, 0.5, 0.9):
                np.testing.assert_array_equal(
                    prune.ln_structured_mask(w, amount, n=n, dim=dim, backend=backend),
                    prune.ln_structured_mask(w, amount, n=n, dim=dim, backend="numpy"))
    small = w[:, :8].copy()
    small[:, 3] = small[:, 7] = 1e-3  # the two smallest slices, equal
    for n in (1, 2):
        mask = prune.ln_structured_mask(small, 1, n=n, dim=1, backend=backend)
        assert not mask[:, 3].any() and mask[:, 7].all()  # the lower index pruned
    w[5, 9, 1] = np.nan
    with pytest.raises(ValueError, match="w: holds NaN or inf"):
        prune.ln_structured_mask(w, 0.5, n=2, dim=0, backend=backend)
    for shape, dim in (((0, 3), 0), ((0, 3), 1), ((4, 0, 2), 0)):  # no slices, or empty ones
        for n in (1, 2, math.inf, 3):
            mask = prune.ln_structured_mask(np.zeros(shape, dtype), 0, n=n, dim=dim,
                                            backend=backend)
            assert mask.shape == shape


NM_CASES = [((16, 24, 24), 2, 4, -1), ((16, 24, 24), 2, 4, 0), ((16, 24, 24), 1, 4, 1),
            ((16, 24, 24), 4, 8, -1), ((16, 24, 24), 0, 2, 0), ((16, 24, 24), 3, 3, -1),
            ((16, 24, 24), 24, 24, 2), ((4, 48, 3), 5, 16, 1), ((6, 130), 30, 65, 1),
            ((3, 128, 5), 100, 128, 1), ((512, 256), 2, 4, -1), ((512, 256), 1, 2, 0)]


def _nm_grid():
    """Every case (C = 1 and C > 1, constant and other m, m above FO_NM_MAX's 64, two
    threads' worth) in each dtype on the Cython backend; Numba and the reference on
    every other case in turn."""
    rows = []
    for dtype in (np.float32, np.float64):
        for i, case in enumerate(NM_CASES):
            for backend in ["cython"] + [("numpy", "numba")[i % 2]]:
                rows.append(pytest.param(backend, dtype, *case, id=f"{backend}-"
                                         f"{np.dtype(dtype).name}-{case[0]}-{case[1]}:{case[2]}"
                                         f"-dim{case[3]}"))
    return rows


@pytest.mark.parametrize("backend, dtype, shape, n, m, dim", _nm_grid())
def test_nm_mask(backend, dtype, shape, n, m, dim):
    """Each group of m along dim keeps its n largest magnitudes (of equal ones, the lower
    index is pruned first), against a stable argsort per group, and the same as the
    reference's."""
    require_backend(backend)
    rng = np.random.default_rng(6)
    w = rng.integers(-4, 5, shape).astype(dtype)  # many ties
    w[..., ::3] *= 1.5
    mask = prune.nm_mask(w, n=n, m=m, dim=dim, backend=backend)
    moved_w = np.moveaxis(np.abs(w), dim, -1)
    moved_m = np.moveaxis(mask, dim, -1)
    groups_w = moved_w.reshape(-1, m)
    groups_m = moved_m.reshape(-1, m)
    order = np.argsort(groups_w, axis=1, kind="stable")  # by magnitude, then index
    expected = np.zeros(groups_w.shape, bool)
    np.put_along_axis(expected, order[:, m - n:], True, axis=1)
    np.testing.assert_array_equal(groups_m, expected)
    np.testing.assert_array_equal(mask, prune.nm_mask(w, n=n, m=m, dim=dim, backend="numpy"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nm_mask_refuses_nonfinite(backend, bad):
    require_backend(backend)
    w = np.ones((8, 128), np.float32)
    w[5, 77] = bad
    with pytest.raises(ValueError, match="w: holds NaN or inf"):
        prune.nm_mask(w, 2, 4, backend=backend)


def test_apply_mask():
    w = np.array([1.0, np.nan, -np.inf, 4.0], np.float32)
    mask = np.array([True, False, False, True])
    assert prune.apply_mask_(w, mask) is w
    np.testing.assert_array_equal(w, [1.0, 0.0, 0.0, 4.0])
    assert not np.signbit(w[2])
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    prune.apply_mask_(p, torch.tensor([1, 0, 1], dtype=torch.uint8))
    assert p.requires_grad and p.detach().tolist() == [1.0, 0.0, 3.0]
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray([1.0, 2.0], jnp.float32)
    with pytest.raises(TypeError, match="immutable"):
        prune.apply_mask_(x, np.array([True, False]))
    y = prune.apply_mask(x, np.array([True, False]))
    assert type(y).__module__.startswith("jax") and np.asarray(y).tolist() == [1.0, 0.0]


def test_polynomial_sparsity():
    s = [prune.polynomial_sparsity(t, 0.1, 0.9, 10, 110) for t in range(0, 130)]
    assert s[0] == s[10] == 0.1 and s[110] == s[129] == 0.9
    assert all(b >= a for a, b in zip(s, s[1:]))
    t = 35
    assert s[t] == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3, rel=1e-15)
    assert prune.polynomial_sparsity(60, 0.0, 0.5, 10, 110, power=1) == pytest.approx(0.25)
    assert prune.polynomial_sparsity(5, 0.0, 0.5, 5, 5) == 0.5


BAD = [
    (lambda w: prune.magnitude_mask(w, 1.5), ValueError, "amount"),
    (lambda w: prune.magnitude_mask(w, -0.1), ValueError, "amount"),
    (lambda w: prune.magnitude_mask(w, 13), ValueError, "amount=13"),
    (lambda w: prune.magnitude_mask(w, -1), ValueError, "amount=-1"),
    (lambda w: prune.magnitude_mask(w, True), TypeError, "amount"),
    (lambda w: prune.magnitude_mask(w, float("nan")), ValueError, "amount"),
    (lambda w: prune.magnitude_mask(w, 0.5, dtype="float32"), ValueError, "dtype"),
    (lambda w: prune.magnitude_mask(w.astype(np.int32), 0.5), TypeError, "w: dtype int32"),
    (lambda w: prune.global_magnitude_masks([w, w.astype(np.float64)], 0.5), ValueError,
     r"ws\[1\]"),
    (lambda w: prune.global_magnitude_masks([], 0.5), ValueError, "ws"),
    (lambda w: prune.random_mask(w, 0.5, seed=-1), ValueError, "seed"),
    (lambda w: prune.random_mask(w, 0.5, seed=2 ** 64), ValueError, "seed"),
    (lambda w: prune.ln_structured_mask(w, 0.5, n=0, dim=0), ValueError, "n must"),
    (lambda w: prune.ln_structured_mask(w, 0.5, n=2, dim=2), ValueError, "dim=2"),
    (lambda w: prune.ln_structured_mask(w, 5, n=2, dim=0), ValueError, "amount=5"),
    (lambda w: prune.nm_mask(w, n=3, m=2), ValueError, "n must be <= m"),
    (lambda w: prune.nm_mask(w, n=2, m=5), ValueError, "multiple of m=5"),
    (lambda w: prune.nm_mask(w, n=2, m=4, dim=3), ValueError, "dim=3"),
    (lambda w: prune.apply_mask_(w, np.ones((4, 3), bool)), ValueError, "mask: shape"),
    (lambda w: prune.apply_mask_(w, np.ones((3, 4), np.float32)), TypeError, "mask: dtype"),
    (lambda w: prune.apply_mask_(w[:, ::2], np.ones((3, 2), bool)), ValueError, "contiguous"),
    (lambda w: prune.polynomial_sparsity(5, 0.0, 1.5, 0, 10), ValueError, "final"),
    (lambda w: prune.polynomial_sparsity(5, 0.0, 0.5, 10, 0), ValueError, "end must"),
    (lambda w: prune.polynomial_sparsity(5, 0.0, 0.5, 0, 10, power=0), ValueError, "power"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    before = w.copy()
    with pytest.raises(error, match=match):
        call(w)
    np.testing.assert_array_equal(w, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_weights_are_refused(backend):
    require_backend(backend)
    ws = [np.ones(5, np.float32), np.array([1.0, np.nan], np.float32)]
    with pytest.raises(ValueError, match=r"ws\[1\]: holds NaN"):
        prune.global_magnitude_masks(ws, 0.5, backend=backend)
    for fn in (lambda w: prune.ln_structured_mask(w, 1, n=2, dim=0),
               lambda w: prune.nm_mask(w, 1, 2)):
        with pytest.raises(ValueError, match="NaN"):
            fn(ws[1])


# -- masks inside the optimizers

MASK_SHAPES = [(37, 50), (100003,), (3, 4, 5), (7,)]


def _masked_run(name, kw, backend, dtype, n_threads, steps=6, **opt_kw):
    rng = np.random.default_rng(11)
    shapes = shaped(name, MASK_SHAPES)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    masks = [prune.magnitude_mask(params[0], 0.5), None,
             prune.random_mask(params[2], 0.3, seed=1, dtype="uint8"),
             prune.magnitude_mask(params[3], 7)]
    opt = getattr(fastopt, name)(params, backend=backend, n_threads=n_threads, masks=masks,
                                 **kw, **opt_kw)
    for _ in range(steps):
        grads = gradients(rng, shapes, dtype)
        for g, m in zip(grads, masks):
            if m is not None:
                g[m == 0] = np.nan  # never reaches a kept entry
        opt.step(grads)
    return params, masks, opt


def _masks_grid():
    """Full: every config on every backend. Fast: every config on one backend, the
    backends spread over each rule's configs (each rule on every backend)."""
    rows = [dict(config=(name, kw), rule=name) for name, kw in CONFIGS]
    full = [dict(row, backend=b) for b in CPU_BACKENDS for row in rows]
    fast = spread(rows, "backend", CPU_BACKENDS, against=["rule"])
    return tiered(full, fast, ["backend", "config"],
                  lambda r: f"{r['backend']}-{config_id(*r['config'])}")


@pytest.mark.parametrize("backend, config", _masks_grid())
def test_optimizer_masks(backend, config):
    require_backend(backend)
    name, kw = config
    params, masks, opt = _masked_run(name, kw, backend, np.float32, 2)
    for i, (p, m) in enumerate(zip(params, masks)):
        if m is None:
            assert np.isfinite(p).all()
            continue
        pruned = np.asarray(m) == 0
        assert (p[pruned] == 0).all() and not np.signbit(p[pruned]).any()
        assert np.isfinite(p[~pruned]).all()
        for key, state in opt.state[i].items():
            if getattr(state, "shape", None) == p.shape:
                assert (state[pruned] == 0).all(), key
    if backend != "numpy":
        ref, _, _ = _masked_run(name, kw, "numpy", np.float32, 1)
        for p, r in zip(params, ref):
            np.testing.assert_array_equal(p, r)
        one, _, _ = _masked_run(name, kw, backend, np.float32, 1)
        for p, r in zip(params, one):
            np.testing.assert_array_equal(p, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_entries_count_as_zero_gradient_in_the_norm(backend):
    require_backend(backend)
    params, masks, _ = _masked_run("Adam", dict(lr=0.01), backend, np.float64, 2,
                                   max_grad_norm=0.5, skip_nonfinite=True)
    # NaN gradients in pruned entries neither skip the step nor poison the norm
    assert all(np.isfinite(p).all() for p in params)


def test_masked_elementwise_step_leaves_kept_entries_as_unmasked():
    rng = np.random.default_rng(12)
    w = rng.standard_normal(1000).astype(np.float32)
    mask = prune.magnitude_mask(w, 0.5)
    a, b = w.copy(), w.copy()
    opt_a = fastopt.AdamW([a], lr=0.01, weight_decay=0.1, masks=[mask])
    opt_b = fastopt.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        g = rng.standard_normal(1000).astype(np.float32)
        opt_a.step([g])
        opt_b.step([g])
    np.testing.assert_array_equal(a[mask], b[mask])
    assert (a[~mask] == 0).all()
    opt_a.set_masks(None)
    opt_a.step([np.ones(1000, np.float32)])
    assert (a[~mask] != 0).all()


def test_optimizer_masks_torch_parameters(torch):
    w = torch.randn(50, 20)
    mask = prune.magnitude_mask(w, 0.6)
    assert mask.dtype == torch.bool
    opt = fastopt.SGD([w], lr=0.1, momentum=0.9, masks=[mask])
    opt.step([torch.randn(50, 20)])
    assert (w[~mask] == 0).all()
    assert (opt.state[0]["momentum_buffer"][~mask.numpy()] == 0).all()


@pytest.mark.parametrize("masks, error, match", [
    ([np.ones(3, bool)], ValueError, "expected 2 entries"),
    ([np.ones(4, bool), None], ValueError, r"masks\[0\]: shape"),
    ([None, np.ones(5, np.float32)], TypeError, r"masks\[1\]: dtype float32"),
    (np.ones(3, bool), TypeError, "masks: expected a list"),
])
def test_bad_optimizer_masks(masks, error, match):
    params = [np.ones(3, np.float32), np.ones(5, np.float32)]
    opt = fastopt.Adam(params, lr=0.1, masks=[None, np.zeros(5, bool)])
    with pytest.raises(error, match=match):
        opt.set_masks(masks)
    with pytest.raises(error, match=match):
        fastopt.Adam(params, lr=0.1, masks=masks)
    opt.step([np.ones(3, np.float32), np.ones(5, np.float32)])
    assert (params[1] == 0).all() and (params[0] != 1).all()  # the old masks still hold
