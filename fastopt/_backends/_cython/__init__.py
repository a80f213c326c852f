"""The Cython backend: C loops (kernels/cpu) over many tensors in one OpenMP region, built
into fastopt._cpu. Its modules mirror the other backends': optim (the rules' passes and the
gradient norm), init (random fills, weight norm), compress (the select's passes,
quantization, distillation)."""

import functools

from fastopt._backends import _select
from fastopt._backends._cython import compress
from fastopt._backends._cython.compress import kd_rows, nm_masks, quant_loop
from fastopt._backends._cython.init import random_fill, weight_norm_apply, weight_norm_sums
from fastopt._backends._cython.optim import (
                                             FORMATS,
                                             FUSES_EMA,
                                             KERNELS,
                                             MASKS_IN_KERNELS,
                                             caution_counts,
                                             device,
                                             elementwise,
                                             factors,
                                             norm_partials,
                                             pass_sums,
)

magnitude_masks = functools.partial(_select.magnitude_masks, compress)

__all__ = ["FORMATS", "FUSES_EMA", "KERNELS", "MASKS_IN_KERNELS", "caution_counts", "device",
           "elementwise", "factors", "norm_partials", "pass_sums", "random_fill",
           "weight_norm_sums", "weight_norm_apply", "magnitude_masks", "nm_masks", "quant_loop",
           "kd_rows"]
