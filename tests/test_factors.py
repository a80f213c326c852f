"""Adafactor's factors pass on the CPU backends: its work covers every row, band and column
block once, and the way it is split (runs of column blocks per item, threads) leaves the
bits alone. The parity tests hold the default split to the NumPy reference."""

import numpy as np
import pytest
from conftest import require_backend, run_factors

from fastopt import _backends, _rules, _scalars
from fastopt._backends._layout import BAND, COLS, SEGMENT
from fastopt._backends._twopass import factor_work

# several bands with a partial last one, runs of several segments, one band, one row, and a
# slice of exactly one band
SHAPES = np.array([(1, 130, 9000), (2, 70, 1100), (3, 5, 17000), (1, 1, 9), (1, BAND, 600)],
                  np.int64)


def test_factor_work_covers_each_band_and_block_once():
    for segment in (1, 3, SEGMENT):
        bands, blocks, slices = factor_work(SHAPES, segment)
        seen = set()
        for t, b, band, k0, k1 in bands:
            assert 0 < k1 - k0 <= segment
            seen.update((t, b, band, k) for k in range(k0, k1))
        want = {(t, b, band, k) for t, (B, R, C) in enumerate(SHAPES) for b in range(B)
                for band in range(-(-R // BAND)) for k in range(-(-C // COLS))}
        assert seen == want and len(seen) == sum(k1 - k0 for *_, k0, k1 in bands)
        assert {tuple(x) for x in blocks} == {
            (t, b, k) for t, (B, R, C) in enumerate(SHAPES) if R > BAND for b in range(B)
            for k in range(-(-C // COLS))}
        assert [tuple(x) for x in slices] == [(t, b) for t, (B, _, _) in enumerate(SHAPES)
                                              for b in range(B)]


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_does_not_change_the_bits(backend, dtype):
    require_backend(backend)
    module = _backends.load(backend)[0]
    results = [run_factors(module, SHAPES, factor_work(SHAPES, segment), dtype, 3, n_threads)
               for segment, n_threads in ((SEGMENT, 1), (1, 2), (3, 2), (SEGMENT, 2))]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


def test_bad_work_is_refused():
    """The Cython driver checks each item against the shapes before it runs: a run of more
    than SEGMENT blocks (its column partials live on the stack), a column-block item of a
    one-band slice, an empty slice."""
    require_backend("cython")
    module = _backends.load("cython")[0]
    shape = np.array([(1, BAND, 20 * COLS)], np.int64)
    grads = [np.zeros(BAND * 20 * COLS, np.float32)]
    rows, cols, rmeans = [np.ones(BAND, np.float32)], [np.ones(20 * COLS, np.float32)], \
        [np.zeros(1, np.float32)]
    scalars, _ = _scalars.adafactor_scalars(np.dtype(np.float32), step=1, lr=0.01,
                                            beta2_decay=-0.8, eps1=None, weight_decay=0.0,
                                            maximize=False, grad_scale=1.0,
                                            grad_clip=float("inf"))
    record = _rules.ADAFACTOR_ARGS.record(np.dtype(np.float32), scalars)
    bands, blocks, slices = factor_work(shape, SEGMENT + 1)
    with pytest.raises(ValueError, match=r"bands\[0\] is outside the tensors' shapes"):
        module.factors(grads, rows, cols, rmeans, shape, bands, blocks, slices, record, 1)
    bands, _, slices = factor_work(shape)
    with pytest.raises(ValueError, match=r"blocks\[0\] is outside the tensors' shapes"):
        module.factors(grads, rows, cols, rmeans, shape, bands, np.zeros((1, 3), np.int64),
                       slices, record, 1)
    empty = np.array([(1, 3, 0)], np.int64)
    with pytest.raises(ValueError, match=r"shape\[0\]: expected sizes >= 1"):
        module.factors([np.zeros(0, np.float32)], [np.ones(3, np.float32)],
                       [np.ones(0, np.float32)], rmeans, empty, *factor_work(empty), record, 1)
