"""Harness rows for the operations that are not optimizer steps:
``--ops init,weight_norm,compress``.

Each operation is timed like the optimizer rules (interleaved rounds, cold caches) beside
torch's own (torch.nn.init, torch._weight_norm and its backward, torch.nn.utils.prune,
torch.quantize_per_*, the distillation loss with autograd), with its bandwidth for the
bytes fastopt moves and the percent of this machine's streaming limit for that count: the
write-only stream kernel for initializers, the read-read-write kernel (stream_rw with no
state) for the others, scaled to the operation's transfers.
"""

from typing import NamedTuple

import numpy as np

import fastopt
from fastopt import _backends
from fastopt._interop import aligned_empty
from fastopt.bench._timing import MATRIX_COLS, parse_case, time_interleaved


class Op(NamedTuple):
    """A benchmarked operation: its transfers per element in units of 4 bytes (reads +
    writes, every pass; a 1-byte mask or code counts 0.25), whether its limit is the
    write-only stream, fastopt's call on (arrays, backend) and torch's on tensors (None:
    no torch counterpart timed), after a setup that builds the arrays from the weight; the
    registry operation that decides which backends run it, and the op's default cases.

    With `cached_rows`, the Cython call is also timed on the weight's first that many rows,
    called again until it has done as many rows as the whole weight: those rows stay in
    cache, so the time is the op's arithmetic alone, and its % of the limit is the most the
    op can reach on this machine however well its memory traffic overlaps."""
    traffic: float
    write_only: bool
    setup: object  # weight (float32 matrix) -> tuple of arrays
    fastopt: object  # (arrays, backend) -> None
    torch: object  # (torch, tensors) -> None
    kernel: str = "random_fill"
    cases: tuple = ("4096x4096", "50M")
    cached_rows: int = 0


def _wn_arrays(w):
    g = np.linalg.norm(w, axis=1, keepdims=True).astype(np.float32)
    return w, g, np.ones_like(w)


def _torch_wn_backward(torch, tensors):
    v, g, grad_w = tensors
    w, norms = torch._weight_norm_interface(v, g, 0)
    return lambda: torch.ops.aten._weight_norm_interface_backward(grad_w, v, g, norms, 0)


def _torch_pruning(method, **kwargs):
    """torch.nn.utils.prune.`method` with amount 0.5 and `kwargs` on the first tensor."""
    def make(torch, tensors):
        prune = __import__("torch.nn.utils.prune", fromlist=["prune"])

        def call():
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(tensors[0])
            getattr(prune, method)(holder, "weight", 0.5, **kwargs)
        return call
    return make


def _pieces(w):
    """The weight as 200 tensors of uneven sizes (views of one buffer)."""
    flat = w.reshape(-1)
    cuts = np.linspace(0, flat.size, 201).astype(int)
    return tuple(flat[a:b] for a, b in zip(cuts[:-1], cuts[1:]))


def _per_channel(w):
    scales = (np.abs(w).max(axis=1) / 127).astype(np.float64) + 1e-12
    return w, scales, np.zeros(w.shape[0], np.int64)


def _logits(w):
    teacher = np.roll(w, 1, axis=1) * np.float32(0.5)
    labels = np.arange(w.shape[0], dtype=np.int64) % w.shape[1]
    return w, teacher, labels


def _torch_kd(torch, tensors):
    F = torch.nn.functional
    s, t, y = tensors

    def call():
        x = s.detach().requires_grad_()
        kl = F.kl_div(F.log_softmax(x / 4.0, dim=1), F.log_softmax(t / 4.0, dim=1),
                      reduction="batchmean", log_target=True)
        loss = 0.9 * 16.0 * kl + 0.1 * F.cross_entropy(x, y)
        loss.backward()
    return call


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
                      lambda torch, t: lambda: torch._weight_norm(t[0], t[1], 0),
                      "weight_norm_apply"),
    # norms (v), dots (grad_w, v), grad_v (grad_w, v read, grad_v written)
    "weight_norm_backward": Op(6, False, _wn_arrays,
                               lambda a, b: fastopt.weight_norm_backward(a[2], a[0], a[1], 0,
                                                                         backend=b),
                               _torch_wn_backward, "weight_norm_apply"),
    # one pass: the weights read, the 1-byte mask written (the Cython backend's sampled
    # select; its sample and the ~1% of keys it collects are extra, and the Numba backend's
    # radix select reads the weights 2 or 3 times)
    "magnitude_mask": Op(1.25, False, lambda w: (w,),
                         lambda a, b: fastopt.prune.magnitude_mask(a[0], 0.5, backend=b),
                         _torch_pruning("l1_unstructured"), "magnitude_masks",
                         ("4096x4096", "10M")),
    "global_magnitude_masks": Op(1.25, False, _pieces,
                                 lambda a, b: fastopt.prune.global_magnitude_masks(
                                     list(a), 0.5, backend=b),
                                 None, "magnitude_masks", ("50M",)),
    # read the weight (its rows' sums of squares), write the 1-byte mask
    "ln_structured_mask": Op(1.25, False, lambda w: (w,),
                             lambda a, b: fastopt.prune.ln_structured_mask(a[0], 0.5, 2, 0,
                                                                           backend=b),
                             _torch_pruning("ln_structured", n=2, dim=0), "weight_norm_sums",
                             ("4096x4096",)),
    # read the weight, write the 1-byte mask
    "nm_mask": Op(1.25, False, lambda w: (w,),
                  lambda a, b: fastopt.prune.nm_mask(a[0], 2, 4, backend=b), None, "nm_masks",
                  ("4096x4096",)),
    # read x, write 1-byte codes
    "quantize_per_channel": Op(1.25, False, _per_channel,
                               lambda a, b: fastopt.quant.quantize(a[0], a[1], a[2], axis=0,
                                                                   backend=b),
                               lambda torch, t: lambda: torch.quantize_per_channel(
                                   t[0], t[1].double(), t[2], 0, torch.qint8),
                               "quant_loop", ("4096x4096",)),
    "quantize_per_tensor": Op(1.25, False, lambda w: (w,),
                              lambda a, b: fastopt.quant.quantize(a[0], 0.01, 0, backend=b),
                              lambda torch, t: lambda: torch.quantize_per_tensor(
                                  t[0], 0.01, 0, torch.qint8),
                              "quant_loop", ("4096x4096",)),
    # read student and teacher logits, write the gradient
    "kd_loss": Op(3, False, _logits,
                  lambda a, b: fastopt.distill.kd_loss(a[0], a[1], a[2], backend=b),
                  _torch_kd, "kd_rows", ("4096x32000",), cached_rows=32),
}
GROUPS = {"init": ("kaiming_uniform", "xavier_normal", "trunc_normal"),
          "weight_norm": ("weight_norm", "weight_norm_backward"),
          "compress": ("magnitude_mask", "global_magnitude_masks", "ln_structured_mask",
                       "nm_mask", "quantize_per_channel", "quantize_per_tensor", "kd_loss")}


def shape_of(case):
    """'4096x4096' -> that matrix; '50M' -> 50M elements as rows of 1024."""
    if "x" in case and "M" not in case and "K" not in case:
        rows, cols = case.split("x")
        return int(rows), int(cols)
    n = parse_case(case)[0]
    return n // MATRIX_COLS, MATRIX_COLS


def run_ops(names, cases, n_threads, budget, out):
    """Time each named op on `cases` (None: each op's own default cases)."""
    from fastopt._cpu import _stream
    try:
        import torch
        torch.set_num_threads(n_threads)
    except ImportError:
        torch = None
    fastopt.set_num_threads(n_threads)  # the initializers and weight norm use the default
    rows = []
    work = [(case, name) for name in names for case in (cases or OPS[name].cases)]
    weights = {}
    for case, name in work:
        shape = shape_of(case)
        n = shape[0] * shape[1]
        if case not in weights:
            weights.clear()  # one weight alive at a time: the cases can be large
            weights[case] = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        weight = weights[case]
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
            if backend in _backends.OPS[op.kernel] and _backends.available(backend):
                arrays = op.setup(weight.copy())
                steps.append(lambda a=arrays, b=backend: op.fastopt(a, b))
                labels.append(f"fastopt {backend}")
        cached_at, cached_scale = None, 1.0
        if op.cached_rows and "fastopt cython" in labels:
            rows_in_cache = min(op.cached_rows, shape[0])
            calls = -(-shape[0] // rows_in_cache)
            arrays = op.setup(weight[:rows_in_cache].copy())

            def cached(a=arrays, calls=calls):
                for _ in range(calls):
                    op.fastopt(a, "cython")  # each result dropped, as in a training loop
            cached_at, cached_scale = len(steps), shape[0] / (calls * rows_in_cache)
            steps.append(cached)
            labels.append(f"fastopt cython, {rows_in_cache} row"
                          f"{'s' * (rows_in_cache != 1)} in cache")
        if torch is not None and op.torch is not None:
            steps.append(op.torch(torch, [torch.from_numpy(a) for a in op.setup(weight.copy())]))
            labels.append("torch")
        medians = time_interleaved(steps, budget=budget)
        if cached_at is not None:
            medians[cached_at] *= cached_scale  # per the weight's rows
        limit = medians[0] * op.traffic / limit_traffic
        for label, seconds in zip(labels, [limit] + medians[1:]):
            row = dict(rule=name, case=case, tensors=1, elements=n, implementation=label,
                       median_ms=seconds * 1e3, gbps=nbytes / seconds / 1e9,
                       pct_limit=100 * limit / seconds)
            rows.append(row)
            print(f"{name:<20} {case:<9} {label:<30} {row['median_ms']:>10.2f} "
                  f"{row['gbps']:>7.1f} {row['pct_limit']:>7.0f}%", file=out, flush=True)
    return rows
