"""Real round trips with PyTorch, JAX and TensorFlow arrays."""

import numpy as np
import pytest
from conftest import CPU_BACKENDS, require_backend

import fastopt

SHAPES = [(4, 3), (7,), (0,), (2, 2, 2)]


def numpy_run(name, kw, steps, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    start = [p.copy() for p in params]
    opt = getattr(fastopt, name)(params, backend="numpy", **kw)
    for g in grads:
        opt.step(g)
    return start, grads, params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_in_place_zero_copy(backend):
    torch = pytest.importorskip("torch")
    require_backend(backend)
    start, grads, want = numpy_run("Adam", dict(lr=0.01, amsgrad=True), 5)
    params = [torch.tensor(p) for p in start]
    ptrs = [p.data_ptr() for p in params]
    opt = fastopt.Adam(params, lr=0.01, amsgrad=True, backend=backend)
    for g in grads:
        returned = opt.step([torch.tensor(x) for x in g])
        assert all(r is p for r, p in zip(returned, params))
    assert [p.data_ptr() for p in params] == ptrs
    for p, w in zip(params, want):
        np.testing.assert_array_equal(p.numpy(), w)


def test_torch_module_parameters_detached():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    opt = fastopt.SGD([p.detach() for p in model.parameters()], lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x = torch.randn(8, 5)
    for _ in range(5):
        for m in (model, reference):
            m.zero_grad()
            m(x).square().mean().backward()
        opt.step([p.grad for p in model.parameters()])
        topt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_torch_grad_views_are_accepted():
    torch = pytest.importorskip("torch")
    p = torch.zeros(3, 4)
    g = torch.arange(12.0).reshape(4, 3).t()  # non-contiguous: copied, not refused
    fastopt.SGD([p], lr=1.0).step([g])
    np.testing.assert_array_equal(p.numpy(), -g.numpy())
    p2 = torch.zeros(3)
    fastopt.SGD([p2], lr=1.0).step([torch.ones(3)._neg_view()])  # lazy negation resolved
    np.testing.assert_array_equal(p2.numpy(), np.ones(3, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (2, 3, 4), (1,) * 33 + (2,)])
def test_torch_gradients_are_read_in_place(dtype, shape):
    """A plain torch gradient is read where it lies (a view made in C, not x.numpy()):
    its own memory, at its storage offset, kept alive by the view, of any shape (an empty
    one, or one of more than 32 dims, through x.numpy())."""
    from fastopt import _interop
    torch = pytest.importorskip("torch")
    n = max(1, int(np.prod(shape)))
    base = torch.arange(n + 3, dtype=getattr(torch, dtype))
    g = base[3:].reshape(shape) if shape != (0, 3) else torch.zeros(shape, dtype=base.dtype)
    view = _interop.import_grad(g, "grads", 0).array
    assert view.dtype == np.dtype(dtype) and view.shape == shape and view.flags.c_contiguous
    if view.size:
        assert view.__array_interface__["data"][0] == g.data_ptr()
    np.testing.assert_array_equal(view, g.numpy())
    del g, base
    expected = np.arange(3, n + 3, dtype=dtype)[:view.size].reshape(view.shape)
    np.testing.assert_array_equal(view, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jax_returns_new_arrays(backend):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    require_backend(backend)
    start, grads, want = numpy_run("AdamW", dict(lr=0.01), 4)
    params = [jnp.asarray(p) for p in start]
    originals = [np.array(p) for p in params]
    opt = fastopt.AdamW(params, lr=0.01, backend=backend)
    current = params
    for g in grads:
        previous = current
        current = opt.step([jnp.asarray(x) for x in g])
        assert all(isinstance(c, jax.Array) for c in current)
        assert all(c is not p for c, p in zip(current, previous))
    for p, o in zip(params, originals):  # the arrays the user passed in are untouched
        np.testing.assert_array_equal(np.asarray(p), o)
    for c, w in zip(current, want):
        assert c.shape == w.shape and c.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(c), w)
    assert opt.params() == current


def test_jax_hand_back_is_zero_copy_and_aligned():
    jax = pytest.importorskip("jax")
    p = jax.numpy.ones(1000, dtype=jax.numpy.float32)
    (new,) = fastopt.SGD([p], lr=0.5).step([jax.numpy.ones(1000, dtype=jax.numpy.float32)])
    assert np.from_dlpack(new).ctypes.data % 64 == 0
    np.testing.assert_array_equal(np.asarray(new), np.full(1000, 0.5, np.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensorflow_returns_new_tensors(backend):
    tf = pytest.importorskip("tensorflow")
    require_backend(backend)
    start, grads, want = numpy_run("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), 4,
                                   dtype=np.float64)
    params = [tf.constant(p) for p in start]
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    current = params
    for g in grads:
        current = opt.step([tf.constant(x) for x in g])
    for p, s in zip(params, start):
        np.testing.assert_array_equal(p.numpy(), s)
    for c, w in zip(current, want):
        assert isinstance(c, tf.Tensor) and c.dtype == tf.float64
        np.testing.assert_array_equal(c.numpy(), w)
        # further TF math on the handed-back buffer works (a misaligned one would abort)
        np.testing.assert_allclose(tf.reduce_sum(c * 2.0).numpy(), 2 * w.sum())


def test_tensorflow_variables_are_read_not_written():
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(np.ones(3, np.float32))
    (new,) = fastopt.SGD([v], lr=1.0).step([tf.ones(3)])
    np.testing.assert_array_equal(v.numpy(), np.ones(3, np.float32))
    np.testing.assert_array_equal(new.numpy(), np.zeros(3, np.float32))


def test_torch_cpu_tensor_on_cupy_backend_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError,
                       match="backend 'cupy' runs on cuda arrays, but the arrays are on cpu"):
        fastopt.SGD([torch.zeros(2)], lr=0.1, backend="cupy").step([torch.zeros(2)])


def test_torch_parameter_memory_replaced_between_steps():
    """A parameter's checked view is reused only while it is the same memory."""
    torch = pytest.importorskip("torch")
    p = torch.zeros(4)
    opt = fastopt.SGD([p], lr=1.0)
    opt.step([torch.ones(4)])
    p.data = torch.full((4,), 10.0)  # new storage, same shape: the step must update it
    opt.step([torch.ones(4)])
    np.testing.assert_array_equal(p.numpy(), np.full(4, 9.0, np.float32))
    adam = fastopt.Adam([p], lr=1.0)
    adam.step([torch.ones(4)])
    p.set_(torch.zeros(6))  # another shape: its state no longer fits
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\]: dtype float32 and shape "
                                         r"\(4,\) do not fit its parameter"):
        adam.step([torch.ones(6)])
    p.requires_grad_(True)
    with pytest.raises(TypeError, match="requires grad"):
        opt.step([torch.ones(6)])
