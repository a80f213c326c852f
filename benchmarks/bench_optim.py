"""asv suite: one optimizer step of every rule, per backend x size x dtype (regression
tracking), and Adam's step with each fused gradient option.

Run against the current checkout (see README): the numbers are times of `opt.step(grads)`
on NumPy arrays, one tensor or 200 tensors of the same total size. The comparison with
torch and the streaming limit lives in `python -m fastopt.bench`.
"""

import numpy as np

import fastopt
from fastopt import _backends, _rules, prune

BACKENDS = [b for b in ("cython", "numba", "numpy") if _backends.available(b)]
SIZES = ["1M", "10M", "200x50K"]
DTYPES = ["float32", "float64"]
FUSED = {  # option -> the optimizer's keyword arguments for these parameters
    "max_grad_norm": lambda p: dict(max_grad_norm=1.0),
    "max_grad_value": lambda p: dict(max_grad_value=1.0),
    "skip_nonfinite": lambda p: dict(skip_nonfinite=True),
    "masks": lambda p: dict(masks=[prune.magnitude_mask(x, 0.5) for x in p]),
}


def _sizes(case):
    if "x" in case:
        return [50_000] * 200
    return [int(case[:-1]) * 1_000_000]


def _arrays(backend, size, dtype, matrix=False):
    """Parameters and gradients; matrix: as (n / 1000, 1000) matrices (Adafactor factors
    them)."""
    if backend == "numpy" and size != "1M":
        raise NotImplementedError  # asv skips: the reference is far too slow to track here
    rng = np.random.default_rng(0)
    shapes = [(n // 1000, 1000) if matrix else (n,) for n in _sizes(size)]
    return ([rng.standard_normal(s).astype(dtype) for s in shapes],
            [rng.standard_normal(s).astype(dtype) for s in shapes])


class _OptimizerStep:
    rule = None
    hyper = {}
    matrix = False
    params = (BACKENDS, SIZES, DTYPES)
    param_names = ["backend", "size", "dtype"]
    timeout = 300

    def setup(self, backend, size, dtype):
        self.p, self.g = _arrays(backend, size, dtype, self.matrix)
        self.opt = getattr(fastopt, self.rule)(self.p, backend=backend, **self.hyper)
        self.opt.step(self.g)  # state allocated, kernels compiled

    def time_step(self, backend, size, dtype):
        self.opt.step(self.g)


# one class per rule of the table (fastopt._rules), with the harness's hyperparameters
for _row in _rules.RULES:
    globals()[f"{_row.name}Step"] = type(f"{_row.name}Step", (_OptimizerStep,), dict(
        rule=_row.name, hyper=_row.bench, matrix=_row.matrix))
del _row


class AdamFusedStep:
    """AdamStep with one of the options every optimizer fuses into its step: max_grad_norm
    and skip_nonfinite (one more read of the gradients, for their norm), max_grad_value (in
    the update pass), masks (one more operand)."""
    params = (BACKENDS, SIZES, DTYPES, list(FUSED))
    param_names = ["backend", "size", "dtype", "option"]
    timeout = 300

    def setup(self, backend, size, dtype, option):
        self.p, self.g = _arrays(backend, size, dtype)
        self.opt = fastopt.Adam(self.p, backend=backend, **_rules.BY_NAME["Adam"].bench,
                                **FUSED[option](self.p))
        self.opt.step(self.g)

    def time_step(self, backend, size, dtype, option):
        self.opt.step(self.g)


class StreamLimit:
    """The streaming kernel with Adam's access pattern: the ceiling for AdamStep."""
    params = (SIZES,)
    param_names = ["size"]

    def setup(self, size):
        from fastopt._cpu import _stream
        self.stream = _stream
        sizes = _sizes(size)
        self.src = [np.ones(n, np.float32) for n in sizes]
        self.rw = [[np.ones(n, np.float32) for n in sizes] for _ in range(3)]

    def time_stream(self, size):
        self.stream.stream_rw(self.src, self.rw, False, fastopt.get_num_threads())
