"""What the harness's optimizer rows and its other operations' rows share: the cases'
sizes, their arrays, the streaming kernel's step, and how a set of implementations is
timed."""

import functools
import statistics
import time

import numpy as np

from fastopt._interop import aligned_empty

EVICT_BYTES = 64 << 20  # twice this machine's 32 MiB L3; more than most servers' per-socket L3


def parse_case(text):
    """'10M' -> [10_000_000]; '200x50K' -> 200 tensors totalling 10M, of uneven sizes."""
    def number(s):
        scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1:].upper(), 1)
        return int(float(s[:-1] if scale > 1 else s) * scale)
    if "x" in text:
        count, each = text.split("x")
        count, each = int(count), number(each)
        # sizes from 0.5x to 1.5x the mean (like the layers of a network), same total
        sizes = np.linspace(0.5, 1.5, count) * each
        sizes = np.floor(sizes).astype(np.int64)
        sizes[-1] += count * each - sizes.sum()
        return [int(s) for s in sizes]
    return [number(text)]


def time_interleaved(fns, min_rounds=3, max_rounds=40, budget=1.0, pause=0.005, slice_s=0.03):
    """Median seconds of each function, timed in interleaved rounds.

    Each round calls every function, a fast one several times in a row (about `slice_s`
    seconds' worth), so fast and slow implementations alike get many samples from the same
    stretch of time. Before every call a buffer twice the size of the last-level cache is
    rewritten, so each call starts cold, as an optimizer step does after a backward pass.
    Each round starts one function later than the last, so none always runs right after
    the same neighbour, and each function's turn waits `pause` seconds first:
    OpenMP worker threads (torch and fastopt each bring a runtime) spin for a while after a
    parallel region, and a call made during that spin shares the cores with them.
    """
    evict = np.ones(EVICT_BYTES // 8)
    repeats = []
    for fn in fns:
        fn()  # warm-up: first touch, compilation, state allocation
        t0 = time.perf_counter()
        fn()
        repeats.append(max(1, min(20, int(slice_s / (time.perf_counter() - t0)))))
    times = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget):
        for k in range(len(fns)):
            index = (rounds + k) % len(fns)
            time.sleep(pause)
            for _ in range(repeats[index]):
                evict += 1.0
                t0 = time.perf_counter()
                fns[index]()
                times[index].append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(record) for record in times]


MATRIX_COLS = 1024


def matrix_sizes(sizes):
    """Sizes rounded down to whole rows of MATRIX_COLS (at least one row), for rules that
    treat 2-D parameters differently (Adafactor): the layers of a network are matrices."""
    return [max(MATRIX_COLS, n - n % MATRIX_COLS) for n in sizes]


@functools.lru_cache(maxsize=8)
def draw(n, seed):
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def arrays(sizes, dtype, seed, matrix=False):
    """New arrays of the given sizes holding standard normal values (one draw, copied);
    with `matrix`, shaped (n / MATRIX_COLS, MATRIX_COLS) (see matrix_sizes)."""
    base = draw(max(sizes, default=0), seed)
    return [base[:n].astype(dtype).reshape((n // MATRIX_COLS, MATRIX_COLS) if matrix else n)
            for n in sizes]


def stream_case(sizes, n_state, n_threads):
    """The streaming kernel with an optimizer's access pattern: the gradient read, the param
    and n_state buffers read and written in place."""
    from fastopt._cpu import _stream

    def aligned(values):  # the ceiling is measured at its best: 64-byte-aligned buffers
        out = [aligned_empty(a.shape, a.dtype) for a in values]
        for o, a in zip(out, values):
            o[...] = a
        return out
    src = aligned(arrays(sizes, np.float32, 0))
    rw = [aligned(arrays(sizes, np.float32, k + 1)) for k in range(n_state + 1)]
    return lambda: _stream.stream_rw(src, rw, False, n_threads)


def case_rows(rule, case, spec, sizes, names, medians):
    """The table's rows of one rule and case: `medians` of the implementations `names`, the
    first of them the streaming kernel, whose bandwidth for the rule's traffic (with clipping
    or several passes, more than the kernel itself moves) is the ceiling: its row is that
    limit, and every row's percent is of it."""
    n = sum(sizes)
    nbytes = n * 4 * spec.traffic
    limit = medians[0] * nbytes / (n * 4 * (2 * (spec.n_state + 1) + 1))
    return [dict(rule=rule, case=case, tensors=len(sizes), elements=n, implementation=name,
                 median_ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                 pct_limit=100 * limit / seconds)
            for name, seconds in zip(names, [limit] + list(medians[1:]))]


def row_line(row):
    """A row as the table prints it."""
    return (f"{row['rule']:<6} {row['case']:<9} {row['implementation']:<30} "
            f"{row['median_ms']:>10.2f} {row['gbps']:>7.1f} {row['pct_limit']:>7.0f}%")
