"""asv suite: gradient clipping, ``clip_grad_norm_`` per backend x size x dtype x norm type
and ``clip_grad_value_`` (the optimizers' fused clipping is bench_optim.AdamFusedStep)."""

import math

import numpy as np

import fastopt
from fastopt import _backends

BACKENDS = [b for b in _backends.OPS["norm_partials"]
            if b != "numpy" and _backends.BACKENDS[b].device == "cpu" and _backends.available(b)]
SIZES = {"1M": [1_000_000], "10M": [10_000_000], "200x50K": [50_000] * 200}  # as bench_optim
DTYPES = ["float32", "float64"]


def _grads(size, dtype):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(dtype) for n in SIZES[size]]


class ClipGradNorm:
    params = (BACKENDS, list(SIZES), DTYPES, [1.0, 2.0, math.inf])
    param_names = ["backend", "size", "dtype", "norm_type"]

    def setup(self, backend, size, dtype, norm_type):
        self.g = _grads(size, dtype)
        fastopt.clip_grad_norm_(self.g, 1.0, norm_type, backend=backend)  # compilation

    def time_clip_grad_norm(self, backend, size, dtype, norm_type):
        fastopt.clip_grad_norm_(self.g, 1.0, norm_type, backend=backend)


class ClipGradValue:
    params = (list(SIZES), DTYPES)
    param_names = ["size", "dtype"]

    def setup(self, size, dtype):
        self.g = _grads(size, dtype)

    def time_clip_grad_value(self, size, dtype):
        fastopt.clip_grad_value_(self.g, 1.0)
