"""The harness's mixed-precision table (``python -m fastopt.bench --formats``): one AdamW
step with each storage format of parameters, gradients and state, beside fastopt's float32
step and torch's fused AdamW on bfloat16 parameters.

Each row's GB/s counts the bytes its own format moves per element (Adam reads g, p, m, v
and writes p, m, v: 28 bytes in float32, 14 with everything in bfloat16), and its limit is
the time the streaming kernel (kernels/cpu/stream.h) needs to move that many bytes at its
float32 bandwidth, measured in the same interleaved rounds.
"""

import importlib.util

import numpy as np

import fastopt
from fastopt._interop import bfloat16
from fastopt.bench import _timing

HYPER = dict(lr=1e-3, weight_decay=1e-2)


class Format:
    """A row: fastopt's AdamW with the parameters, gradients and options given, or another
    library's (`other`: "torch", torch.optim.AdamW(fused=True); "torchao", its AdamW8bit)
    on tensors of `param`; and its bytes per element."""

    def __init__(self, name, param, grad, options, nbytes, other=None):
        self.name, self.param, self.grad = name, param, grad
        self.options, self.nbytes, self.other = options, nbytes, other


FORMATS = (
    Format("fastopt float32", "float32", "float32", {}, 28),
    Format("fastopt bf16 p+g, f32 state, SR", "bfloat16", "bfloat16", {}, 22),
    Format("fastopt bf16 p+g+state, SR", "bfloat16", "bfloat16",
           dict(state_dtype="bfloat16"), 14),
    Format("fastopt bf16 p+g+state, nearest", "bfloat16", "bfloat16",
           dict(state_dtype="bfloat16", stochastic_rounding=False), 14),
    Format("fastopt bf16 p+g, f32 master+state", "bfloat16", "bfloat16",
           dict(master_weights=True), 28),
    Format("fastopt f32 p+g, bf16 state, SR", "float32", "float32",
           dict(state_dtype="bfloat16"), 20),
    Format("fastopt f32 p+g, int8 state", "float32", "float32", dict(state_dtype="int8"),
           16 + 16 / 256),
    Format("fastopt bf16 p+g, int8 state, SR", "bfloat16", "bfloat16",
           dict(state_dtype="int8"), 10 + 16 / 256),
    Format("torch fused, bf16 p+g+state", "bfloat16", "bfloat16", {}, 14, other="torch"),
    Format("torchao AdamW8bit, f32 p+g", "float32", "float32", {}, 16 + 16 / 256,
           other="torchao"),
)


def _arrays(sizes, dtype, seed):
    return _timing.arrays(sizes, bfloat16() if dtype == "bfloat16" else np.dtype(dtype), seed)


def _step(fmt, sizes, n_threads):
    params, grads = _arrays(sizes, fmt.param, 1), _arrays(sizes, fmt.grad, 2)
    if fmt.other:
        import torch
        as_torch = {"bfloat16": lambda a: torch.from_numpy(a.view(np.int16)).view(
            torch.bfloat16), "float32": torch.from_numpy}[fmt.param]
        params = [as_torch(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = as_torch(g)
        if fmt.other == "torchao":
            from torchao.optim import AdamW8bit
            return AdamW8bit(params, **HYPER).step
        return torch.optim.AdamW(params, fused=True, **HYPER).step
    opt = fastopt.AdamW(params, backend="cython", n_threads=n_threads, **fmt.options, **HYPER)
    return lambda: opt.step(grads)


def run_formats(cases, n_threads, budget, out):
    """Time every format of FORMATS on each case; print the table to `out`; return rows."""
    try:
        import torch
        torch.set_num_threads(n_threads)
    except ImportError:
        torch = None
    formats = [f for f in FORMATS if f.other is None or torch is not None
               and (f.other == "torch" or importlib.util.find_spec(f.other) is not None)]
    print(f"\nmixed precision: one AdamW step, {n_threads} threads; GB/s and % limit for each "
          f"format's own bytes per element", file=out)
    header = (f"{'case':<9} {'format':<36} {'B/elem':>6} {'median ms':>10} {'GB/s':>7} "
              f"{'% limit':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for case in cases:
        sizes = _timing.parse_case(case)
        n = sum(sizes)
        steps = [_timing.stream_case(sizes, 2, n_threads)]  # Adam's pattern in float32: 28 B
        steps += [_step(f, sizes, n_threads) for f in formats]
        medians = _timing.time_interleaved(steps, budget=budget)
        stream_bps = 28 * n / medians[0]
        for fmt, seconds in zip(formats, medians[1:]):
            limit = fmt.nbytes * n / stream_bps
            row = dict(rule="adamw", case=case, tensors=len(sizes), elements=n,
                       implementation=fmt.name, bytes_per_element=fmt.nbytes,
                       median_ms=seconds * 1e3, gbps=fmt.nbytes * n / seconds / 1e9,
                       pct_limit=100 * limit / seconds, limit_ms=limit * 1e3)
            rows.append(row)
            print(f"{case:<9} {fmt.name:<36} {fmt.nbytes:>6.4g} {row['median_ms']:>10.2f} "
                  f"{row['gbps']:>7.1f} {row['pct_limit']:>7.0f}%", file=out, flush=True)
    return rows
