"""The NumPy reference backend: plain, readable NumPy, the spec every backend is tested
against. Its modules mirror the other backends': optim (each rule, named after its registry
operation, and the gradient norm), init (random fills, weight norm), compress (the select,
quantization, distillation)."""

from fastopt._backends._numpy.compress import kd_rows, magnitude_masks, nm_masks, quant_loop
from fastopt._backends._numpy.init import random_fill, weight_norm_apply, weight_norm_sums
from fastopt._backends._numpy.optim import *  # noqa: F403 - the rules' steps, norm_partials
from fastopt._backends._numpy.optim import __all__ as _optim_all

__all__ = _optim_all + ["random_fill", "weight_norm_sums", "weight_norm_apply",
                        "magnitude_masks", "nm_masks", "quant_loop", "kd_rows"]
