"""fastopt: compiled kernels for training-time model optimization, for any framework.

Optimizers take arrays of NumPy, PyTorch, JAX, TensorFlow or CuPy and run on the fastest
available backend (Cython/OpenMP on the CPU, CuPy on NVIDIA GPUs, Numba, or the NumPy
reference). ``import fastopt`` imports none of those frameworks.

>>> import numpy as np, fastopt
>>> w = np.zeros(4, np.float32)
>>> opt = fastopt.Adam([w], lr=1e-2)
>>> _ = opt.step([np.ones(4, np.float32)])
"""

from fastopt import distill, init, prune, quant, schedules
from fastopt._config import get_num_threads, set_num_threads
from fastopt._ema import ema_update_
from fastopt._info import show_config
from fastopt._interop import empty_cache
from fastopt._io import load, save
from fastopt._version import __version__
from fastopt._weight_norm import weight_norm, weight_norm_backward
from fastopt.optim import *  # noqa: F403 - every rule of the table, and Optimizer
from fastopt.optim import __all__ as _optimizers
from fastopt.optim._clip import clip_grad_norm_, clip_grad_value_

__all__ = _optimizers + [
    "clip_grad_norm_", "clip_grad_value_", "ema_update_",
    "get_num_threads", "set_num_threads", "show_config", "empty_cache", "save", "load",
    "schedules", "init", "prune", "quant", "distill",
    "weight_norm", "weight_norm_backward",
    "__version__",
]
