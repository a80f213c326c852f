"""Index arithmetic past 2**31 elements: how every backend cuts a tensor of N = 2**31 + 10
elements into chunks, checked without allocating its 8 GiB.

- The planners that Python can call run on stand-ins that claim N elements: a read-only
  NumPy view of one element with the shape (N,) and the stride of a contiguous array
  (np.lib.stride_tricks.as_strided; nothing reads through it), or an object with only a
  size and an address. They are the Numba backend's plan (_runtime.data_pointers, then
  _chunks, through _setup), the CuPy backend's launch table (_launch.table) and grid, the
  chunk count of the magnitude select (_select.n_chunks) and the weight-norm work items
  (_slices.items). Each must cover [0, N) exactly once, in order, in int64, with chunk
  offsets past 2**31.
- The Cython plan (kernels/cpu/_plan.pxi, plan_init) is a cdef function with no Python
  entry, so it is checked end to end: the gradient-norm pass and the magnitude select's
  counting pass of the Cython and Numba backends run over N float32 elements of reserved,
  never-written memory (an anonymous private mapping: pages read as zeros and cost nothing
  until written), with a few entries set on both sides of 2**31; each nonzero partial must
  be that of its chunk, and the counts must add up to N (one thread counts them all, past
  its uint32 histograms' range).
"""

import importlib
import math
import mmap
import platform
import sys

import numpy as np
import pytest
from conftest import require_backend

from fastopt._backends import _select, _slices
from fastopt._backends._cupy import _launch
from fastopt._backends._layout import CHUNK

N = 2**31 + 10
INT32_MAX = 2**31 - 1


def stand_in(n, dtype=np.float32):
    """A read-only array that claims n contiguous elements of `dtype` over one element of
    memory: for planners, which read its size, itemsize, flags and address only."""
    one = np.zeros(1, dtype)
    view = np.lib.stride_tricks.as_strided(one, shape=(n,), strides=(one.itemsize,),
                                           writeable=False)
    assert view.flags.c_contiguous and view.size == n
    return view


def assert_covers(rows, sizes, chunk):
    """`rows` (tensor, offset, length), int64, cover [0, size) of each tensor exactly once,
    in order, in pieces of `chunk` elements (the last one shorter)."""
    rows = np.asarray(rows)
    assert rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == 3
    assert len(rows) == sum(-(-s // chunk) for s in sizes)
    t, lo, n = rows.T
    assert np.all(np.diff(t) >= 0), "tensors out of order"
    for k, size in enumerate(sizes):
        mine = t == k
        lo_k, n_k = lo[mine], n[mine]
        if size == 0:
            assert not mine.any()
            continue
        assert lo_k[0] == 0
        assert np.all(lo_k[1:] == lo_k[:-1] + n_k[:-1]), "a gap or an overlap"
        assert np.all(n_k[:-1] == chunk) and 0 < n_k[-1] <= chunk
        assert int(lo_k[-1]) + int(n_k[-1]) == size, "the last chunk does not end at the size"
        if size > 2**31:
            assert int(lo_k.max()) > INT32_MAX, "no offset past 2**31"


def test_numba_plan_of_2_31_plus_10_elements():
    require_backend("numba")
    import numba

    from fastopt._backends._numba import optim
    big = stand_in(N)
    small = [np.zeros(5, np.float32), np.zeros(CHUNK, np.float32)]
    threads = numba.get_num_threads()
    try:
        # the real entry: data_pointers (Cython) reads the sizes, _chunks (Numba) plans
        dtype, ptrs, chunks = optim._setup(([small[0], big, small[1]],
                                            [small[0], big, small[1]]), threads)
    finally:
        numba.set_num_threads(threads)
    assert dtype == np.float32
    assert ptrs.dtype == np.int64 and ptrs.shape == (3, 2)
    assert ptrs[1, 0] == big.__array_interface__["data"][0]
    assert_covers(chunks, [5, N, CHUNK], CHUNK)
    assert chunks[-2, 1] + chunks[-2, 2] == N  # the big tensor's last chunk


def test_data_pointers_count_2_31_plus_10_elements():
    from fastopt._cpu import _runtime
    big = stand_in(N, np.float64)
    ptrs, sizes = _runtime.data_pointers(([big], [big]), 8)
    assert sizes.dtype == np.int64 and sizes.tolist() == [N]
    assert ptrs.tolist() == [[big.__array_interface__["data"][0]] * 2]


class _DeviceArray:
    """What _launch.table reads of a CuPy array: its size and device address."""

    class _Data:
        def __init__(self, ptr):
            self.ptr = ptr

    def __init__(self, size, ptr):
        self.size = size
        self.data = self._Data(ptr)


@pytest.mark.parametrize("chunk", [_launch.BLOCK_CHUNK, CHUNK], ids=["update", "norm"])
def test_cupy_launch_table_of_2_31_plus_10_elements(chunk):
    sizes = [3, N, 0, 7]
    operands = [[_DeviceArray(s, 2**40 + 64 * (4 * t + op)) for t, s in enumerate(sizes)]
                for op in range(2)]
    table, n_chunks = _launch.table(operands, chunk)
    assert table.dtype == np.int64
    n_t = len(sizes)
    assert table[:n_t * 2].tolist() == [2**40 + 64 * (4 * t + op) for t in range(n_t)
                                        for op in range(2)]
    rows = table[n_t * 2:].reshape(-1, 3)
    assert len(rows) == n_chunks
    assert n_chunks <= 2**31 - 1  # one thread block per chunk: CUDA's grid limit
    assert_covers(rows, sizes, chunk)


def test_cupy_grid_stride_of_2_31_plus_10_elements():
    (blocks,) = _launch.grid(N)
    assert 1 <= blocks <= 65536
    # grid-stride loops (quant.cu, random.cu, wnorm.cu) take i in steps of blocks * THREADS
    # from each thread's first index: every index in [0, N) is reached by exactly one thread
    stride = blocks * _launch.THREADS
    assert stride <= N and math.ceil(N / stride) * stride >= N
    assert _launch.grid(1) == (1,) and _launch.grid(_launch.THREADS + 1) == (2,)


def test_select_chunk_count_of_2_31_plus_10_elements():
    assert _select.n_chunks([stand_in(N), stand_in(3)]) == -(-N // CHUNK) + 1


@pytest.mark.parametrize("A, B, C", [(1, 1, N), (1, N, 1), (2, 3, N)])
def test_weight_norm_items_of_2_31_plus_10_elements(A, B, C):
    items = _slices.items(A, B, C)
    assert items.dtype == np.int64
    b0, b1, k = items.T
    K = max(-(-C // CHUNK), 1)
    assert np.all((0 <= k) & (k < K))
    assert np.all((0 <= b0) & (b0 < b1) & (b1 <= B))
    # every (slice, chunk) pair exactly once: for each chunk, the slice ranges tile [0, B)
    order = np.lexsort((b0, k))
    k, b0, b1 = k[order], b0[order], b1[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    assert np.array_equal(k[starts], np.arange(K))
    ends = np.r_[starts[1:], len(k)] - 1
    assert np.all(b0[starts] == 0) and np.all(b1[ends] == B)
    inner = np.ones(len(k), bool)
    inner[ends] = False
    assert np.all(b1[inner] == b0[np.flatnonzero(inner) + 1])
    if C > 2**31:
        assert (K - 1) * CHUNK > INT32_MAX  # the last chunk's first column
    if B > 2**31:
        assert int(b0.max()) > INT32_MAX


# -- end to end: the Cython plan, through the norm pass --------------------------------

def _reserve(n, dtype):
    """n elements of `dtype` in an anonymous private mapping, not committed (Linux
    MAP_NORESERVE): untouched pages read as zeros from the shared zero page; huge pages
    where the kernel allows (512x fewer faults to read it all)."""
    noreserve = getattr(mmap, "MAP_NORESERVE", 0)
    if not noreserve and sys.platform == "linux" \
            and platform.machine() in ("x86_64", "aarch64", "riscv64", "s390x"):
        noreserve = 0x4000  # <asm-generic/mman.h>; Python's mmap names it from 3.13
    nbytes = n * np.dtype(dtype).itemsize
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"cannot reserve {nbytes >> 20} MiB of address space here: {exc}")
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages: 4 KiB faults, slower
        pass
    return np.frombuffer(buf, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_norm_pass_reads_each_chunk_of_2_31_plus_10_elements(backend):
    """The Cython plan_init/plan_run and the Numba plan, run: each chunk's partial sum of
    squares must come from its own elements, on both sides of 2**31 and at the very end."""
    require_backend(backend)
    from fastopt import _backends
    a = _reserve(N, np.float32)
    marks = {0: 1.0, INT32_MAX: 2.0, 2**31: 3.0, 2**31 + 5: 4.0, N - 1: 5.0,
             (N // CHUNK - 1) * CHUNK + 3: 6.0}
    for i, v in marks.items():
        a[i] = v
    partials = _backends.resolve("norm_partials", backend, "cpu", np.float32)(
        [a], 2, n_threads=2)
    expected = np.zeros(-(-N // CHUNK))
    for i, v in marks.items():
        expected[i // CHUNK] += v * v
    assert partials.shape == expected.shape
    np.testing.assert_array_equal(np.flatnonzero(partials), np.flatnonzero(expected))
    np.testing.assert_array_equal(partials, expected)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_magnitude_select_counts_2_31_plus_10_elements(backend):
    """fastopt.prune's first counting pass over N elements on one thread: every element
    counted once, in the bin of its key's top 16 bits (float32: sign cleared)."""
    require_backend(backend)
    compress = importlib.import_module(f"fastopt._backends._{backend}.compress")
    a = _reserve(N, np.float32)
    marks = {0: 1.0, INT32_MAX: 2.0, 2**31: 3.0, 2**31 + 5: -4.0, N - 1: 5.0}
    for i, v in marks.items():
        a[i] = v
    counts, maxkey = compress.prune_hist([a], 16, 0, 0, 1)
    keys = np.array(list(marks.values()), np.float32).view(np.uint32) & 0x7FFFFFFF
    expected = np.zeros(2**16, np.int64)
    np.add.at(expected, keys >> 16, 1)
    expected[0] += N - len(marks)
    assert int(np.sum(counts)) == N
    np.testing.assert_array_equal(counts, expected)
    assert maxkey == int(keys.max())
