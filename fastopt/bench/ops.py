"""Harness rows for the operations that are not optimizer steps: ``--ops init,weight_norm``.

Each operation is timed like the optimizer rules (interleaved rounds, cold caches) beside
torch's own (torch.nn.init, torch._weight_norm and its backward), with its bandwidth for
the element transfers fastopt makes and the percent of this machine's streaming limit for
that count: the write-only stream kernel for initializers, the read-read-write kernel
(stream_rw with no state) for weight normalization.
"""

from typing import NamedTuple

import numpy as np

import fastopt
from fastopt import _backends
from fastopt._interop import aligned_empty


class Op(NamedTuple):
    """A benchmarked operation: its transfers per element (reads + writes, every pass),
    whether its limit is the write-only stream, fastopt's call on (arrays, backend) and
    torch's on tensors, after a setup that builds the arrays from the weight."""
    traffic: int
    write_only: bool
    setup: object  # weight (float32 matrix) -> tuple of arrays
    fastopt: object  # (arrays, backend) -> None
    torch: object  # (torch, tensors) -> None


def _wn_arrays(w):
    g = np.linalg.norm(w, axis=1, keepdims=True).astype(np.float32)
    return w, g, np.ones_like(w)


def _torch_wn_backward(torch, tensors):
    v, g, grad_w = tensors
    w, norms = torch._weight_norm_interface(v, g, 0)
    return lambda: torch.ops.aten._weight_norm_interface_backward(grad_w, v, g, norms, 0)


OPS = {
    "kaiming_uniform": Op(1, True, lambda w: (w,),
                          lambda a, b: fastopt.init.kaiming_uniform_(a[0], seed=1, backend=b),
                          lambda torch, t: lambda: torch.nn.init.kaiming_uniform_(t[0])),
    "xavier_normal": Op(1, True, lambda w: (w,),
                        lambda a, b: fastopt.init.xavier_normal_(a[0], seed=1, backend=b),
                        lambda torch, t: lambda: torch.nn.init.xavier_normal_(t[0])),
    "trunc_normal": Op(1, True, lambda w: (w,),
                       lambda a, b: fastopt.init.trunc_normal_(a[0], std=0.02, seed=1, backend=b),
                       lambda torch, t: lambda: torch.nn.init.trunc_normal_(t[0], std=0.02)),
    # norms (v), then w = k v (v read, w written)
    "weight_norm": Op(3, False, _wn_arrays,
                      lambda a, b: fastopt.weight_norm(a[0], a[1], 0, backend=b),
                      lambda torch, t: lambda: torch._weight_norm(t[0], t[1], 0)),
    # norms (v), dots (grad_w, v), grad_v (grad_w, v read, grad_v written)
    "weight_norm_backward": Op(6, False, _wn_arrays,
                               lambda a, b: fastopt.weight_norm_backward(a[2], a[0], a[1], 0,
                                                                         backend=b),
                               _torch_wn_backward),
}
GROUPS = {"init": ("kaiming_uniform", "xavier_normal", "trunc_normal"),
          "weight_norm": ("weight_norm", "weight_norm_backward")}
OP_CASES = ("4096x4096", "50M")


def shape_of(case):
    """'4096x4096' -> that matrix; '50M' -> 50M elements as rows of 1024."""
    from fastopt.bench import MATRIX_COLS, parse_case
    if "x" in case and "M" not in case and "K" not in case:
        rows, cols = case.split("x")
        return int(rows), int(cols)
    n = parse_case(case)[0]
    return n // MATRIX_COLS, MATRIX_COLS


def run_ops(names, cases, n_threads, budget, out):
    from fastopt._cpu import _stream
    from fastopt.bench import time_interleaved
    try:
        import torch
        torch.set_num_threads(n_threads)
    except ImportError:
        torch = None
    fastopt.set_num_threads(n_threads)  # the initializers and weight norm use the default
    rows = []
    for case in cases:
        shape = shape_of(case)
        n = shape[0] * shape[1]
        weight = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        for name in names:
            op = OPS[name]
            nbytes = 4 * n * op.traffic
            if op.write_only:
                dst = [aligned_empty(n, np.float32)]
                steps = [lambda: _stream.stream_w(dst, n_threads)]
                limit_traffic = 1
            else:
                src, rw = [weight.reshape(-1)], [[weight.reshape(-1).copy()]]
                steps = [lambda: _stream.stream_rw(src, rw, False, n_threads)]
                limit_traffic = 3
            labels = ["stream limit (C kernel)"]
            for backend in ("cython", "numba"):
                if _backends.available(backend):
                    arrays = op.setup(weight.copy())
                    steps.append(lambda a=arrays, b=backend: op.fastopt(a, b))
                    labels.append(f"fastopt {backend}")
            if torch is not None:
                steps.append(op.torch(torch, [torch.from_numpy(a) for a in op.setup(weight.copy())]))
                labels.append("torch")
            medians = time_interleaved(steps, budget=budget)
            limit = medians[0] * op.traffic / limit_traffic
            for label, seconds in zip(labels, [limit] + medians[1:]):
                row = dict(rule=name, case=case, tensors=1, elements=n, implementation=label,
                           median_ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                           pct_limit=100 * limit / seconds)
                rows.append(row)
                print(f"{name:<20} {case:<9} {label:<30} {row['median_ms']:>10.2f} "
                      f"{row['gbps']:>7.1f} {row['pct_limit']:>7.0f}%", file=out, flush=True)
    return rows
