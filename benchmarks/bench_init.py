"""asv suite: weight initializers and weight normalization per backend x dtype."""

import numpy as np

import fastopt
from fastopt import _backends

BACKENDS = [b for b in ("cython", "numba") if _backends.available(b)]
DTYPES = ["float32", "float64"]
SHAPE = (4096, 1024)


class Initializer:
    params = (BACKENDS, ["kaiming_uniform_", "xavier_normal_", "trunc_normal_"], DTYPES)
    param_names = ["backend", "initializer", "dtype"]

    def setup(self, backend, initializer, dtype):
        self.w = np.empty(SHAPE, dtype)
        self.fill = getattr(fastopt.init, initializer)
        self.fill(self.w, seed=0, backend=backend)  # first touch, compilation

    def time_fill(self, backend, initializer, dtype):
        self.fill(self.w, seed=1, backend=backend)


class WeightNorm:
    params = (BACKENDS, DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        rng = np.random.default_rng(0)
        self.v = rng.standard_normal(SHAPE).astype(dtype)
        self.g = np.ones((SHAPE[0], 1), dtype)
        self.grad_w = rng.standard_normal(SHAPE).astype(dtype)
        fastopt.weight_norm_backward(self.grad_w, self.v, self.g, backend=backend)

    def time_forward(self, backend, dtype):
        fastopt.weight_norm(self.v, self.g, backend=backend)

    def time_backward(self, backend, dtype):
        fastopt.weight_norm_backward(self.grad_w, self.v, self.g, backend=backend)
