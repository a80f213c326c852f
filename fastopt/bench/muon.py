"""The harness's Muon table (``python -m fastopt.bench --muon 4x1024x1024,4096x1024``): a
Muon step split into its elementwise passes and its Newton-Schulz GEMMs, beside
torch.optim.Muon's step on the same matrices.

A case ``NxRxC`` is N matrices of R x C (``RxC``: one). fastopt's step is timed whole and
with ``ns_steps=0`` (its momentum pass, norm, normalization and apply pass: no GEMM); the
GEMMs' share is the difference over the whole. The elementwise part's GB/s counts the
rule's nominal element transfers (the momentum pass, the norm, the apply pass), and its
limit is the streaming kernel's time for that traffic, as in the optimizer table.
"""

import numpy as np

import fastopt
from fastopt import _rules
from fastopt.bench import _timing


def parse_case(text):
    """'4x1024x1024' -> [(1024, 1024)] * 4; '4096x1024' -> [(4096, 1024)]."""
    dims = [int(d) for d in text.lower().split("x")]
    count, (rows, cols) = (dims[0], dims[1:]) if len(dims) == 3 else (1, dims)
    return [(rows, cols)] * count


def run_muon(cases, n_threads, budget, out):
    """Time each case; print the table to `out`; return its rows."""
    import torch
    torch.set_num_threads(n_threads)
    traffic = _rules.BY_NAME["Muon"].traffic
    print(f"\nMuon, float32, {n_threads} threads: the step, its elementwise part (ns_steps=0) "
          f"and the GEMMs' share; torch.optim.Muon runs Newton-Schulz in bfloat16", file=out)
    header = (f"{'case':<14} {'implementation':<24} {'step ms':>8} {'elementwise ms':>15} "
              f"{'% limit':>8} {'GEMM share':>11} {'vs torch':>9}")
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for case in cases:
        shapes = parse_case(case)
        sizes = [r * c for r, c in shapes]
        rng = np.random.default_rng(0)
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]

        def fastopt_step(**kw):
            params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            opt = fastopt.Muon(params, lr=0.02, n_threads=n_threads, **kw)
            return lambda: opt.step(grads)

        tparams = [torch.randn(s) for s in shapes]
        for t, g in zip(tparams, grads):
            t.grad = torch.from_numpy(g)
        topt = torch.optim.Muon(tparams, lr=0.02)
        stream = _timing.stream_case(sizes, 1, n_threads)
        fns = [fastopt_step(), fastopt_step(ns_dtype="bfloat16"), fastopt_step(ns_steps=0),
               topt.step, stream]
        full, bf16, elementwise, theirs, limit = _timing.time_interleaved(fns, budget=budget)
        limit *= traffic / 5  # the streaming kernel moves g, p and one state: 5 transfers
        nbytes = sum(sizes) * 4 * traffic
        for name, seconds in (("fastopt (float32 NS)", full), ("fastopt (bfloat16 NS)", bf16),
                              ("torch.optim.Muon", theirs)):
            own = name.startswith("fastopt")
            row = dict(rule="muon", case=case, elements=sum(sizes), implementation=name,
                       median_ms=seconds * 1e3,
                       elementwise_ms=elementwise * 1e3 if own else None,
                       gbps=nbytes / elementwise / 1e9 if own else None,
                       pct_limit=100 * limit / elementwise if own else None,
                       gemm_share=1 - elementwise / seconds if own else None,
                       vs_torch=theirs / seconds)
            rows.append(row)
            detail = (f"{row['elementwise_ms']:>15.2f} {row['pct_limit']:>7.0f}% "
                      f"{100 * row['gemm_share']:>10.0f}%" if own else f"{'':>15} {'':>8} "
                                                                          f"{'':>11}")
            print(f"{case:<14} {name:<24} {row['median_ms']:>8.2f} {detail} "
                  f"{row['vs_torch']:>8.2f}x", file=out, flush=True)
    return rows
