"""The comparison harness: ``python -m fastopt.bench``.

One run, one table: for each rule and problem size, the median time of one optimizer step,
its bandwidth (the rule's nominal traffic: each element's reads and writes, divided by the
time) and its percent of this machine's streaming limit for that same access pattern,
measured by a C kernel shipped with fastopt (kernels/cpu/stream.h). Side by side: every
available fastopt backend, fastopt driven with torch tensors, torch.optim's for-loop,
foreach and fused implementations, and the NumPy reference.

Optimizer steps are memory-bound, so "% of limit" is the figure of merit: 100% means the
step moves its data as fast as the machine can stream it.

The implementations of one case are timed in interleaved rounds (each round calls each once),
not one after the other: on a shared machine the available bandwidth drifts over seconds, and
back-to-back blocks of timings then differ by more than the implementations do.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np

import fastopt
from fastopt import _backends, _rules
from fastopt._interop import aligned_empty
from fastopt.bench import ops


class Rule(NamedTuple):
    """A benchmarked rule: the optimizer class name in fastopt, its hyperparameters, its
    state buffers per element, fastopt's max_grad_norm (torch: its clip_grad_norm_ before
    the step), the element transfers of one fastopt step when it is not one pass (reads +
    writes per element, every pass counted), whether the tensors are shaped as matrices
    (Adafactor factors them; 1-D tensors it does not), and torch.optim's class of the same
    rule (None: torch has none)."""
    cls: str
    hyper: dict
    n_state: int
    clip: float = None
    passes_traffic: int = None
    matrix: bool = False
    torch: str = None

    @property
    def traffic(self):
        # one pass: g read (twice with clipping: norm pass, update pass), p and state
        # read and written
        if self.passes_traffic is not None:
            return self.passes_traffic
        return 2 * (self.n_state + 1) + 1 + (self.clip is not None)


def _state_arrays(row):
    """How many state arrays the rule keeps per parameter with the harness's
    hyperparameters, counted after one step of the reference."""
    p = np.zeros((2, 2) if row.matrix else 2, np.float32)
    opt = getattr(fastopt, row.name)([p], backend="numpy", **row.bench)
    opt.step([np.ones_like(p)])
    return sum(isinstance(v, np.ndarray) for v in opt.state[0].values())


def _table_rules():
    """The harness's rules, from the rule table (fastopt._rules), plus Adam with
    max_grad_norm ('adam+clip')."""
    rules = {}
    for row in _rules.RULES:
        torch_cls = row.reference.rsplit(".", 1)[1] \
            if row.reference.startswith("torch.optim.") else None
        rules[row.name.lower()] = Rule(row.name, row.bench, _state_arrays(row),
                                       passes_traffic=row.traffic, matrix=row.matrix,
                                       torch=torch_cls)
    rules["adam+clip"] = rules["adam"]._replace(clip=1.0)
    return rules


RULES = _table_rules()
DEFAULT_RULES = ("adam", "adamw", "sgd", "adam+clip")
DEFAULT_CASES = ("1M", "10M", "50M", "200x50K")
_EVICT_BYTES = 64 << 20  # twice this machine's 32 MiB L3; more than most servers' per-socket L3


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
    evict = np.ones(_EVICT_BYTES // 8)
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


@functools.lru_cache(maxsize=8)
def _draw(n, seed):
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def _arrays(sizes, dtype, seed, matrix=False):
    """New arrays of the given sizes holding standard normal values (one draw, copied);
    with `matrix`, shaped (n / MATRIX_COLS, MATRIX_COLS) (see matrix_sizes)."""
    base = _draw(max(sizes, default=0), seed)
    return [base[:n].astype(dtype).reshape((n // MATRIX_COLS, MATRIX_COLS) if matrix else n)
            for n in sizes]


MATRIX_COLS = 1024


def matrix_sizes(sizes):
    """Sizes rounded down to whole rows of MATRIX_COLS (at least one row), for rules that
    treat 2-D parameters differently (Adafactor): the layers of a network are matrices."""
    return [max(MATRIX_COLS, n - n % MATRIX_COLS) for n in sizes]


def _stream_case(sizes, n_state, n_threads):
    """The streaming kernel with an optimizer's access pattern: the gradient read, the param
    and n_state buffers read and written in place."""
    from fastopt._cpu import _stream

    def aligned(arrays):  # the ceiling is measured at its best: 64-byte-aligned buffers
        out = [aligned_empty(a.shape, a.dtype) for a in arrays]
        for o, a in zip(out, arrays):
            o[...] = a
        return out
    src = aligned(_arrays(sizes, np.float32, 0))
    rw = [aligned(_arrays(sizes, np.float32, k + 1)) for k in range(n_state + 1)]
    return lambda: _stream.stream_rw(src, rw, False, n_threads)


def _fastopt_case(rule, sizes, backend, n_threads, wrap=None):
    params = _arrays(sizes, np.float32, 1, rule.matrix)
    grads = _arrays(sizes, np.float32, 2, rule.matrix)
    if wrap is not None:
        params, grads = [wrap(p) for p in params], [wrap(g) for g in grads]
    opt = getattr(fastopt, rule.cls)(params, backend=backend, n_threads=n_threads,
                                     max_grad_norm=rule.clip, **rule.hyper)
    return lambda: opt.step(grads)


def _torch_case(torch, rule, sizes, mode):
    params = [torch.from_numpy(p) for p in _arrays(sizes, np.float32, 1, rule.matrix)]
    for p, g in zip(params, _arrays(sizes, np.float32, 2, rule.matrix)):
        p.grad = torch.from_numpy(g)
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True)}[mode]
    opt = getattr(torch.optim, rule.torch)(params, **rule.hyper, **flags)
    if rule.clip is None:
        return opt.step

    def clip_and_step():
        # the usual torch recipe; it scales the gradients in place (they stay finite here)
        torch.nn.utils.clip_grad_norm_(params, rule.clip, foreach=mode != "for-loop")
        opt.step()
    return clip_and_step


def implementations(rule, sizes, n_threads, include_numpy):
    """(name, factory) pairs; a factory builds the arrays and returns the step to time."""
    impls = []
    for backend in ("cython", "numba"):
        if _backends.available(backend):
            impls.append((f"fastopt {backend}",
                          lambda b=backend: _fastopt_case(rule, sizes, b, n_threads)))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(n_threads)
        impls.append(("fastopt cython, torch tensors",
                      lambda: _fastopt_case(rule, sizes, "cython", n_threads,
                                            wrap=torch.from_numpy)))
        for mode in ("for-loop", "foreach", "fused") if rule.torch is not None else ():
            impls.append((f"torch {mode}", lambda m=mode: _torch_case(torch, rule, sizes, m)))
    if include_numpy:
        impls.append(("numpy reference",
                      lambda: _fastopt_case(rule, sizes, "numpy", n_threads)))
    return impls


def run(rules=DEFAULT_RULES, cases=DEFAULT_CASES, n_threads=None, numpy_max=10**7,
        budget=1.0, out=None):
    """Measure everything; print the table to `out` (stdout) as it goes; return the results."""
    out = out or sys.stdout
    n_threads = n_threads or fastopt.get_num_threads()
    rows = []
    header = (f"{'rule':<6} {'case':<9} {'implementation':<30} {'median ms':>10} {'GB/s':>7} "
              f"{'% limit':>8}")
    print(f"fastopt {fastopt.__version__}: one optimizer step, float32, {n_threads} threads; "
          f"GB/s counts each element's nominal reads and writes", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for case in cases:
        for rule in rules:
            spec = RULES[rule]
            sizes = parse_case(case)
            sizes = matrix_sizes(sizes) if spec.matrix else sizes
            n = sum(sizes)
            nbytes = n * 4 * spec.traffic
            names = ["stream limit (C kernel)"]
            steps = [_stream_case(sizes, spec.n_state, n_threads)]
            for name, factory in implementations(spec, sizes, n_threads, n <= numpy_max):
                try:
                    steps.append(factory())
                    names.append(name)
                except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
                    # torch has no such rule (Lion), or no fused/foreach form of it
                    print(f"{rule:<6} {case:<9} {name:<30} skipped: {exc}", file=out)
            medians = time_interleaved(steps, budget=budget)
            del steps
            _draw.cache_clear()
            # the ceiling: the streaming kernel's bandwidth for the rule's traffic (with
            # clipping or several passes, more than the kernel itself moves)
            limit = medians[0] * nbytes / (n * 4 * (2 * (spec.n_state + 1) + 1))
            for name, seconds in zip(names, [limit] + medians[1:]):
                row = dict(rule=rule, case=case, tensors=len(sizes), elements=n,
                           implementation=name, median_ms=seconds * 1e3,
                           gbps=nbytes / seconds / 1e9, pct_limit=100 * limit / seconds)
                rows.append(row)
                print(f"{rule:<6} {case:<9} {name:<30} {row['median_ms']:>10.2f} "
                      f"{row['gbps']:>7.1f} {row['pct_limit']:>7.0f}%", file=out, flush=True)
    return {
        "fastopt": fastopt.__version__,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "threads": n_threads, "cpu_count": os.cpu_count()},
        "dtype": "float32",
        "rows": rows,
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastopt.bench",
        description="Time fastopt's optimizer steps against torch.optim and NumPy, as a "
                    "percentage of this machine's streaming bandwidth.")
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES),
                        help=f"comma-separated rules from {', '.join(RULES)}, or 'all' "
                             f"(default: {','.join(DEFAULT_RULES)})")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma-separated sizes: 10M is one tensor, 200x50K is 200 tensors "
                             f"averaging 50K (default: {','.join(DEFAULT_CASES)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: fastopt.get_num_threads())")
    parser.add_argument("--numpy-max", type=float, default=1e7,
                        help="largest case (elements) the slow NumPy reference runs on")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timing rounds per rule and case (at least 3 rounds)")
    parser.add_argument("--ops", default="",
                        help="also time these operations beside torch: comma-separated from "
                             f"{', '.join(list(ops.GROUPS) + list(ops.OPS))}, or 'all' "
                             "(default: none)")
    parser.add_argument("--op-cases", default="",
                        help="weights for --ops: RxC matrices or element counts (rows of "
                             f"{MATRIX_COLS}) (default: each op's own, such as 4096x4096,50M "
                             "for the initializers and 4096x32000 for kd_loss)")
    parser.add_argument("--json", default="bench-results.json",
                        help="where to write the results as JSON ('' for nowhere)")
    args = parser.parse_args(argv)
    rules = [r.strip().lower() for r in args.rules.split(",") if r.strip()]
    rules = list(RULES) if rules == ["all"] else [] if rules == ["none"] else rules
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        parser.error(f"unknown rule(s) {unknown}; choose from {list(RULES)}, all, none")
    names = [o.strip().lower() for o in args.ops.split(",") if o.strip()]
    names = list(ops.OPS) if names == ["all"] else [
        n for name in names for n in ops.GROUPS.get(name, (name,))]
    unknown = [o for o in names if o not in ops.OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from "
                     f"{list(ops.GROUPS) + list(ops.OPS)}, all")
    result = run(rules, [c.strip() for c in args.cases.split(",") if c.strip()],
                 args.threads, int(args.numpy_max), args.budget)
    if names:
        print("\noperations, float32, one weight each; GB/s counts fastopt's transfers")
        result["rows"] += ops.run_ops(names, [c.strip() for c in args.op_cases.split(",")
                                              if c.strip()],
                                      args.threads or fastopt.get_num_threads(), args.budget,
                                      sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {args.json}")
    return 0
