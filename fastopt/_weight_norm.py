r"""Weight normalization (Salimans & Kingma, 2016) as kernels, with torch's semantics.

:math:`w = g \, v / \lVert v \rVert`, the norm taken over every dim of ``v`` but ``dim``
(torch.nn.utils.parametrizations.weight_norm, i.e. ``torch._weight_norm``). ``g`` has
torch's shape: ``v``'s, with every dim but ``dim`` set to 1 (0-d for ``dim=None``, one norm
over the whole tensor). The backward pass is torch's:

.. math::
    s_b = \sum (\partial L / \partial w) \odot v \text{ over slice } b,\quad
    \partial L / \partial g_b = s_b / \lVert v_b \rVert,\quad
    \partial L / \partial v = \frac{g_b}{\lVert v_b \rVert}\Big(\frac{\partial L}{\partial w}
    - v \, \frac{s_b}{\lVert v_b \rVert^2}\Big)

The slice sums run in float64 in a fixed order (kernels/include/fastopt/wnorm.h), so every
backend returns the same bits; the per-slice factors are computed on the host.

>>> import numpy as np, fastopt
>>> v = np.array([[3.0, 4.0], [0.0, 2.0]])
>>> fastopt.weight_norm(v, np.array([[10.0], [1.0]]))
array([[6., 8.],
       [0., 1.]])
"""

import math

import numpy as np

from fastopt import _backends, _interop
from fastopt._config import get_num_threads

__all__ = ["weight_norm", "weight_norm_backward"]


def _geometry(shape, dim):
    """(A, B, C) of the weight around `dim`, and g's shape."""
    if dim is None:
        return (1, 1, math.prod(shape)), ()
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be an int or None, got {dim!r}")
    if dim < 0:
        raise ValueError(f"dim must be in [0, {len(shape)}) or None, got {dim}: in torch's "
                         f"weight_norm dim=-1 means the whole tensor; pass dim=None for that, "
                         f"or dim={len(shape) - 1} for the last dim")
    if dim >= len(shape):
        raise ValueError(f"dim must be in [0, {len(shape)}) or None for v of shape "
                         f"{tuple(shape)}, got {dim}")
    return ((math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])),
            tuple(n if i == dim else 1 for i, n in enumerate(shape)))


def _inputs(named, dim):
    """Kernel views of the named arrays (checked: same dtype and device, g's shape), the
    weight's (A, B, C) and g's factors as float64 host values."""
    views = {name: _interop.import_input(x, name) for name, x in named.items()}
    v = views["v"].array
    if v.ndim < 1:
        raise ValueError("v: weight normalization needs a tensor with 1 or more dims")
    geometry, g_shape = _geometry(v.shape, dim)
    for name, view in views.items():
        if view.device != views["v"].device or view.array.dtype != v.dtype:
            raise ValueError(f"{name}: expected {v.dtype} on {views['v'].device[0]} like v, "
                             f"got {view.array.dtype} on {view.device[0]}")
    if "grad_w" in views and views["grad_w"].array.shape != v.shape:
        raise ValueError(f"grad_w: expected v's shape {v.shape}, got "
                         f"{views['grad_w'].array.shape}")
    g = views["g"].array
    if g.shape != g_shape:
        raise ValueError(f"g: expected shape {g_shape} (v's shape with every dim but dim={dim} "
                         f"set to 1, as torch keeps it), got {g.shape}")
    g_host = np.asarray(_interop._host(g), np.float64).reshape(-1)
    if not np.isfinite(g_host).all():
        raise ValueError(f"g: non-finite value at slice {int(np.argmin(np.isfinite(g_host)))}")
    return {name: view.array for name, view in views.items()}, geometry, g_shape, g_host


def _op(name, backend, v):
    return _backends.resolve(name, backend, "cpu" if isinstance(v, np.ndarray) else "cuda",
                             v.dtype)


def _norms(v, geometry, backend):
    sums = _op("weight_norm_sums", backend, v)(v, v, geometry, n_threads=get_num_threads())
    norms = np.sqrt(sums)
    bad = ~(np.isfinite(norms) & (norms > 0))
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"v: slice {b} has norm {norms[b]}; weight normalization needs "
                         f"finite, nonzero slices")
    return norms


def weight_norm(v, g, dim=0, *, backend="auto"):
    """w = g * v / ||v||, the norm over every dim but `dim` (torch's semantics; see the
    module docstring). Returns a new array of v's framework, shape and dtype."""
    _backends.check_name(backend)
    arrays, geometry, _, g_host = _inputs({"v": v, "g": g}, dim)
    v_ = arrays["v"]
    if v_.size == 0:
        return _interop.new_array(v_.shape, v_.dtype, v)[1]()
    k1 = (g_host / _norms(v_, geometry, backend)).astype(v_.dtype)
    out, finish = _interop.new_array(v_.shape, v_.dtype, v)
    _op("weight_norm_apply", backend, v_)(out, v_, None, k1, None, geometry,
                                          n_threads=get_num_threads())
    return finish()


def weight_norm_backward(grad_w, v, g, dim=0, *, backend="auto"):
    """(grad_v, grad_g) of weight_norm(v, g, dim) given grad_w = dL/dw, as torch's autograd
    computes them (see the module docstring); new arrays of v's framework."""
    _backends.check_name(backend)
    arrays, geometry, g_shape, g_host = _inputs({"grad_w": grad_w, "v": v, "g": g}, dim)
    v_, gw = arrays["v"], arrays["grad_w"]
    if v_.size == 0:
        return (_interop.new_array(v_.shape, v_.dtype, v)[1](),
                _interop.new_array(g_shape, v_.dtype, v)[1]())
    norms = _norms(v_, geometry, backend)
    dots = _op("weight_norm_sums", backend, v_)(gw, v_, geometry, n_threads=get_num_threads())
    if not np.isfinite(dots).all():
        raise ValueError(f"grad_w: non-finite values in slice "
                         f"{int(np.argmin(np.isfinite(dots)))}")
    k1 = (g_host / norms).astype(v_.dtype)
    k3 = (dots / (norms * norms)).astype(v_.dtype)
    grad_v, finish_v = _interop.new_array(v_.shape, v_.dtype, v)
    _op("weight_norm_apply", backend, v_)(grad_v, v_, gw, k1, k3, geometry,
                                          n_threads=get_num_threads())
    grad_g, finish_g = _interop.new_array(g_shape, v_.dtype, v)
    grad_g[...] = _interop.copy_to_like((dots / norms).astype(v_.dtype).reshape(g_shape), grad_g)
    return finish_v(), finish_g()
