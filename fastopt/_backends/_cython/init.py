"""The Cython backend's random fills (kernels/cpu/random_loops.h) and weight-norm passes
(kernels/cpu/wnorm_loops.h)."""

from fastopt._backends import _slices
from fastopt._backends._pack import random_args
from fastopt._cpu import _random, _wnorm


def random_fill(out, kind, reals, seed, stream, *, n_threads):
    _random.fill(out, kind, random_args(reals, seed, stream), n_threads)


def weight_norm_sums(x, y, shape, *, n_threads):
    return _slices.total(_wnorm.slice_dot(x, y, *shape, _slices.items(*shape), n_threads))


def weight_norm_apply(out, v, grad_w, k1, k3, shape, *, n_threads):
    _wnorm.scale(out, v, grad_w, k1, k3, shape[1], shape[2], n_threads)
