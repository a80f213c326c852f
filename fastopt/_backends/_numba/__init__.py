"""The Numba backend: @njit(parallel=True, cache=True) kernels. Its modules mirror the other
backends': optim (the rules' kernels and the gradient norm), init (random fills, weight
norm), compress (the select's counting passes, quantization, distillation)."""

import functools

import numba

from fastopt import _config
from fastopt._backends import _select
from fastopt._backends._numba import compress
from fastopt._backends._numba.compress import kd_rows, nm_masks, quant_loop
from fastopt._backends._numba.init import random_fill, weight_norm_apply, weight_norm_sums
from fastopt._backends._numba.optim import (
                                            FORMATS,
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

# Numba's OpenMP layer turns nesting on when it launches its threads; launch them now and
# turn it off, so that torch sharing the runtime does not nest (fastopt._config)
numba.get_num_threads()
_config.keep_openmp_unnested()

__all__ = ["FORMATS", "KERNELS", "MASKS_IN_KERNELS", "caution_counts", "device",
           "elementwise", "factors", "norm_partials", "pass_sums", "random_fill",
           "weight_norm_sums", "weight_norm_apply", "magnitude_masks", "nm_masks", "quant_loop",
           "kd_rows"]
