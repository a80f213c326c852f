"""The comparison harness: ``python -m fastopt.bench``.

One run, one table: for each rule and problem size, the median time of one optimizer step,
its bandwidth (the rule's nominal traffic: each element's reads and writes, divided by the
time) and its percent of this machine's streaming limit for that same access pattern,
measured by a C kernel shipped with fastopt (kernels/cpu/stream.h). Side by side: every
available fastopt backend, fastopt driven with torch tensors, torch.optim's for-loop,
foreach and fused implementations and the NumPy reference; then, in a process of their own,
fastopt.jax's fused step and update beside optax's rule (jitted, parameters and state
donated).

Optimizer steps are memory-bound, so "% of limit" is the figure of merit: 100% means the
step moves its data as fast as the machine can stream it.

The implementations of one case are timed in interleaved rounds (each round calls each once),
not one after the other: on a shared machine the available bandwidth drifts over seconds, and
back-to-back blocks of timings then differ by more than the implementations do.

All of them run in one process, so what one leaves behind must not reach the others' rows:
Numba's OpenMP threading layer turns nested parallelism on in the OpenMP runtime that torch
shares here, which made torch's for-loop and foreach Adam 20-40x slower than for a user of
torch alone; the Numba backend turns it back off when it loads (for users as for the
harness: fastopt._config.keep_openmp_unnested), and the harness frees a 16 MiB
block first, so that malloc serves torch's per-op temporaries from its heap as in any
training loop, not from fresh pages (_warm_allocator). And it checks: one
torch.optim row is timed again against the same step alone in a fresh process, in turns,
and a disagreement beyond 1.5x prints a WARNING line and sets 'agree' false under
'fresh_process_check' in the JSON (--no-check skips it). The check is why the JAX rows run in
a process of their own (fastopt.bench.jaxrows): fastopt's kernel inside jax.jit starts an
OpenMP team on one of XLA's threads, and from then on the OpenMP runtime counts more threads
than cores and stops spinning, so every later parallel region of torch's pays a wake-up
(torch's for-loop Adam on 4 tensors of 100K, 2 threads: 0.43 ms -> 1.02 ms).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import fastopt
from fastopt import _backends, _config
from fastopt.bench import _timing, formats, jaxrows, muon, ops, training
from fastopt.bench._table import RULES
from fastopt.bench._timing import (
    MATRIX_COLS,
    arrays,
    case_rows,
    draw,
    matrix_sizes,
    parse_case,
    row_line,
    stream_case,
    time_interleaved,
)

DEFAULT_RULES = ("adam", "adamw", "sgd", "adam+clip")
DEFAULT_CASES = ("1M", "10M", "50M", "200x50K")


def _fastopt_case(rule, sizes, backend, n_threads, wrap=None):
    params = arrays(sizes, np.float32, 1, rule.matrix)
    grads = arrays(sizes, np.float32, 2, rule.matrix)
    if wrap is not None:
        params, grads = [wrap(p) for p in params], [wrap(g) for g in grads]
    opt = getattr(fastopt, rule.cls)(params, backend=backend, n_threads=n_threads,
                                     max_grad_norm=rule.clip, **rule.hyper)
    if not rule.alternate:
        return lambda: opt.step(grads)
    inputs = [grads, [-g for g in grads]]

    def alternating():
        opt.step(inputs[0])
        inputs.reverse()
    return alternating


def _torch_case(torch, rule, sizes, mode):
    params = [torch.from_numpy(p) for p in arrays(sizes, np.float32, 1, rule.matrix)]
    for p, g in zip(params, arrays(sizes, np.float32, 2, rule.matrix)):
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


_WARM_BYTES = 16 << 20


def _warm_allocator():
    """Allocate and free one 16 MiB block, as a training loop frees its activations.

    glibc's malloc maps fresh pages for each block above its mmap threshold (128 KiB at
    first) and raises the threshold to the largest such block freed so far (up to 32 MiB).
    Until a process has freed one, the temporaries of torch.optim's for-loop step (one per
    op and tensor, 100-600 KiB here) each cost a round of page faults: 2x the time of the
    step on 4 tensors of 100K, in some fresh processes and not others. After this, every
    process times the step as a training loop runs it."""
    np.ones(_WARM_BYTES // 8)


FRESH_TOLERANCE = 1.5  # the fresh-process check: harness / fresh within [1/this, this]

# One torch.optim step in a new process that imports only NumPy and torch, on the harness's
# tensors, its allocator warmed like the harness's: after "ready", each line N on stdin times
# N steps with time_interleaved's protocol (a pause, then N calls, each on a cold cache) and
# answers their seconds as a JSON list; 0 ends.
_FRESH_STEP = r"""
import json, sys, time
import numpy as np
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
np.ones(a["warm_bytes"] // 8)  # malloc as after a training loop's first step (_warm_allocator)
def tensors(seed):
    base = np.random.default_rng(seed).standard_normal(max(a["sizes"]), dtype=np.float32)
    return [torch.from_numpy(base[:n].copy().reshape((n // a["cols"], a["cols"])
                                                      if a["cols"] else n))
            for n in a["sizes"]]
params = tensors(1)
for p, g in zip(params, tensors(2)):
    p.grad = g
opt = getattr(torch.optim, a["cls"])(params, **a["hyper"], **a["flags"])
def step():
    if a["clip"] is not None:
        torch.nn.utils.clip_grad_norm_(params, a["clip"], foreach=a["foreach_clip"])
    opt.step()
evict = np.ones(a["evict_bytes"] // 8)
step()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    time.sleep(a["pause"])
    for _ in range(int(line)):
        evict += 1.0
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if not times:
        break
    print(json.dumps(times), flush=True)
"""


def time_against_fresh(step, rule, sizes, mode, n_threads, budget=1.0, min_calls=20,
                       max_rounds=100, pause=0.005, slice_s=0.03, max_calls=5, max_s=30,
                       timeout=300):
    """Seconds of each call of `step` (torch.optim's `mode` step of `rule` on `sizes`,
    built in this process) and of the same step in a fresh Python process (see
    _FRESH_STEP): two lists, timed in interleaved rounds like time_interleaved, so the two
    never run at once and a drift in the machine's load reaches both alike. Rounds go on
    for `budget` seconds and until each side has `min_calls` calls (or `max_s` passed)."""
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True)}[mode]
    args = dict(threads=n_threads, sizes=list(sizes), cols=MATRIX_COLS if rule.matrix else 0,
                cls=rule.torch, hyper=rule.hyper, flags=flags, clip=rule.clip,
                foreach_clip=mode != "for-loop", evict_bytes=_timing.EVICT_BYTES, pause=pause,
                warm_bytes=_WARM_BYTES)
    evict = np.ones(_timing.EVICT_BYTES // 8)
    step()
    fastest = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - t0)
    calls = max(1, min(max_calls, int(slice_s / fastest)))  # calls per turn
    here, fresh = [], []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", _FRESH_STEP, json.dumps(args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        watchdog = threading.Timer(timeout, proc.kill)  # a hung child ends the check
        watchdog.start()
        try:
            def ask(line):
                proc.stdin.write(line)
                proc.stdin.flush()
                answer = proc.stdout.readline()
                if not answer:
                    err.seek(0)
                    raise RuntimeError(f"the fresh process failed: {err.read()[-2000:]}")
                return answer
            ask("")  # wait for "ready"
            start = time.perf_counter()
            rounds = 0
            while True:
                elapsed = time.perf_counter() - start
                if not ((len(here) < min_calls and elapsed < max_s)
                        or (rounds < max_rounds and elapsed < budget)):
                    break
                for side in (0, 1) if rounds % 2 == 0 else (1, 0):
                    if side == 1:
                        fresh += json.loads(ask(f"{calls}\n"))
                        continue
                    time.sleep(pause)
                    for _ in range(calls):
                        evict += 1.0
                        t0 = time.perf_counter()
                        step()
                        here.append(time.perf_counter() - t0)
                rounds += 1
            proc.stdin.write("0\n")
            proc.stdin.flush()
            proc.wait(timeout)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return here, fresh


def _check_target(rules, cases):
    """(rule, case) of the fresh-process check: the case with the most tensors (a step of
    many small tensors is the most sensitive to thread-pool trouble) and the first rule
    that torch.optim has; None if none has."""
    with_torch = [r for r in rules if RULES[r].torch is not None]
    if not with_torch or not cases:
        return None
    case = max(cases, key=lambda c: len(parse_case(c)))  # first of the most
    return with_torch[0], case


def _fresh_check(rule, case, spec, sizes, n_threads, budget, step, row_s, out):
    """Time the harness's 'torch for-loop' step against the same step alone in a fresh
    process (time_against_fresh) and compare the fastest call of each: load from other
    processes only ever adds time (on a busy machine a step of many small parallel regions
    varies 20x from call to call), so the fastest call is each process's own cost. A
    disagreement is measured once more before it is reported."""
    mode = "for-loop"
    for _ in range(2):
        here, fresh = time_against_fresh(step, spec, sizes, mode, n_threads, budget)
        ratio = min(here) / min(fresh)
        agree = 1 / FRESH_TOLERANCE <= ratio <= FRESH_TOLERANCE
        if agree:
            break
    result = dict(rule=rule, case=case, implementation=f"torch {mode}", row_ms=row_s * 1e3,
                  harness_ms=min(here) * 1e3, fresh_ms=min(fresh) * 1e3,
                  harness_median_ms=statistics.median(here) * 1e3,
                  fresh_median_ms=statistics.median(fresh) * 1e3, calls=len(here),
                  ratio=ratio, tolerance=FRESH_TOLERANCE, agree=agree)
    timing = (f"torch {mode} {rule} {case} takes {result['harness_ms']:.2f} ms here "
              f"{'and' if agree else 'but'} {result['fresh_ms']:.2f} ms alone in a fresh "
              f"process (fastest of {len(here)} calls each, in turns: {ratio:.2f}x")
    if agree:
        print(f"check: {timing}, within {FRESH_TOLERANCE}x)", file=out, flush=True)
    else:
        print(f"WARNING: {timing}, beyond {FRESH_TOLERANCE}x): this process's rows are not "
              f"what a user would see", file=out, flush=True)
    # the row's own median against the medians of the same step a moment later: a gap
    # that the fresh process shares is the machine's load changing, not this process
    drift = row_s / statistics.median(here)
    result["row_drift"] = drift
    if not 1 / FRESH_TOLERANCE <= drift <= FRESH_TOLERANCE:
        print(f"note: the torch {mode} {rule} {case} row's median, {result['row_ms']:.2f} ms, "
              f"is {drift:.2f}x its median while checked ({result['harness_median_ms']:.2f} ms "
              f"here, {result['fresh_median_ms']:.2f} ms fresh): the machine's load changed "
              f"during the run", file=out, flush=True)
    return result


def run(rules=DEFAULT_RULES, cases=DEFAULT_CASES, n_threads=None, numpy_max=10**7,
        budget=1.0, out=None, check=True, jax=True):
    """Measure everything; print the table to `out` (stdout) as it goes; return the results.

    With `check`, one torch row (see _check_target) is timed again against the same step
    alone in a fresh process (_fresh_check); the result goes into the output under
    'fresh_process_check' (None: nothing checked), and a disagreement beyond
    FRESH_TOLERANCE prints a WARNING line. With `jax` (and jax and optax installed), the
    JAX rows follow, timed in a process of their own (fastopt.bench.jaxrows)."""
    out = out or sys.stdout
    n_threads = n_threads or fastopt.get_num_threads()
    _backends.available("numba")  # loading it keeps OpenMP unnested (fastopt._config)
    _warm_allocator()
    check_at = _check_target(rules, cases) if check else None
    fresh_check = None
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
            names = ["stream limit (C kernel)"]
            steps = [stream_case(sizes, spec.n_state, n_threads)]
            for name, factory in implementations(spec, sizes, n_threads, n <= numpy_max):
                try:
                    steps.append(factory())
                    names.append(name)
                except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
                    # torch has no such rule (Lion), or no fused/foreach form of it
                    print(f"{rule:<6} {case:<9} {name:<30} skipped: {exc}", file=out)
            medians = time_interleaved(steps, budget=budget)
            draw.cache_clear()
            for row in case_rows(rule, case, spec, sizes, names, medians):
                rows.append(row)
                print(row_line(row), file=out, flush=True)
            if (rule, case) == check_at and "torch for-loop" in names:
                # checked while the step still exists, right after its rows were timed
                at = names.index("torch for-loop")
                try:
                    fresh_check = _fresh_check(rule, case, spec, sizes, n_threads, budget,
                                               steps[at], medians[at], out)
                except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                    fresh_check = dict(rule=rule, case=case, implementation="torch for-loop",
                                       agree=None, error=str(exc))
                    print(f"WARNING: the fresh-process check could not run: {exc}", file=out,
                          flush=True)
            del steps
    if jax:
        rows += jaxrows.run_isolated(rules, cases, n_threads, budget, out)
    return {
        "fastopt": fastopt.__version__,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "threads": n_threads, "cpu_count": os.cpu_count(),
                    "openmp_runtimes": [os.path.basename(p) for p in _config.openmp_runtimes()]},
        "dtype": "float32",
        "rows": rows,
        "fresh_process_check": fresh_check,
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
                             f"averaging 50K, or 'none' (default: {','.join(DEFAULT_CASES)})")
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
    parser.add_argument("--formats", default="",
                        help="also time AdamW with each storage format (bfloat16 parameters, "
                             "bfloat16 state, master weights) beside torch's fused bfloat16 "
                             "AdamW, on these comma-separated cases (default: none)")
    parser.add_argument("--train", default="",
                        help="also time a training loop (forward+backward and the step) of "
                             "these comma-separated models, LxW: L Linear(W, W) layers, with "
                             "fastopt.torch beside torch, for the --rules torch has "
                             "(for example 20x512,100x256; default: none)")
    parser.add_argument("--muon", default="",
                        help="also time Muon's step, its elementwise part and its GEMMs' "
                             "share beside torch.optim.Muon, on these comma-separated cases: "
                             "NxRxC is N matrices of R x C (for example 4x1024x1024,4096x1024; "
                             "default: none)")
    parser.add_argument("--no-jax", dest="jax", action="store_false",
                        help="skip the JAX rows (fastopt.jax and optax, timed in a process of "
                             "their own; default: where jax and optax are installed)")
    parser.add_argument("--json", default="bench-results.json",
                        help="where to write the results as JSON ('' for nowhere)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip timing one torch row again alone in a fresh process "
                             f"(it should agree within {FRESH_TOLERANCE}x; default: check)")
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

    def sizes(option, text, parse, expected="sizes such as 10M, 200x50K or 4096x4096",
              none=False):
        """The cases of `option` (a comma-separated list; 'none' for none where `none`),
        each checked with `parse`, which gives its sizes (all of them positive)."""
        cases = [c.strip() for c in text.split(",") if c.strip()]
        if none and cases == ["none"]:
            return []
        for case in cases:
            try:
                if min(parse(case)) <= 0:
                    raise ValueError
            except (ValueError, TypeError, OverflowError, IndexError):
                parser.error(f"{option}: {case!r} is no case; expected {expected}"
                             + (", or none" if none else ""))
        return cases
    muon_cases = sizes("--muon", args.muon,
                       lambda c: [d for shape in muon.parse_case(c) for d in shape],
                       "NxRxC or RxC")
    cases = sizes("--cases", args.cases, parse_case, none=True)
    op_cases = sizes("--op-cases", args.op_cases, ops.shape_of)
    format_cases = sizes("--formats", args.formats, parse_case)
    result = run(rules, cases, args.threads, int(args.numpy_max), args.budget, check=args.check,
                 jax=args.jax)
    if names:
        _backends.available("numba")  # loading it keeps OpenMP unnested (fastopt._config)
        _warm_allocator()
        print("\noperations, float32, one weight each; GB/s counts fastopt's transfers")
        result["rows"] += ops.run_ops(names, op_cases,
                                      args.threads or fastopt.get_num_threads(), args.budget,
                                      sys.stdout)
    if format_cases:
        result["rows"] += formats.run_formats(format_cases,
                                              args.threads or fastopt.get_num_threads(),
                                              args.budget, sys.stdout)
    models = [m.strip() for m in args.train.split(",") if m.strip()]
    if models:
        result["rows"] += training.run_training(models, rules, RULES,
                                                args.threads or fastopt.get_num_threads(),
                                                args.budget, sys.stdout)
    if muon_cases:
        result["rows"] += muon.run_muon(muon_cases, args.threads or fastopt.get_num_threads(),
                                        args.budget, sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {args.json}")
    return 0
