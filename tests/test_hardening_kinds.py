"""Inputs of the wrong kind are refused with a TypeError or ValueError that names the
argument - never an AttributeError, KeyError, OverflowError, ZeroDivisionError or a
framework's own RuntimeError - or, where the result is well defined, accepted."""

import math

import numpy as np
import pytest

import fastopt
from fastopt import distill, init, prune, quant, schedules

# torch warns that kl_div's reduction="mean" will change meaning, that nested and masked
# tensors are prototypes, sparse compressed ones beta and quantized ones deprecated; NumPy
# that np.matrix is discouraged
pytestmark = [pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of:UserWarning"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
              pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")]


def _f32(*shape):
    return np.linspace(-1, 1, math.prod(shape)).astype(np.float32).reshape(shape)


def _kd(**kwargs):
    args = dict(student_logits=_f32(2, 5), teacher_logits=_f32(2, 5) * 2, labels=np.array([0, 4]))
    return distill.kd_loss(**{**args, **kwargs})


# --- kd_loss: an empty batch follows torch; other degenerate shapes are refused -----------

@pytest.mark.parametrize("reduction", distill.REDUCTIONS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_kd_loss_of_an_empty_batch_is_torchs(reduction, with_labels, torch):
    F = torch.nn.functional
    T, alpha = 4.0, 0.9
    labels = np.zeros(0, np.int64) if with_labels else None
    loss, grad = distill.kd_loss(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32),
                                 labels, T, alpha, reduction)
    s = torch.zeros(0, 5, requires_grad=True)
    log_s, log_t = F.log_softmax(s / T, dim=1), F.log_softmax(torch.zeros(0, 5) / T, dim=1)
    want = alpha * T * T * F.kl_div(log_s, log_t, reduction=reduction, log_target=True)
    if reduction == "none":
        want = want.sum(dim=1)
    if with_labels:
        want = want + (1 - alpha) * F.cross_entropy(
            s, torch.zeros(0, dtype=torch.long),
            reduction="mean" if reduction == "batchmean" else reduction)
    want.sum().backward()
    np.testing.assert_equal(np.asarray(loss), want.detach().numpy())  # NaN for the means
    assert grad.shape == tuple(s.grad.shape) == (0, 5) and grad.dtype == np.float32
    if reduction == "none":
        assert loss.shape == (0,) and loss.dtype == np.float64
    else:
        assert type(loss) is float


def test_kd_loss_of_an_empty_batch_keeps_the_framework(torch):
    loss, grad = distill.kd_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0).long(),
                                 reduction="none")
    assert isinstance(loss, torch.Tensor) and loss.shape == (0,)
    assert isinstance(grad, torch.Tensor) and grad.shape == (0, 3)
    assert distill.kd_loss(torch.zeros(0, 3), torch.zeros(0, 3), reduction="sum")[0] == 0.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(student_logits=np.zeros((2, 0), np.float32), teacher_logits=np.zeros((2, 0), np.float32),
          labels=None), ValueError, "student_logits: .* with at least one class"),
    (dict(student_logits=np.zeros((0, 0), np.float32), teacher_logits=np.zeros((0, 0), np.float32),
          labels=None), ValueError, "student_logits: .* with at least one class"),
    (dict(student_logits=_f32(5), teacher_logits=_f32(5)), ValueError, "student_logits"),
    (dict(student_logits=_f32(2, 5, 1), teacher_logits=_f32(2, 5, 1)), ValueError,
     "student_logits"),
    (dict(student_logits=np.float32(1.0)), TypeError, "student_logits: expected an array"),
    (dict(student_logits=[[0.0] * 5] * 2), TypeError, "student_logits: expected an array"),
    (dict(student_logits=None), TypeError, "student_logits: expected an array"),
    (dict(teacher_logits=_f32(3, 5)), ValueError, "teacher_logits"),
    (dict(teacher_logits=_f32(2, 5).astype(np.float64)), ValueError, "teacher_logits"),
    (dict(labels=np.array([True, False])), TypeError, "labels: dtype bool"),
    (dict(labels=np.array([0.0, 1.0], np.float32)), TypeError, "labels: dtype float32"),
    (dict(labels=np.array(["0", "1"])), TypeError, "labels: dtype str"),
    (dict(labels=[0, 1]), TypeError, "labels: expected an array"),
    (dict(labels=np.array([[0], [1]])), ValueError, r"labels: expected shape \(2,\)"),
    (dict(labels=np.array([0, 2**63 + 1], np.uint64)), ValueError, r"labels\[1\]=\d+ is outside"),
    (dict(labels=np.array([-1, 0], np.int8)), ValueError, r"labels\[0\]=-1 is outside"),
    (dict(reduction=np.array(["sum", "mean"])), ValueError, "reduction must be one of"),
    (dict(reduction=np.array(["sum"])), ValueError, "reduction must be one of"),
    (dict(reduction=None), ValueError, "reduction must be one of"),
    (dict(temperature=10**400), ValueError, "temperature must be a finite number"),
    (dict(temperature=np.array(True)), TypeError, "temperature must be a real number"),
    (dict(temperature=np.array([2.0])), TypeError, "temperature must be a real number"),
    (dict(alpha=0.5j), TypeError, "alpha must be a real number"),
])
def test_kd_loss_refuses_degenerate_input_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        _kd(**kwargs)


def test_kd_loss_takes_choices_and_reals_of_numpy_kinds():
    want = _kd(temperature=2.0, alpha=0.5, reduction="sum")
    got = _kd(temperature=np.float32(2.0), alpha=np.array(0.5), reduction=np.str_("sum"))
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert _kd(temperature=np.int64(2))[0] == _kd(temperature=2.0)[0]


# --- arrays the kernels cannot read: sparse, nested, other layouts and devices ----------

TORCH_LAYOUTS = {
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.to_sparse_csr(),
    "sparse_csc": lambda t: t.to_sparse_csc(),
    "sparse_bsr": lambda t: t.to_sparse_bsr((1, 1)),
    "sparse_bsc": lambda t: t.to_sparse_bsc((1, 1)),
    "mkldnn": lambda t: t.to_mkldnn(),
}


def _torch_nested(torch, layout):
    return torch.nested.nested_tensor([torch.zeros(3), torch.zeros(2)], layout=layout)


# a parameter is named as its group's entry where the optimizer checks it when created
ADAM_PARAM = r"(param_groups\[0\]\['params'\]|params)\[0\]"


def _array_calls(torch):
    """(call(x), the name its error must give) for each kind of array argument."""
    dense = torch.zeros(2, 3)
    return [
        (lambda x: fastopt.Adam([x]).step([dense]), ADAM_PARAM),
        (lambda x: fastopt.Adam([torch.zeros(2, 3)]).step([x]), r"grads\[0\]"),
        (lambda x: fastopt.clip_grad_norm_([x], 1.0), r"grads\[0\]"),
        (lambda x: fastopt.clip_grad_value_([x], 1.0), r"grads\[0\]"),
        (lambda x: prune.magnitude_mask(x, 0.5), "w"),
        (lambda x: prune.apply_mask_(dense.clone(), x), "mask"),
        (lambda x: quant.quantize(x, 0.1, 0), "x"),
        (lambda x: quant.qparams(x, "int8"), "x"),
        (lambda x: init.uniform_(x, seed=0), "tensor"),
        (lambda x: init.uniform((2, 3), like=x, seed=0), "like"),
        (lambda x: distill.kd_loss(x, dense), "student_logits"),
        (lambda x: distill.kd_loss(dense, dense, labels=x), "labels"),
        (lambda x: fastopt.weight_norm(x, torch.ones(2, 1)), "v"),
    ]


CALL_IDS = ["Adam-param", "Adam-grad", "clip_grad_norm_", "clip_grad_value_", "magnitude_mask",
            "apply_mask_", "quantize", "qparams", "uniform_", "uniform-like", "kd_loss",
            "kd_loss-labels", "weight_norm"]


@pytest.mark.parametrize("call", range(len(CALL_IDS)), ids=CALL_IDS)
@pytest.mark.parametrize("layout", [*TORCH_LAYOUTS, "nested", "jagged"])
def test_torch_tensors_of_other_layouts_are_refused_by_name(layout, call, torch):
    fn, name = _array_calls(torch)[call]
    if layout in TORCH_LAYOUTS:
        x = TORCH_LAYOUTS[layout](torch.arange(6, dtype=torch.float32).reshape(2, 3))
        fix = r"densify it first: x\.to_dense\(\)"
    else:
        x = _torch_nested(torch, torch.strided if layout == "nested" else torch.jagged)
        fix = r"torch\.nested\.to_padded_tensor"
    with pytest.raises(TypeError, match=rf"^{name}: .*{fix}"):
        fn(x)


def _tf_composite(tf, kind):
    dense = tf.constant(_f32(2, 3))
    if kind == "SparseTensor":
        return tf.sparse.from_dense(dense)
    if kind == "RaggedTensor":
        return tf.RaggedTensor.from_tensor(dense)
    return tf.IndexedSlices(dense, tf.constant([0, 1]), tf.constant([2, 3]))


@pytest.mark.parametrize("kind, fix", [("SparseTensor", r"tf\.sparse\.to_dense\(x\)"),
                                       ("RaggedTensor", r"x\.to_tensor\(\)"),
                                       ("IndexedSlices", r"tf\.convert_to_tensor\(x\)")])
def test_tensorflow_composite_tensors_are_refused_with_the_way_to_densify(kind, fix):
    tf = pytest.importorskip("tensorflow")
    x = _tf_composite(tf, kind)
    for call, name in [(lambda x: fastopt.Adam([tf.zeros((2, 3))]).step([x]), r"grads\[0\]"),
                       (lambda x: prune.magnitude_mask(x, 0.5), "w"),
                       (lambda x: quant.quantize(x, 0.1, 0), "x"),
                       (lambda x: distill.kd_loss(x, x), "student_logits"),
                       (lambda x: fastopt.weight_norm(x, np.ones((2, 1), np.float32)), "v")]:
        with pytest.raises(TypeError, match=rf"^{name}: expected an array .*got {kind}; .*{fix}"):
            call(x)


def test_sparse_arrays_of_jax_and_scipy_are_refused_with_the_way_to_densify():
    jsparse = pytest.importorskip("jax.experimental.sparse")
    scipy_sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match=r"^w: expected an array .*got BCOO; .*x\.todense\(\)"):
        prune.magnitude_mask(jsparse.BCOO.fromdense(np.eye(3, dtype=np.float32)), 0.5)
    with pytest.raises(TypeError, match=r"^w: expected an array .*; .*x\.toarray\(\)"):
        prune.magnitude_mask(scipy_sparse.csr_matrix(np.eye(3, dtype=np.float32)), 0.5)


def _torch_odd(torch, kind):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    if kind == "meta":
        return torch.empty(2, 3, device="meta")
    if kind == "quantized":
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)
    if kind == "complex":
        return t.to(torch.complex64)
    if kind == "masked-subclass":
        return torch.masked.masked_tensor(t, torch.ones(2, 3, dtype=torch.bool))
    if kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            return torch.zeros(2, 3)
    return torch.nn.UninitializedParameter(requires_grad=False)


@pytest.mark.parametrize("kind, error, match", [
    ("meta", TypeError, "arrays on device meta are not supported"),
    ("quantized", TypeError, "dtype qint8 is not supported"),
    ("complex", TypeError, "dtype complex64 is not supported"),
    ("masked-subclass", TypeError, "torch tensor subclass MaskedTensor is not supported"),
    ("fake", TypeError, "torch tensor subclass FakeTensor is not supported"),
    ("uninitialized", TypeError, "this torch tensor has no memory to read .*uninitialized lazy"),
])
def test_odd_torch_tensors_are_refused_by_name(kind, error, match, torch):
    x = _torch_odd(torch, kind)
    for call, name in _array_calls(torch):
        if name in ("labels", "mask") or (name == "like" and "dtype" in match):
            continue  # labels and masks are integers; like's dtype is dtype's default
        with pytest.raises(error, match=rf"^{name}: {match}"):
            call(x)


def test_torch_tensors_traced_by_transforms_are_refused_by_name(torch):
    seen = []

    def inside(x):
        with pytest.raises(TypeError, match=r"^w: this torch tensor has no memory to read"):
            prune.magnitude_mask(x.detach(), 0.5)
        seen.append(True)
        return (x * x).sum()

    torch.vmap(inside)(torch.ones(2, 3))
    torch.func.grad(inside)(torch.ones(3))
    assert len(seen) == 2


@pytest.mark.parametrize("make, error, match", [
    (lambda: np.zeros((2, 3), np.complex64), TypeError, "dtype complex64 is not supported"),
    (lambda: np.zeros((2, 3), object), TypeError, "dtype object is not supported"),
    (lambda: np.full((2, 3), "a"), TypeError, "dtype str32 is not supported"),
    (lambda: np.zeros((2, 3), "datetime64[s]"), TypeError, r"dtype datetime64\[s\] is not"),
    (lambda: np.ma.masked_array(_f32(2, 3), mask=np.eye(2, 3)), TypeError,
     r"masked arrays are not supported \(the mask would be ignored\)"),
    (lambda: np.matrix(_f32(2, 3)), TypeError, r"np\.matrix is not supported.*np\.asarray\(x\)"),
], ids=["complex", "object", "str", "datetime", "masked", "matrix"])
def test_numpy_arrays_of_other_kinds_are_refused_by_name(make, error, match):
    for call, name in [(lambda x: fastopt.Adam([x]).step([_f32(2, 3)]), ADAM_PARAM),
                       (lambda x: fastopt.Adam([_f32(2, 3)]).step([x]), r"grads\[0\]"),
                       (lambda x: fastopt.clip_grad_norm_([x], 1.0), r"grads\[0\]"),
                       (lambda x: prune.magnitude_mask(x, 0.5), "w"),
                       (lambda x: quant.qparams(x, "int8"), "x"),
                       (lambda x: init.normal_(x, seed=0), "tensor"),
                       (lambda x: distill.kd_loss(x, _f32(2, 3)), "student_logits")]:
        x = make()
        before = np.asarray(x).copy()
        with pytest.raises(error, match=rf"^{name}: {match}"):
            call(x)
        np.testing.assert_array_equal(np.asarray(x), before)


@pytest.mark.parametrize("make", [lambda torch: torch.nn.Linear(2, 2),
                                  lambda torch: torch.Size([2, 3]),
                                  lambda torch: torch.float32,
                                  lambda torch: torch.device("cpu")],
                         ids=["Module", "Size", "dtype", "device"])
def test_framework_objects_that_are_not_arrays_are_refused_by_name(make, torch):
    x = make(torch)
    with pytest.raises(TypeError, match=r"^w: expected an array .* got "):
        prune.magnitude_mask(x, 0.5)
    with pytest.raises(TypeError, match=r"params'\]\[0\]: expected an array"):
        fastopt.Adam([x])
    with pytest.raises(TypeError, match=r"^grads\[0\]: expected an array"):
        fastopt.clip_grad_norm_([x], 1.0)


def test_keras_variables_are_refused_with_the_way_to_their_value():
    keras = pytest.importorskip("keras")
    v = keras.Variable(_f32(2, 3))
    with pytest.raises(TypeError, match=r"^w: expected an array .*got Variable; .*x\.value"):
        prune.magnitude_mask(v, 0.5)


def test_jax_arrays_that_cannot_be_read_are_refused_by_name():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with pytest.raises(TypeError, match=r"^w: dtype key<fry> is not supported"):
        prune.magnitude_mask(jax.random.key(0), 0.5)
    gone = jnp.ones(4)
    gone.delete()
    with pytest.raises(ValueError, match=r"^w: this JAX array has been deleted"):
        prune.magnitude_mask(gone, 0.5)
    seen = []

    @jax.jit
    def inside(x):
        with pytest.raises(TypeError, match=r"^w: a traced JAX value \(inside jax\.jit"):
            prune.magnitude_mask(x, 0.5)
        with pytest.raises(TypeError, match=r"^temperature: a traced JAX value"):
            distill.kd_loss(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32),
                            temperature=x[0])
        seen.append(True)
        return x

    inside(jnp.ones(4))
    assert seen == [True]


def test_symbolic_tensorflow_tensors_are_refused_by_name():
    tf = pytest.importorskip("tensorflow")
    seen = []

    @tf.function
    def inside(x):
        with pytest.raises(TypeError, match=r"^w: a symbolic TensorFlow tensor"):
            prune.magnitude_mask(x, 0.5)
        seen.append(True)
        return x

    inside(tf.ones(4))
    assert seen == [True]


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_zero_dim_parameters_step_like_one_element_arrays(fw):
    w0, w1 = np.array(0.5, np.float32), np.array([0.5], np.float32)
    g0, g1 = np.array(2.0, np.float32), np.array([2.0], np.float32)
    if fw == "torch":
        torch = pytest.importorskip("torch")
        w0, g0 = torch.tensor(0.5), torch.tensor(2.0)
    fastopt.Adam([w0], lr=0.1, weight_decay=0.1).step([g0])
    fastopt.Adam([w1], lr=0.1, weight_decay=0.1).step([g1])
    assert tuple(w0.shape) == () and float(w0) == w1[0]
    assert fastopt.clip_grad_norm_([g0], 1.0) == fastopt.clip_grad_norm_([g1], 1.0)


# --- real hyperparameters: NumPy numbers and 0-d arrays, never bools or complex ----------

def _real_calls():
    """(call(value) -> comparable result, name, a valid value) for functions whose real
    argument goes through _check.real."""
    w = _f32(4, 4)
    sgd = fastopt.SGD([_f32(2)], lr=0.1)
    return [
        (lambda v: _kd(temperature=v), "temperature", 2.0),
        (lambda v: _kd(alpha=v), "alpha", 0.5),
        (lambda v: prune.polynomial_sparsity(5, v, 0.8, 0, 10), "initial", 0.5),
        (lambda v: init.constant_(w.copy(), v), "val", 0.5),
        (lambda v: init.uniform_(w.copy(), v, 2.0, seed=0), "a", 0.5),
        (lambda v: init.normal_(w.copy(), std=v, seed=0), "std", 0.5),
        (lambda v: quant.qparams(w, "int8", method="percentile", percentile=v), "percentile",
         99.5),
        (lambda v: schedules.StepLR(sgd, 2, gamma=v).gamma, "gamma", 0.5),
        (lambda v: schedules.linear(v, 0.0, 10)(np.arange(12)), "init_value", 0.5),
    ]


REAL_IDS = ["temperature", "alpha", "initial", "val", "a", "std", "percentile", "gamma",
            "init_value"]


def _make(fw, value):
    """`value` (a Python number) as a number or 0-d array of framework `fw`."""
    if fw == "python":
        return value
    if fw == "numpy-scalar":  # np.float32 for floats, np.bool_, np.complex128
        return np.asarray(value, np.float32 if type(value) is float else None)[()]
    if fw == "numpy":
        return np.array(value)
    if fw == "torch":
        return pytest.importorskip("torch").tensor(value)
    if fw == "jax":
        return pytest.importorskip("jax").numpy.asarray(value)
    return pytest.importorskip("tensorflow").constant(value)


FRAMEWORKS = ["python", "numpy-scalar", "numpy", "torch", "jax", "tensorflow"]


@pytest.mark.parametrize("call", range(len(REAL_IDS)), ids=REAL_IDS)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_real_arguments_refuse_booleans_of_every_kind(fw, call):
    fn, name, _ = _real_calls()[call]
    with pytest.raises(TypeError, match=rf"^{name} must be a real number"):
        fn(_make(fw, True))


@pytest.mark.parametrize("call", range(len(REAL_IDS)), ids=REAL_IDS)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_real_arguments_refuse_complex_numbers(fw, call):
    fn, name, good = _real_calls()[call]
    with pytest.raises(TypeError, match=rf"^{name} must be a real number"):
        fn(_make(fw, complex(good)))


@pytest.mark.parametrize("call", range(len(REAL_IDS)), ids=REAL_IDS)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_real_arguments_take_numbers_and_0d_arrays_of_every_kind(fw, call):
    fn, _, good = _real_calls()[call]
    want, got = fn(good), fn(_make(fw, good))
    for a, b in zip(*((x if isinstance(x, tuple) else (x,)) for x in (want, got))):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("call", range(len(REAL_IDS)), ids=REAL_IDS)
@pytest.mark.parametrize("bad", [10**400, -10**400, float("nan"), float("inf"), np.float64("nan")],
                         ids=["10**400", "-10**400", "nan", "inf", "np-nan"])
def test_real_arguments_refuse_huge_and_non_finite_numbers(bad, call):
    fn, name, _ = _real_calls()[call]
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        fn(bad)


@pytest.mark.parametrize("bad, match", [
    (lambda torch: torch.tensor(0.5, device="meta"), "{name}: arrays on device meta"),
    (lambda torch: torch.tensor(0.5).to_sparse(), "{name}: torch tensors of layout torch.sparse"),
    (lambda torch: torch.tensor([0.5, 0.5]), "{name} must be a real number"),
    (lambda torch: torch.tensor(True), "{name} must be a real number"),
], ids=["meta", "sparse", "1-d", "bool"])
def test_real_arguments_refuse_tensors_that_are_not_real_scalars(bad, match, torch):
    for fn, name, _ in _real_calls():
        with pytest.raises(TypeError, match="^" + match.format(name=name)):
            fn(bad(torch))


@pytest.mark.parametrize("bad", [True, np.array(True), np.True_, 0.1j, np.array(0.1 + 0j)],
                         ids=["True", "np-0d-bool", "np.bool_", "complex", "np-0d-complex"])
@pytest.mark.parametrize("key", ["lr", "weight_decay", "eps"])
def test_optimizer_hyperparameters_refuse_booleans_and_complex(key, bad):
    with pytest.raises(TypeError, match=rf"{key} must be a real number"):
        fastopt.Adam([_f32(3)], **{key: bad})


def test_optimizer_hyperparameters_refuse_torch_booleans_and_meta_scalars(torch):
    for bad in (torch.tensor(True), torch.tensor(0.1, device="meta")):
        with pytest.raises(TypeError, match="lr"):
            fastopt.Adam([_f32(3)], lr=bad)


def test_optimizer_hyperparameters_take_numpy_scalars():
    opt = fastopt.Adam([_f32(3)], lr=np.float32(0.25), betas=(np.float64(0.5), 0.9),
                       weight_decay=np.int64(0))
    opt.step([np.ones(3, np.float32)])
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ValueError, match="lr must be a finite number"):
        fastopt.Adam([_f32(3)], lr=10**400)


# --- choices and counts ------------------------------------------------------------------

def _choice_calls():
    w = _f32(4, 4)
    return [
        (lambda v: _kd(reduction=v), "reduction"),
        (lambda v: prune.magnitude_mask(w, 0.5, dtype=v), "dtype"),
        (lambda v: init.kaiming_uniform_(w.copy(), mode=v, seed=0), "mode"),
        (lambda v: quant.qparams(w, "int8", method=v), "method"),
        (lambda v: schedules.one_cycle(10, 0.1, anneal_strategy=v), "anneal_strategy"),
        (lambda v: schedules.ReduceLROnPlateau(fastopt.SGD([_f32(2)], lr=0.1), mode=v), "mode"),
    ]


@pytest.mark.parametrize("call", range(6), ids=["reduction", "mask dtype", "init mode",
                                                "qparams method", "anneal_strategy",
                                                "plateau mode"])
@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array(["a"]), None, 1, ["a"], {}],
                         ids=["2 strings", "1 string", "None", "int", "list", "dict"])
def test_choices_refuse_other_kinds_by_name(bad, call):
    fn, name = _choice_calls()[call]
    with pytest.raises(ValueError, match=rf"^{name} must be one of"):
        fn(bad)


def test_choices_take_numpy_strings_and_dtypes():
    w = _f32(4, 4)
    want = prune.magnitude_mask(w, 0.5, dtype="uint8")
    for dtype in (np.str_("uint8"), np.dtype("uint8")):
        np.testing.assert_array_equal(prune.magnitude_mask(w, 0.5, dtype=dtype), want)
    assert schedules.ReduceLROnPlateau(fastopt.SGD([_f32(2)], lr=0.1),
                                       mode=np.str_("max")).mode == "max"


@pytest.mark.parametrize("bad, error", [(10**400, ValueError), (0, ValueError), (2**31, ValueError),
                                        (np.float64(2.0), TypeError), (float("nan"), TypeError),
                                        (np.True_, TypeError), (True, TypeError),
                                        (np.array(2.5), TypeError), ("2", TypeError),
                                        (None, TypeError)])
def test_thread_counts_take_numpy_integers_and_refuse_other_kinds(bad, error):
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(np.int64(2))
        assert fastopt.get_num_threads() == 2 and type(fastopt.get_num_threads()) is int
        with pytest.raises(error, match=r"^n must be an integer >= 1"):
            fastopt.set_num_threads(bad)
        assert fastopt.get_num_threads() == 2
    finally:
        fastopt.set_num_threads(before)
