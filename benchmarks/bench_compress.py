"""asv suite: pruning masks, quantization, fake quantization and the distillation loss per
backend x dtype."""

import numpy as np

from fastopt import _backends, distill, prune, quant

DTYPES = ["float32", "float64"]
SHAPE = (4096, 1024)


def _backends_of(op):
    """The compiled backends for NumPy arrays that implement `op`."""
    return [b for b in _backends.OPS[op]
            if b != "numpy" and _backends.BACKENDS[b].device == "cpu" and _backends.available(b)]


class MagnitudeMask:
    params = (_backends_of("magnitude_masks"), DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        self.w = np.random.default_rng(0).standard_normal(SHAPE).astype(dtype)
        prune.magnitude_mask(self.w, 0.5, backend=backend)  # compilation

    def time_magnitude_mask(self, backend, dtype):
        prune.magnitude_mask(self.w, 0.5, backend=backend)

    def time_global_200(self, backend, dtype):
        prune.global_magnitude_masks(np.array_split(self.w.reshape(-1), 200), 0.5,
                                     backend=backend)


class LnStructuredMask:
    params = (_backends_of("weight_norm_sums"), DTYPES, [1, 2])
    param_names = ["backend", "dtype", "n"]

    def setup(self, backend, dtype, n):
        self.w = np.random.default_rng(0).standard_normal(SHAPE).astype(dtype)
        prune.ln_structured_mask(self.w, 0.5, n, 0, backend=backend)  # compilation

    def time_ln_structured_mask(self, backend, dtype, n):
        prune.ln_structured_mask(self.w, 0.5, n, 0, backend=backend)


class NMMask:
    params = (_backends_of("nm_masks"), DTYPES, [-1, 0])
    param_names = ["backend", "dtype", "dim"]

    def setup(self, backend, dtype, dim):
        self.w = np.random.default_rng(0).standard_normal(SHAPE).astype(dtype)
        prune.nm_mask(self.w, 2, 4, dim, backend=backend)  # compilation

    def time_nm_mask_2_4(self, backend, dtype, dim):
        prune.nm_mask(self.w, 2, 4, dim, backend=backend)


class RandomMask:
    params = (_backends_of("random_fill"),)
    param_names = ["backend"]

    def setup(self, backend):
        self.w = np.empty(SHAPE, np.float32)  # only its size counts
        prune.random_mask(self.w, 0.5, seed=0, backend=backend)  # compilation

    def time_random_mask(self, backend):
        prune.random_mask(self.w, 0.5, seed=1, backend=backend)


class Quantize:
    params = (_backends_of("quant_loop"), DTYPES, [None, 0])
    param_names = ["backend", "dtype", "axis"]

    def setup(self, backend, dtype, axis):
        self.w = np.random.default_rng(0).standard_normal(SHAPE).astype(dtype)
        self.scale, self.zp = quant.qparams(self.w, "int8", axis=axis, symmetric=True)
        self.q = quant.quantize(self.w, self.scale, self.zp, axis=axis, backend=backend)
        self.grad_y = np.ones(SHAPE, dtype)

    def time_quantize(self, backend, dtype, axis):
        quant.quantize(self.w, self.scale, self.zp, axis=axis, backend=backend)

    def time_dequantize(self, backend, dtype, axis):
        quant.dequantize(self.q, self.scale, self.zp, axis=axis, backend=backend)

    def time_fake_quantize(self, backend, dtype, axis):
        quant.fake_quantize(self.w, self.scale, self.zp, -128, 127, axis=axis, backend=backend)

    def time_fake_quantize_backward(self, backend, dtype, axis):
        quant.fake_quantize_backward(self.grad_y, self.w, self.scale, self.zp, -128, 127,
                                     axis=axis, backend=backend)


class KDLoss:
    params = (_backends_of("kd_rows"), DTYPES)
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        rng = np.random.default_rng(0)
        self.s = rng.standard_normal((256, 32000)).astype(dtype)
        self.t = rng.standard_normal((256, 32000)).astype(dtype)
        self.labels = np.arange(256)

    def time_kd_loss(self, backend, dtype):
        distill.kd_loss(self.s, self.t, self.labels, backend=backend)
