"""The CuPy backend: kernels/cuda/*.cu compiled at run time by NVRTC, for CuPy arrays (and
other frameworks' arrays on an NVIDIA GPU). Its modules mirror the other backends': optim
(the rules' passes and the gradient norm), init (random fills, weight norm), compress (the
select's passes, quantization, distillation); _launch holds what they share."""

import functools

from fastopt._backends import _select
from fastopt._backends._cupy import compress
from fastopt._backends._cupy._launch import (
                                             THREADS,
                                             compile_options,
                                             device,
                                             grid,
                                             kernel_dir,
                                             source,
                                             unavailable_reason,
)
from fastopt._backends._cupy.compress import kd_rows, quant_loop
from fastopt._backends._cupy.init import random_fill, weight_norm_apply, weight_norm_sums
from fastopt._backends._cupy.optim import (
                                             KERNELS,
                                             MASKS_IN_KERNELS,
                                             elementwise,
                                             factors,
                                             norm_partials,
)
from fastopt._backends._numpy.compress import nm_masks  # array code: runs on CuPy arrays

magnitude_masks = functools.partial(_select.magnitude_masks, compress)

__all__ = ["KERNELS", "MASKS_IN_KERNELS", "device", "elementwise", "factors", "norm_partials",
           "random_fill", "weight_norm_sums", "weight_norm_apply", "magnitude_masks",
           "nm_masks", "quant_loop", "kd_rows", "THREADS", "compile_options", "grid", "kernel_dir",
           "source", "unavailable_reason"]
