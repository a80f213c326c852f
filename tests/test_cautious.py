"""``cautious=True`` (C-Optim, arXiv 2411.16085, as timm applies it): what the table tests
(tests/cases.py: conformance with tests/reference_impls.py, backend parity, resume, bad
input) do not single out. After the moment update, the update's numerator u is multiplied by
``mask / max(mean(mask), 1e-3)`` with ``mask = (u * grad > 0)``, the mean over each tensor
on its own; the stored moments stay unmasked.

With no weight decay (or a decoupled one) a rule's state depends on the gradients only, so
a cautious and a plain optimizer fed the same gradients keep the same state, and from the
same parameters a cautious step is the plain step, masked and scaled: the tests compare
the two.
"""

import numpy as np
import pytest
from conftest import CPU_BACKENDS, require_backend

import fastopt
from fastopt import _rules

RULES = ("AdamW", "Adam", "ADOPT", "Lion", "AdEMAMix")

# no L2 decay: the state does not depend on the parameters
UNDECAYED = [
    pytest.param("AdamW", dict(lr=1e-2, weight_decay=0.0), id="AdamW"),
    pytest.param("Adam", dict(lr=1e-2, amsgrad=True), id="Adam"),
    pytest.param("ADOPT", dict(lr=1e-2), id="ADOPT"),
    pytest.param("Lion", dict(lr=1e-3), id="Lion"),
    pytest.param("AdEMAMix", dict(lr=1e-2), id="AdEMAMix"),
    # no fast average: the numerator is grad / 1 + alpha * exp_avg_slow
    pytest.param("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.9)), id="AdEMAMix-beta1=0"),
]

# (size, the entries whose update agrees in sign with the gradient): several tensors of one
# step, each scaled by its own fraction
PATTERNS = [
    (7, []),  # none agrees: the parameter stays (a zero mask, scaled by 1000)
    (7, range(7)),  # all agree: the plain step
    (7, [0, 3, 6]),  # scaled by 7 / 3
    (8, [5, 6]),  # scaled by 4
    (2000, [1234]),  # 1 / 2000 < 1e-3: scaled by 1000, not 2000
    (1, [0]),
    (1, []),
    (0, []),
    (100003, range(30001)),  # split among the threads: one mean over all of its chunks
]


def _pair(name, kw, params, backend="cython", n_threads=2, **extra):
    """A cautious and a plain optimizer, each over its copy of `params`."""
    copies = [[p.copy() for p in params] for _ in range(2)]
    return [(getattr(fastopt, name)(ps, backend=backend, n_threads=n_threads, cautious=c,
                                    **kw, **extra), ps)
            for c, ps in zip((True, False), copies)]


def _assert_same_state(a, b):
    assert a.state.keys() == b.state.keys()
    for i in a.state:
        assert a.state[i].keys() == b.state[i].keys()
        for key, value in a.state[i].items():
            np.testing.assert_array_equal(value, b.state[i][key], err_msg=f"state[{i}][{key}]")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", UNDECAYED)
def test_step_is_the_plain_step_masked(name, kw, backend, dtype):
    """Two steps of gradient 1 (every entry agrees: the plain steps, bit for bit), then one
    of +-0.05: +0.05 where PATTERNS says the entry agrees, -0.05 (too small to turn the
    momentum) where not. That step is the plain one times mask / max(mean, 1e-3) per
    tensor, and the state stays the plain optimizer's."""
    require_backend(backend)
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(dtype) for n, _ in PATTERNS]
    agree = []
    for n, where in PATTERNS:
        agree.append(np.zeros(n, bool))
        agree[-1][list(where)] = True
    (cautious, ours), (plain, theirs) = _pair(name, kw, params, backend)
    for _ in range(2):
        ones = [np.ones_like(p) for p in params]
        cautious.step(ones)
        plain.step(ones)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        np.testing.assert_array_equal(p, q, err_msg=f"params[{i}] after the agreeing steps")
    before = [p.astype(np.float64) for p in ours]
    grads = [np.where(a, 0.05, -0.05).astype(dtype) for a in agree]
    cautious.step(grads)
    plain.step(grads)
    _assert_same_state(cautious, plain)
    eps = np.finfo(dtype).eps
    for i, (p, q, p0, a, g) in enumerate(zip(ours, theirs, before, agree, grads)):
        moved = q - p0  # the plain step
        # the test's own premise: the plain step goes against the gradient where it agrees
        np.testing.assert_array_equal(moved * g < 0, a, err_msg=f"premise, params[{i}]")
        scale = 1.0 / max(a.mean(), 1e-3) if a.size else 1.0
        big = max(1.0, float(np.abs(p0).max())) if a.size else 1.0
        np.testing.assert_allclose(p - p0, moved * a * scale, rtol=8 * eps,
                                   atol=8 * eps * scale * big, err_msg=f"params[{i}]")
        assert np.all(p[~a] == p0[~a].astype(dtype)), f"params[{i}]: a masked entry moved"


DECOUPLED = [  # weight decay that does not enter the gradient
    pytest.param("AdamW", dict(lr=1e-2, weight_decay=0.1), id="AdamW"),
    pytest.param("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                              maximize=True), id="Adam"),
    pytest.param("ADOPT", dict(lr=1e-2, weight_decay=0.1, decouple=True), id="ADOPT"),
    pytest.param("Lion", dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.5)), id="Lion"),
    pytest.param("AdEMAMix", dict(lr=1e-2, weight_decay=0.1, t_alpha_beta3=5), id="AdEMAMix"),
]


@pytest.mark.parametrize("name,kw", DECOUPLED)
def test_moments_are_stored_unmasked(name, kw):
    """Ten steps of random gradients: the cautious optimizer's state is the plain one's,
    bit for bit, while its parameters went elsewhere."""
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(s).astype(np.float32) for s in ((3,), (17, 5), (1000,))]
    (cautious, ours), (plain, theirs) = _pair(name, kw, params)
    for _ in range(10):
        grads = [(0.5 * p + rng.standard_normal(p.shape)).astype(np.float32) for p in params]
        cautious.step(grads)
        plain.step(grads)
    _assert_same_state(cautious, plain)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert not np.array_equal(p, q), f"params[{i}]: caution changed nothing"


# the first step that moves the parameters (ADOPT's first only sets exp_avg_sq)
FIRST_MOVE = {"ADOPT": 2}


@pytest.mark.parametrize("name,kw,l2", [
    pytest.param("AdamW", dict(lr=1e-2, maximize=True), False, id="AdamW"),
    pytest.param("Adam", dict(lr=1e-2, weight_decay=0.5, maximize=True), True, id="Adam"),
    pytest.param("ADOPT", dict(lr=1e-2, weight_decay=0.5, maximize=True), True, id="ADOPT"),
    pytest.param("Lion", dict(lr=1e-3, maximize=True), False, id="Lion"),
    pytest.param("AdEMAMix", dict(lr=1e-2, maximize=True), False, id="AdEMAMix"),
])
def test_mask_compares_with_the_moments_gradient(name, kw, l2):
    """The mask's gradient is the one the moments average: negated with maximize, plus the
    weight decay where it is L2. From zero state the first moving step agrees everywhere
    with that gradient, so it is the plain step, bit for bit; a mask that compared with the
    raw gradient would keep the first parameter (gradient 0, moved by the decay alone) and
    the second (maximized) from moving."""
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(50), rng.standard_normal(50)]
    grads = [np.zeros(50), rng.standard_normal(50)]
    (cautious, ours), (plain, theirs) = _pair(name, kw, params)
    for _ in range(FIRST_MOVE.get(name, 1)):
        cautious.step(grads)
        plain.step(grads)
    for i, (p, q, p0) in enumerate(zip(ours, theirs, params)):
        if i == 1 or l2:
            assert np.all(q != p0), f"params[{i}]: the plain step did not move it"
        np.testing.assert_array_equal(p, q, err_msg=f"params[{i}]")


@pytest.mark.parametrize("name", RULES)
def test_cautious_is_a_param_group_key(name):
    """One group cautious, one not (either way round against the constructor's default):
    each tensor follows the optimizer of its own group's setting, and the setting matters
    (the cautious tensor leaves the plain trajectory)."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(40), rng.standard_normal((6, 7))
    steps = [[rng.standard_normal(40), rng.standard_normal((6, 7))] for _ in range(6)]
    make = getattr(fastopt, name)
    for default in (False, True):
        mixed = [a.copy(), b.copy()]
        opt = make([{"params": [mixed[0]], "cautious": not default}, {"params": [mixed[1]]}],
                   lr=1e-2, cautious=default)
        assert [g["cautious"] for g in opt.param_groups] == [not default, default]
        assert opt.state_dict()["param_groups"][0]["cautious"] is (not default)
        alone = [a.copy(), b.copy()]
        opts = [make([alone[0]], lr=1e-2, cautious=not default),
                make([alone[1]], lr=1e-2, cautious=default)]
        flipped = [a.copy(), b.copy()]
        other = make([flipped[0]], lr=1e-2, cautious=default)
        for noise in steps:
            grads = [0.5 * x + n for x, n in zip(mixed, noise)]
            opt.step(grads)
            for o, g in zip(opts, grads):
                o.step([g])
            other.step([0.5 * flipped[0] + noise[0]])
        for x, y in zip(mixed, alone):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(flipped[0], mixed[0])


@pytest.mark.parametrize("name", RULES)
def test_torch_classes_take_cautious(name):
    """fastopt.torch's class takes cautious=True (argument and group key) and steps as the
    array API's does, bit for bit."""
    torch = pytest.importorskip("torch")
    ft = pytest.importorskip("fastopt.torch")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 5), (7,))]
    arrays = [p.detach().numpy().copy() for p in params]
    opt = getattr(ft, name)(params, lr=1e-2, cautious=True)
    ref = getattr(fastopt, name)(arrays, lr=1e-2, cautious=True)
    assert opt.param_groups[0]["cautious"] is True
    for _ in range(5):
        grads = [0.5 * p.detach() + torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.numpy() for g in grads])
    for p, x in zip(params, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), x)
    for i, p in enumerate(params):
        for key, value in ref.state[i].items():
            np.testing.assert_array_equal(np.asarray(opt.state[p][key]), value, err_msg=key)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "numpy"])
@pytest.mark.parametrize("options", [dict(state_dtype="int8"), dict(state_dtype="bfloat16"),
                                     dict(master_weights=True, bf16=True),
                                     dict(stochastic_rounding=False, bf16=True)],
                         ids=["int8", "bf16-state", "bf16-master", "bf16-rne"])
def test_storage_formats_and_masks(backend, options):
    """With low-precision parameters or state and pruning masks (the cautious step then runs
    on float32 copies of the arrays), each backend gives the NumPy reference's bits."""
    require_backend(backend)
    import ml_dtypes
    options = dict(options)
    dtype = ml_dtypes.bfloat16 if options.pop("bf16", False) else np.float32
    shapes = [(7,), (5000,), (70000,)]
    keep = [None, np.random.default_rng(1).random(5000) > 0.3, None]
    results = []
    for b in ("numpy", backend):
        rng = np.random.default_rng(3)
        params = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opt = fastopt.AdamW(params, lr=1e-2, cautious=True, backend=b, masks=keep, **options)
        for _ in range(4):
            opt.step([rng.standard_normal(s).astype(dtype) for s in shapes])
        results.append([p.view(np.uint16 if dtype != np.float32 else np.uint32).copy()
                        for p in params])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("caution", [c for rule in _rules.RULES for c in rule.cautious
                                     if rule.name != "AdamW"],  # AdamW's are Adam's
                         ids=lambda c: c.count.name)
def test_numba_counts_in_its_pass(caution, dtype):
    """The Numba backend sums K in the count pass (caution_counts, nothing written), as
    the Cython backend does: the same per-tensor counts, without and with pruning masks,
    on 1 and 2 threads, for a tensor of several chunks, a 0-d one and an empty one."""
    require_backend("numba")
    from cases import RULE_OF, kernel_hyper

    from fastopt._backends import _cython, _numba
    rule = RULE_OF[caution.base]
    scalars = rule.scalars(dtype, **kernel_hyper(caution.base, 3))
    rng = np.random.default_rng(9)
    shapes = [(70001,), (), (0,), (3, 5)]
    def draw(positive=False):
        return [np.asarray(np.abs(x) if positive else x, dtype)  # 0-d arrays, not scalars
                for x in (rng.standard_normal(s) for s in shapes)]
    params, grads = draw(), draw()
    states = [draw(positive=name == "exp_avg_sq") for name in caution.count.state]
    operands = (params, params, grads) + tuple(states)
    record = caution.count.args.record(dtype, scalars)
    want = _cython.caution_counts(caution.count.name, operands, record, 1)
    assert 0 < want[0] < shapes[0][0] and want[2] == 0
    masks = [np.asarray(rng.random(s) > 0.5, np.uint8) for s in shapes]
    kept = _cython.caution_counts(caution.count.name, operands, record, 2, masks)
    assert 0 < kept[0] < want[0]
    for n_threads in (1, 2):
        got = _numba.caution_counts(caution.count.name, operands, record, n_threads)
        np.testing.assert_array_equal(got, want)
        got = _numba.caution_counts(caution.count.name, operands, record, n_threads, masks)
        np.testing.assert_array_equal(got, kept)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", UNDECAYED[:1] + DECOUPLED[1:])
def test_pruned_entries_count_as_disagreeing(name, kw, backend):
    """With pruning masks a pruned entry's K is 0 whatever its gradient: 6 steps with
    random gradients at the pruned entries equal, bit for bit, the steps with those
    gradients zeroed (where u g = 0 makes K 0 by itself), with NaN there, and with
    skip_nonfinite (whose check zeroes them first), on the NumPy reference's bits. The
    premise: counting those gradients (as an unmasked run does) moves the kept entries
    elsewhere."""
    require_backend(backend)
    rng = np.random.default_rng(8)
    shapes = [(300,), (70001,), (6, 7)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    masks = [rng.random(s) > 0.3 for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]

    def run(fill, masked=True, b=backend, **options):
        ps = [p.copy() for p in params]
        opt = getattr(fastopt, name)(ps, backend=b, cautious=True, **kw, **options,
                                     masks=masks if masked else None)
        for step in grads:
            opt.step([g if fill is None else np.where(m, g, np.float32(fill))
                      for g, m in zip(step, masks)])
        return ps

    want = run(0.0, b="numpy")
    for got in (run(None), run(0.0), run(np.nan), run(None, skip_nonfinite=True)):
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    for x, y, m in zip(run(None, masked=False), want, masks):
        assert not np.array_equal(x[m], y[m])


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_scratch_count_path_with_masks(backend):
    """The count path of a backend without caution_counts (CuPy's: K written to scratch
    arrays, pruned entries zeroed, then summed), run here with a CPU backend's kernels:
    with pruning masks, the NumPy reference's bits and the counting path's, state too."""
    import types

    from fastopt._backends import _cython, _numba, _steps
    from fastopt._backends._numpy import optim as reference
    require_backend(backend)
    module = {"cython": _cython, "numba": _numba}[backend]
    scratch_only = types.SimpleNamespace(**{k: getattr(module, k) for k in module.__all__
                                            if k != "caution_counts"})
    rng = np.random.default_rng(1)
    shapes = [(40000,), (), (7,)]
    params = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
    grads = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
    moments = [[np.asarray(rng.standard_normal(s), np.float32) for s in shapes],
               [np.asarray(rng.random(s), np.float32) for s in shapes]]
    masks = [np.asarray(rng.random(s) > 0.4, np.uint8) for s in shapes]
    hyper = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled=True, maximize=False, grad_scale=1.0, grad_clip=float("inf"))
    results = []
    for run in ("reference", "counting", "scratch"):
        p = [x.copy() for x in params]
        m, v = ([x.copy() for x in xs] for xs in moments)
        if run == "reference":
            reference.adam_step(p, p, grads, m, v, None, masks=masks, caution=True, **hyper)
        else:
            scratch = [np.empty_like(x) for x in p]
            _steps.rule_step(module if run == "counting" else scratch_only, _rules.BY_NAME["Adam"],
                             p, p, grads, m, v, None, n_threads=2, masks=masks,
                             caution=lambda s=scratch: s, **hyper)
        results.append(p + m + v)
    for got in results[1:]:
        for x, y in zip(got, results[0]):
            np.testing.assert_array_equal(x, y)
