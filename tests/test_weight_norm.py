"""fastopt.weight_norm and weight_norm_backward: equal to torch's weight_norm and its
autograd gradients; bit-identical across backends and thread counts; bad input."""

import numpy as np
import pytest
from conftest import CPU_BACKENDS, require_backend

import fastopt

CASES = [((30, 17), 0), ((30, 17), 1), ((30, 17), None), ((6, 8, 3, 3), 0),
         ((6, 8, 3, 3), 1), ((6, 8, 3, 3), 3), ((6, 8, 3, 3), None), ((5, 4, 7), 1), ((11,), 0)]
TOL = {"float32": dict(rtol=2e-6, atol=1e-7), "float64": dict(rtol=1e-13, atol=1e-15)}


def _torch_weight_norm(v, g, grad_w, dim):
    """w, grad_v, grad_g through torch's parametrization (autograd)."""
    import torch
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.from_numpy(v.copy()))
    torch.nn.utils.parametrizations.weight_norm(layer, dim=dim)
    params = layer.parametrizations.weight
    with torch.no_grad():
        params.original0.copy_(torch.from_numpy(g))
    w = layer.weight
    w.backward(torch.from_numpy(grad_w))
    return (w.detach().numpy(), params.original1.grad.numpy(), params.original0.grad.numpy())


def _g_shape(shape, dim):
    return () if dim is None else tuple(n if i == dim else 1 for i, n in enumerate(shape))


@pytest.mark.parametrize("shape, dim", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_equals_torch_and_autograd(shape, dim, dtype, rng, torch):
    v = rng.standard_normal(shape).astype(dtype)
    g = rng.uniform(0.5, 2.0, _g_shape(shape, dim)).astype(dtype)
    grad_w = rng.standard_normal(shape).astype(dtype)
    w_t, grad_v_t, grad_g_t = _torch_weight_norm(v, g, grad_w, dim)
    w = fastopt.weight_norm(v, g, dim)
    grad_v, grad_g = fastopt.weight_norm_backward(grad_w, v, g, dim)
    assert w.dtype == v.dtype and grad_g.shape == g.shape
    np.testing.assert_allclose(w, w_t, **TOL[dtype])
    # grad_v = g/||v|| (grad_w - v s/||v||^2) cancels (to 0 for 1-element slices): its
    # rounding error scales with the terms, g/||v|| |grad_w|, not with the result
    norms = np.sqrt((v.astype(np.float64) ** 2).sum(
        axis=tuple(i for i in range(v.ndim) if i != dim), keepdims=True))
    scale = np.abs(g / norms).max() * np.abs(grad_w).max()
    np.testing.assert_allclose(grad_v, grad_v_t, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["rtol"] * scale)
    np.testing.assert_allclose(grad_g, grad_g_t, **TOL[dtype])


BIG = [((300, 1100), 1), ((3, 40000), 0), ((2, 50000), None), ((64, 32, 3, 3), 1),
       ((7, 9000, 3), 1), ((1000, 70), 1)]


@pytest.mark.parametrize("shape, dim", BIG + CASES[:4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backends_bit_identical(shape, dim, dtype, rng):
    v = rng.standard_normal(shape).astype(dtype)
    g = rng.uniform(0.5, 2.0, _g_shape(shape, dim)).astype(dtype)
    grad_w = rng.standard_normal(shape).astype(dtype)
    results = []
    for backend in CPU_BACKENDS:
        require_backend(backend)
        for n_threads in (1, 2):
            fastopt.set_num_threads(n_threads)
            try:
                results.append((fastopt.weight_norm(v, g, dim, backend=backend),)
                               + fastopt.weight_norm_backward(grad_w, v, g, dim, backend=backend))
            finally:
                fastopt.set_num_threads(2)
    for result in results[1:]:
        for got, expected in zip(result, results[0]):
            np.testing.assert_array_equal(got, expected)


def test_other_frameworks_get_their_arrays_back(rng):
    v = rng.standard_normal((8, 5)).astype(np.float32)
    g = np.full((8, 1), 2.0, np.float32)
    expected = fastopt.weight_norm(v, g)
    torch = pytest.importorskip("torch")
    w = fastopt.weight_norm(torch.from_numpy(v), torch.from_numpy(g))
    assert isinstance(w, torch.Tensor)
    np.testing.assert_array_equal(w.numpy(), expected)
    jnp = pytest.importorskip("jax.numpy")
    grad_v, grad_g = fastopt.weight_norm_backward(jnp.ones((8, 5)), jnp.asarray(v), jnp.asarray(g))
    assert type(grad_v).__module__.startswith("jax") and grad_g.shape == (8, 1)
    tf = pytest.importorskip("tensorflow")
    w = fastopt.weight_norm(tf.constant(v), tf.constant(g))
    np.testing.assert_array_equal(w.numpy(), expected)


def _bad(v=None, g=None, grad_w=None, dim=0):
    v = np.ones((4, 3), np.float32) if v is None else v
    g = np.ones((4, 1), np.float32) if g is None else g
    grad_w = np.ones(v.shape, np.float32) if grad_w is None else grad_w
    return v, g, grad_w, dim


BAD = [
    (_bad(v=np.array([[1.0, 2.0], [0.0, 0.0]], np.float32), g=np.ones((2, 1), np.float32)),
     ValueError, "v: slice 1 has norm 0"),
    (_bad(v=np.array([[1.0, np.nan]], np.float32), g=np.ones((1, 1), np.float32)),
     ValueError, "v: slice 0 has norm nan"),
    (_bad(g=np.array([[1.0], [np.inf], [1.0], [1.0]], np.float32)), ValueError,
     "g: non-finite value at slice 1"),
    (_bad(g=np.ones(4, np.float32)), ValueError, r"g: expected shape \(4, 1\)"),
    (_bad(dim=-1), ValueError, "dim=None"),
    (_bad(dim=2), ValueError, r"dim must be in \[0, 2\)"),
    (_bad(dim=1.0), TypeError, "dim must be an int"),
    (_bad(g=np.ones((4, 1), np.float64)), ValueError, "g: expected float32"),
    (_bad(v=np.ones((4, 3), np.int32)), TypeError, "v: dtype int32"),
]


@pytest.mark.parametrize("args, error, match", BAD)
def test_bad_input(args, error, match):
    v, g, grad_w, dim = args
    with pytest.raises(error, match=match):
        fastopt.weight_norm(v, g, dim)
    with pytest.raises(error, match=match):
        fastopt.weight_norm_backward(grad_w, v, g, dim)


def test_bad_gradient():
    v, g = np.ones((4, 3), np.float32), np.ones((4, 1), np.float32)
    grad_w = np.ones((4, 3), np.float32)
    grad_w[2, 1] = np.inf
    with pytest.raises(ValueError, match="grad_w: non-finite values in slice 2"):
        fastopt.weight_norm_backward(grad_w, v, g)
    with pytest.raises(ValueError, match="grad_w: expected v's shape"):
        fastopt.weight_norm_backward(np.ones((3, 4), np.float32), v, g)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dim", BIG + CASES)
def test_cupy_identical(shape, dim, rng):
    import cupy
    v = rng.standard_normal(shape).astype(np.float32)
    g = rng.uniform(0.5, 2.0, _g_shape(shape, dim)).astype(np.float32)
    grad_w = rng.standard_normal(shape).astype(np.float32)
    expected = (fastopt.weight_norm(v, g, dim),) + fastopt.weight_norm_backward(grad_w, v, g, dim)
    got = (fastopt.weight_norm(cupy.asarray(v), cupy.asarray(g), dim),) + \
        fastopt.weight_norm_backward(cupy.asarray(grad_w), cupy.asarray(v), cupy.asarray(g), dim)
    for x, y in zip(got, expected):
        np.testing.assert_array_equal(x.get(), y)
