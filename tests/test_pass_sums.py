"""A pass that sums its operands while each chunk is in cache (a backend's pass_sums, which
Lamb's, Adafactor's and Prodigy's drivers use) leaves the arrays as the pass alone does and
gives the partials of norm_partials run after it, bit for bit: its sums are the ones every
other backend computes in passes of their own."""

import numpy as np
import pytest
from cases import kernel_hyper
from conftest import require_backend

from fastopt import _backends, _rules

SIZES = [5, 16384, 40000, 0, 100003]
# kernel, rule (of a pass kernel), the (operand, kind) pairs its driver sums, and more
CASES = [
    ("prodigy_update", None, ((1, 3), (3, 1))),
    ("prodigy_update_nom", None, ((1, 3), (3, 1), (0, 2), (4, 0))),
    ("lamb_update", None, ((0, 2), (1, 2))),
    ("adafactor_vector", "Adafactor", ((0, 2), (1, 2), (3, 3))),
]


def _operands(kernel, dtype, seed):
    rng = np.random.default_rng(seed)

    def arrays(positive=False):
        xs = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        return [np.abs(x) for x in xs] if positive else xs
    state = [arrays(positive=name in ("exp_avg_sq", "variance"))
             for name in _rules.ALL_KERNELS[kernel].state]
    return (arrays(), arrays(), arrays()) + tuple(state)


def _record(kernel, rule, dtype):
    table_rule = _rules.BY_NAME[rule] if rule else next(
        r for r in _rules.RULES if any(k.name == kernel for k in r.kernels))
    hyper = kernel_hyper(kernel, 3, table_rule)
    if kernel.startswith("prodigy"):
        hyper = dict(hyper, d=2e-6, dlr=2e-6, d_next=3e-6)
    scalars = table_rule.scalars(dtype, **hyper)
    return _rules.ALL_KERNELS[kernel].args.record(dtype, scalars[0])


# Numba zeroes pruned entries after its passes, so the drivers never hand it masks
@pytest.mark.parametrize("backend,masked", [("cython", False), ("cython", True),
                                            ("numba", False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("discard", [False, True])
@pytest.mark.parametrize("kernel,rule,sums", CASES, ids=[c[0] for c in CASES])
def test_sums_in_the_pass_are_the_sums_after_it(backend, masked, dtype, n_threads, discard,
                                               kernel, rule, sums):
    require_backend(backend)
    module = _backends.load(backend)[0]
    record = _record(kernel, rule, dtype)
    rng = np.random.default_rng(1)
    masks = [(rng.random(n) < 0.7).astype(np.uint8) for n in SIZES] if masked else None
    fused, alone = _operands(kernel, dtype, 0), _operands(kernel, dtype, 0)
    written = [x.copy() for x in fused[1]]
    partials = module.pass_sums(kernel, fused, record, n_threads, sums, masks=masks,
                                discard=discard)
    module.elementwise(kernel, alone, record, n_threads, masks=masks)
    expected = np.stack([module.norm_partials(alone[op], kind, n_threads=n_threads)
                         for op, kind in sums], axis=1)
    assert partials.shape == expected.shape
    np.testing.assert_array_equal(partials.view(np.int64), expected.view(np.int64))
    for op, (a, b) in enumerate(zip(fused, alone)):
        if op == 1 and discard:  # scratch, not stored; the Cython driver does not touch it
            if backend == "cython":
                for x, before in zip(a, written):
                    np.testing.assert_array_equal(x, before)
            continue
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def test_bad_sums_are_refused():
    from fastopt._cpu import _optim
    ops = _operands("lamb_update", np.float32, 0)
    record = _record("lamb_update", None, np.float32)
    for sums in [(), ((0, 2),) * 5, ((5, 2),), ((0, 4),), ((-1, 2),)]:
        with pytest.raises(ValueError, match="sums"):
            _optim.step_sums("lamb_update", ops, False, record, 1, sums)
    with pytest.raises(ValueError, match="discard"):  # auxiliaries may be indexed by lo
        _optim.step_sums("lamb_update", ops, False, record, 1, ((0, 2),), discard=True,
                         n_aux=1)
