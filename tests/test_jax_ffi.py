"""fastopt's kernels inside jax.jit through XLA's FFI (fastopt._jax_ffi, kernels/cpu/xla_loops.h):
the FFI declarations against jaxlib's header, bit-identity with the Cython backend, in-place
steps with donation, errors from the Python checks and from the C handler, concurrency."""

import functools
import math
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cases import RULE_OF, kernel_hyper

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from fastopt import _jax_ffi, _rules, _scalars  # noqa: E402
from fastopt._backends import _cython  # noqa: E402
from fastopt._backends._layout import CHUNK  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
INF = math.inf
# a multi-chunk tensor (16384 elements a chunk) that takes two threads, a small one, a 0-d
# one and an empty one
SHAPES = ((70001,), (3, 5, 7), (), (0, 4))


def _hyper(kernel, dtype):
    """Host scalars of `kernel` with the features that change its arithmetic turned on."""
    rule = RULE_OF[kernel]
    scalars = rule.scalars(dtype, **kernel_hyper(kernel, 3))
    return scalars[0] if rule.driver is not None else scalars  # Lamb: its update pass


def _case(kernel, dtype, shapes=SHAPES, seed=0):
    """Parameters, gradients and (non-negative: some are second moments) state."""
    rng = np.random.default_rng(seed)
    n_state = _jax_ffi.KERNELS[kernel]
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    grads = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    states = [[np.asarray(np.abs(rng.standard_normal(s)), dtype) for _ in range(n_state)]
              for s in shapes]
    return params, grads, states


def _reference(kernel, scalars, params, grads, states):
    """The Cython backend's step on copies: (params, states)."""
    dtype = params[0].dtype
    p = [x.copy() for x in params]
    s = [[x.copy() for x in ss] for ss in states]
    operands = (p, p, list(grads)) + tuple([ss[k] for ss in s]
                                           for k in range(_jax_ffi.KERNELS[kernel]))
    _cython.elementwise(kernel, operands, _rules.KERNELS[kernel].args.record(dtype, scalars), 1)
    return p, s


def _assert_bits(got, want):
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape
    word = np.uint32 if want.dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(got.view(word), want.view(word))


def _assert_step(got, want):
    (gp, gs), (wp, ws) = got, want
    assert len(gp) == len(wp) and len(gs) == len(ws)
    for x, y in zip(gp, wp):
        _assert_bits(x, y)
    for xs, ys in zip(gs, ws):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            _assert_bits(x, y)


@pytest.fixture
def x64():
    """float64 in jax for one test, restored after it."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# -- the declarations of fastopt/xla_ffi.h are XLA's ABI --------------------------------

# (ours, XLA's, members (a name, or (ours, XLA's) where they differ), what we declare):
# "all" of a struct XLA gives no counted size; "counted": all of it, XLA's counted size
# ending at our last member; "prefix": its leading members (XLA_FFI_Api, up to the one
# function called); "counted prefix": exactly the members XLA's counted size covers
ABI_STRUCTS = (
    ("fo_xla_extension_base", "XLA_FFI_Extension_Base",
     ("struct_size", "type", "next"), "counted"),
    ("fo_xla_api_version", "XLA_FFI_Api_Version",
     ("struct_size", "extension_start", "major_version", "minor_version"), "counted"),
    ("fo_xla_error_create_args", "XLA_FFI_Error_Create_Args",
     ("struct_size", "extension_start", "message", "errc"), "counted"),
    ("fo_xla_api", "XLA_FFI_Api",
     ("struct_size", "extension_start", "api_version", "internal_api",
      ("error_create", "XLA_FFI_Error_Create")), "prefix"),
    ("fo_xla_buffer", "XLA_FFI_Buffer",
     ("struct_size", "extension_start", "dtype", "data", "rank", "dims"), "counted"),
    ("fo_xla_bytespan", "XLA_FFI_ByteSpan", ("ptr", "len"), "all"),
    ("fo_xla_scalar", "XLA_FFI_Scalar", ("dtype", "value"), "all"),
    ("fo_xla_args", "XLA_FFI_Args",
     ("struct_size", "extension_start", "size", "types", "args"), "counted"),
    ("fo_xla_rets", "XLA_FFI_Rets",
     ("struct_size", "extension_start", "size", "types", "rets"), "counted"),
    ("fo_xla_attrs", "XLA_FFI_Attrs",
     ("struct_size", "extension_start", "size", "types", "names", "attrs"), "counted"),
    ("fo_xla_call_frame", "XLA_FFI_CallFrame",
     ("struct_size", "extension_start", "api", "ctx", "stage", "args", "rets", "attrs"),
     "counted prefix"),
    ("fo_xla_metadata", "XLA_FFI_Metadata",
     ("struct_size", "api_version", "traits"), "counted prefix"),
    ("fo_xla_metadata_extension", "XLA_FFI_Metadata_Extension",
     ("extension_base", "metadata"), "counted"),
)
ABI_VALUES = (
    ("FO_XLA_API_MAJOR", "XLA_FFI_API_MAJOR"),
    ("FO_XLA_API_MINOR", "XLA_FFI_API_MINOR"),
    ("FO_XLA_EXTENSION_METADATA", "XLA_FFI_Extension_Metadata"),
    ("FO_XLA_ERROR_INVALID_ARGUMENT", "XLA_FFI_Error_Code_INVALID_ARGUMENT"),
    ("FO_XLA_ERROR_RESOURCE_EXHAUSTED", "XLA_FFI_Error_Code_RESOURCE_EXHAUSTED"),
    *((f"FO_XLA_{t}", f"XLA_FFI_DataType_{t}")
      for t in ("S32", "S64", "U8", "F16", "F32", "F64", "BF16")),
    ("FO_XLA_ARG_BUFFER", "XLA_FFI_ArgType_BUFFER"),
    ("FO_XLA_RET_BUFFER", "XLA_FFI_RetType_BUFFER"),
    ("FO_XLA_ATTR_SCALAR", "XLA_FFI_AttrType_SCALAR"),
    ("FO_XLA_ATTR_STRING", "XLA_FFI_AttrType_STRING"),
    *((f"FO_XLA_STAGE_{s}", f"XLA_FFI_ExecutionStage_{s}")
      for s in ("INSTANTIATE", "PREPARE", "INITIALIZE", "EXECUTE")),
)


def test_declarations_match_jaxlib_header(tmp_path):
    """Compiled next to jaxlib's xla/ffi/api/c_api.h: every struct we declare has XLA's
    member offsets and sizes, and its size or counted size as ABI_STRUCTS says; every enum
    value and version number is XLA's; no name clashes."""
    if not (Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h").is_file():
        pytest.skip("jaxlib ships no XLA FFI headers")
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    checks = []
    for ours, theirs, members, declared in ABI_STRUCTS:
        pairs = [m if isinstance(m, tuple) else (m, m) for m in members]
        for a, b in pairs:
            checks.append(f"offsetof({ours}, {a}) == offsetof({theirs}, {b}) && "
                          f"sizeof((({ours} *)0)->{a}) == sizeof((({theirs} *)0)->{b})")
        if declared == "all" or declared == "counted":
            checks.append(f"sizeof({ours}) == sizeof({theirs})")
        if "counted" in declared:
            checks.append(f"FO_XLA_STRUCT_SIZE({ours}, {pairs[-1][0]}) == {theirs}_STRUCT_SIZE")
    checks += [f"(long long){a} == (long long){b}" for a, b in ABI_VALUES]
    source = tmp_path / "abi.c"
    source.write_text("#include <stddef.h>\n#include \"xla/ffi/api/c_api.h\"\n"
                      "#include \"fastopt/xla_ffi.h\"\n"
                      + "".join(f"_Static_assert({c}, \"{c}\");\n" for c in checks))
    proc = subprocess.run(["cc", "-std=c11", "-fsyntax-only", "-Wall", "-Werror",
                           f"-I{jax.ffi.include_dir()}", f"-I{KERNELS_DIR / 'include'}",
                           str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


HARNESS = r"""
#include <stdio.h>
#include "xla_loops.h"
/* a frame that only the metadata check or the stage check may read */
static int check(fo_xla_call_frame *call) { return fo_xla_elementwise(call) == NULL; }
int main(void)
{
    fo_xla_metadata m = {FO_XLA_STRUCT_SIZE(fo_xla_metadata, traits), {0}, 7};
    fo_xla_metadata_extension ext = {{FO_XLA_STRUCT_SIZE(fo_xla_metadata_extension, metadata),
                                      FO_XLA_EXTENSION_METADATA, NULL}, &m};
    fo_xla_call_frame call;
    int ok;
    memset(&call, 0, sizeof call);
    call.struct_size = FO_XLA_STRUCT_SIZE(fo_xla_call_frame, attrs);
    call.extension_start = &ext.extension_base;
    ok = check(&call);
    printf("metadata %d %d.%d traits %u sized %d\n", ok,
           m.api_version.major_version, m.api_version.minor_version, m.traits,
           m.api_version.struct_size == FO_XLA_STRUCT_SIZE(fo_xla_api_version, minor_version));
    m.struct_size = 8; /* too small for the version: left unset, XLA then refuses it */
    m.api_version.minor_version = -1;
    ok = check(&call);
    printf("small %d %d\n", ok, m.api_version.minor_version);
    call.extension_start = NULL;
    call.args.size = -5; /* would be an error if read */
    call.stage = FO_XLA_STAGE_PREPARE;
    printf("prepare %d\n", check(&call));
    call.stage = FO_XLA_STAGE_INSTANTIATE;
    printf("instantiate %d\n", check(&call));
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_handler_metadata_and_other_stages(tmp_path):
    """The registration-time metadata call fills in the API version (0.3, no traits) without
    touching the rest of the frame, and the handler does nothing outside the execute stage;
    no jax involved."""
    source = tmp_path / "harness.c"
    source.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(["cc", "-std=c99", "-O1", f"-I{KERNELS_DIR / 'include'}",
                    f"-I{KERNELS_DIR / 'cpu'}", str(source), "-o", str(exe), "-lm"], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    assert out.splitlines() == [
        "metadata 1 0.3 traits 0 sized 1", "small 1 -1", "prepare 1", "instantiate 1"]


# -- the handler computes what the Cython backend computes -----------------------------

def test_kernel_list_is_the_table():
    assert _jax_ffi.KERNELS == {name: len(k.state) for name, k in
                                {**_rules.KERNELS, **_rules.CAUTIOUS_KERNELS}.items()} | {
                                    "scaled_apply": 1}
    assert _jax_ffi.COUNTS == {c.count.name: len(c.count.state) for rule in _rules.RULES
                               for c in rule.cautious}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("delta", [False, True])
def test_scaled_apply_is_the_cython_pass(dtype, delta, x64):
    """Lamb's apply pass p decay + scale (u k), k one factor per tensor after the update in
    the gradient slot: the Cython backend's bits (with delta, the new parameters minus the
    old, rounded once)."""
    rng = np.random.default_rng(3)
    params = [np.asarray(rng.standard_normal(s), dtype) for s in SHAPES]
    updates = [np.asarray(rng.standard_normal(s), dtype) for s in SHAPES]
    factors = [np.asarray(rng.uniform(0.5, 2.0, 1), dtype) for _ in SHAPES]
    scalars = dict(decay=0.999, scale=-0.01)
    record = _rules.ALL_KERNELS["scaled_apply"].args.record(dtype, scalars)
    want = [p.copy() for p in params]
    _cython.elementwise("scaled_apply", (want, want, updates, factors), record, 1, n_aux=1)
    got, states = _jax_ffi.elementwise(
        "scaled_apply", _jax_ffi.record_bytes(_rules.ALL_KERNELS["scaled_apply"].args, dtype,
                                              scalars),
        [jnp.asarray(p) for p in params], [jnp.asarray(u) for u in updates],
        [[jnp.asarray(k)] for k in factors], 2, delta=delta)
    assert states == [[] for _ in SHAPES]
    for g, w, p in zip(got, want, params):
        _assert_bits(g, (w - p).astype(dtype) if delta else w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_into_grad_writes_the_new_parameters_over_the_gradients(dtype, x64):
    """into_grad: each "new parameter" (Lamb's update direction) is the Cython pass's, bit
    for bit, written in the gradient's buffer when the gradient (and the state) is donated:
    the parameters are only read, nothing is copied; with masks too; not with delta."""
    scalars = _hyper("lamb_update", dtype)
    # no empty tensor: XLA makes its arrays constants, which it copies
    params, grads, states = _case("lamb_update", dtype, shapes=SHAPES[:3])
    masks = [np.arange(p.size).reshape(p.shape) % 3 != 0 for p in params]
    record = _rules.KERNELS["lamb_update"].args.record(dtype, scalars)
    want = [np.empty_like(p) for p in params]
    want_states = [[x.copy() for x in ss] for ss in states]
    _cython.elementwise("lamb_update", (params, want, grads) + tuple(
        [ss[k] for ss in want_states] for k in range(2)), record, 1,
        masks=[m.astype(np.uint8).reshape(-1) for m in masks])
    packed = _jax_ffi.record_bytes(_rules.LAMB_ARGS, dtype, scalars)

    def run(p, g, s):
        return _jax_ffi.elementwise("lamb_update", packed, p, g, s, 2, masks=masks,
                                    into_grad=True)
    jp, jg = [jnp.asarray(p) for p in params], [jnp.asarray(g) for g in grads]
    js = [[jnp.asarray(x) for x in ss] for ss in states]
    text = jax.jit(run, donate_argnums=(1, 2)).lower(jp, jg, js).compile().as_text()
    assert not re.search(r"\scopy(-start)?\(", text), text
    grad_buffers = [g.unsafe_buffer_pointer() for g in jg]
    got, got_states = jax.jit(run, donate_argnums=(1, 2))(jp, jg, js)
    assert [g.unsafe_buffer_pointer() for g in got] == grad_buffers
    for g, w in zip(got, want):
        _assert_bits(g, w)
    for gs, ws in zip(got_states, want_states):
        for g, w in zip(gs, ws):
            _assert_bits(g, w)
    with pytest.raises(ValueError, match="into_grad: not with delta or formats"):
        _jax_ffi.elementwise("lamb_update", packed, jp, jp, js, 1, delta=True, into_grad=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel, sums, discard", [
    ("prodigy_update", ((1, 3), (3, 1)), True),  # Prodigy's terms and |s|
    ("prodigy_update_nom", ((1, 3), (3, 1), (0, 2), (5, 2)), True),  # p, v too
    ("lamb_update", ((1, 2), (4, 2), (2, 1)), False),  # u, v, g
    ("lamb_update", ((0, 2), (1, 2)), "into_grad"),  # Lamb's norms of p and u
])
def test_sums_are_the_cython_drivers(kernel, sums, discard, dtype, x64):
    """sums: each tensor's sums of the pass's operands as the Cython driver's step_sums
    gives them (per chunk, then _scalars.tensor_sums), rounded once to jax's default float,
    pruned entries zeroed first; the state (and without discard the new parameters) bit for
    bit; with discard, no parameter result and nothing aliased to the gradients, which a
    donated jitted call then leaves in place (no copies); with into_grad, the new
    parameters over the gradients, the parameters read only."""
    scalars = _hyper(kernel, dtype)
    params, grads, states = _case(kernel, dtype, shapes=SHAPES[:3])
    masks = [np.arange(p.size).reshape(p.shape) % 3 != 0 for p in params]
    record = _rules.KERNELS[kernel].args.record(dtype, scalars)
    n_state = _jax_ffi.KERNELS[kernel]
    want = [np.empty_like(p) for p in params]
    want_states = [[x.copy() for x in ss] for ss in states]
    partials = _cython.pass_sums(kernel, (params, want, grads) + tuple(
        [ss[k] for ss in want_states] for k in range(n_state)), record, 1, sums,
        masks=[m.astype(np.uint8).reshape(-1) for m in masks], discard=discard is True)
    totals = np.array([_scalars.tensor_sums(partials[:, j], [p.size for p in params],
                                            CHUNK) for j in range(len(sums))]).T
    packed = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, dtype, scalars)

    def run(p, g, s):
        return _jax_ffi.elementwise(kernel, packed, p, g, s, 2, masks=masks, sums=sums,
                                    discard=discard is True,
                                    into_grad=discard == "into_grad")
    jp, jg = [jnp.asarray(p) for p in params], [jnp.asarray(g) for g in grads]
    js = [[jnp.asarray(x) for x in ss] for ss in states]
    if discard:  # the state donated, and with into_grad the gradients (over which the
        # new parameters go); the parameters are no results
        donated = (1, 2) if discard == "into_grad" else 2
        text = jax.jit(run, donate_argnums=donated).lower(jp, jg, js).compile().as_text()
        assert not re.search(r"\scopy(-start)?\(", text), text
    got, got_states, got_sums = jax.jit(run)(jp, jg, js)
    assert (got is None) == (discard is True)
    for g, w in zip(got or (), want):
        _assert_bits(g, w)
    for gs, ws in zip(got_states, want_states):
        for g, w in zip(gs, ws):
            _assert_bits(g, w)
    _assert_bits(got_sums, totals.astype(jnp.result_type(float)))


def test_guard_skips_the_step(x64):
    """guard: true, the step as without it; false (traced or concrete), every result its
    input bit for bit (inf and NaN entries too), with delta +0, the counts and the sums 0;
    with the parameters and state donated, in place (the same buffers, no copy or
    conditional in the compiled program). A guard that is not a 0-d bool or integer is
    refused."""
    dtype = np.float64
    params, grads, states = _case("adam", dtype, shapes=SHAPES[:3])
    params[0][:3] = [INF, -INF, np.nan]
    scalars = _hyper("adam", dtype)
    packed = _jax_ffi.record_bytes(_rules.ADAM_ARGS, dtype, scalars)
    want = _reference("adam", scalars, params, grads, states)

    def run(p, g, s, guard, **options):
        return _jax_ffi.elementwise("adam", packed, p, g, s, 2, guard=guard, **options)
    _assert_step(run(params, grads, states, True), want)
    _assert_step(jax.jit(run)(params, grads, states, jnp.asarray(1, jnp.int32)), want)
    for guard in (False, jnp.asarray(False)):
        _assert_step(jax.jit(run)(params, grads, states, guard), (params, states))
        deltas, kept = run(params, grads, states, guard, delta=True)
        for d, p in zip(deltas, params):
            _assert_bits(d, np.zeros_like(p))
        _assert_step(([], kept), ([], states))

    jp, jg = [jnp.asarray(p) for p in params], [jnp.asarray(g) for g in grads]
    js = [[jnp.asarray(x) for x in ss] for ss in states]
    step = jax.jit(run, donate_argnums=(0, 2))
    text = step.lower(jp, jg, js, jnp.asarray(False)).compile().as_text()
    assert not re.search(r"\scopy(-start)?\(|conditional", text), text
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((jp, js))]
    got = step(jp, jg, js, jnp.asarray(False))
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(got)] == buffers
    _assert_step(got, (params, states))

    # Lamb's update pass (into_grad, sums) and Prodigy's (discard), the cautious count
    lamb, prodigy = (_jax_ffi.record_bytes(_rules.KERNELS[k].args, dtype, _hyper(k, dtype))
                     for k in ("lamb_update", "prodigy_update"))
    new, kept, sums = _jax_ffi.elementwise("lamb_update", lamb, params, grads, states, 2,
                                           into_grad=True, sums=((0, 2), (1, 2)), guard=False)
    _assert_step((new, kept), (params, states))
    _assert_bits(sums, np.zeros((len(params), 2)))
    p_states = _case("prodigy_update", dtype, shapes=SHAPES[:3])[2]
    none, kept, sums = _jax_ffi.elementwise("prodigy_update", prodigy, params, grads, p_states,
                                            2, sums=((1, 3), (3, 1)), discard=True,
                                            guard=False)
    assert none is None
    _assert_step(([], kept), ([], p_states))
    _assert_bits(sums, np.zeros((len(params), 2)))
    counts = _jax_ffi.caution_counts("adam_caution", _jax_ffi.record_bytes(
        _rules.ADAM_ARGS, dtype, scalars), params, grads, [ss[:1] for ss in states], 2,
        guard=False)
    np.testing.assert_array_equal(counts, np.zeros(len(params), np.int32))

    for bad in (jnp.zeros(2, bool), jnp.asarray(0.0)):
        with pytest.raises(TypeError, match="guard: expected a 0-d bool or integer"):
            run(params, grads, states, bad)


def test_sums_checks():
    params, grads, states = _case("prodigy_update", np.float32, shapes=SHAPES[:1])
    packed = _jax_ffi.record_bytes(_rules.KERNELS["prodigy_update"].args, np.float32,
                                   _hyper("prodigy_update", np.float32))
    call = functools.partial(_jax_ffi.elementwise, "prodigy_update", packed, params, grads,
                             states, 1)
    for kwargs, match in [
            (dict(discard=True), "discard: only with sums"),
            (dict(sums=((1, 0),)), r"sums: expected up to 4 \(operand, kind\) pairs"),
            (dict(sums=((7, 1),)), "each operand below 7"),
            (dict(sums=((1, 1),) * 5), "up to 4"),
            (dict(sums=((1, 1),), delta=True), "sums: not with delta or formats"),
            (dict(sums=((1, 1),), discard=1), "discard: expected a bool"),
            (dict(sums=((0, 2),)), "operand 0 .the parameter. only with discard or into_grad"),
            (dict(sums=((2, 1),), into_grad=True), "operand 2 .the gradient. not with into_grad")]:
        with pytest.raises((ValueError, TypeError), match=match):
            call(**kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("caution", [c for rule in _rules.RULES for c in rule.cautious
                                     if rule.name != "AdamW"],  # AdamW's are Adam's
                         ids=lambda c: c.base)
def test_cautious_count_and_step_are_the_cython_drivers(caution, dtype, x64):
    """The count pass (count=1: an int32 count per tensor, nothing written; with pruning
    masks, of the kept entries) and the cautious step with each tensor's factor as its last
    operand: the Cython driver's counts and bits, on 1 and 2 threads."""
    base = _rules.KERNELS[caution.base]
    scalars = _hyper(caution.base, dtype)
    params, grads, states = _case(caution.base, dtype, seed=5)
    states = [[np.asarray(s - 0.5) for s in ss] for ss in states]  # both signs: K varies
    record = _jax_ffi.record_bytes(base.args, dtype, scalars)
    reads = [base.state.index(name) for name in caution.count.state]
    counted = [[ss[i] for i in reads] for ss in states]
    want_counts = _cython.caution_counts(
        caution.count.name, (params, params, grads) + tuple(
            [ss[k] for ss in counted] for k in range(len(reads))),
        caution.count.args.record(dtype, scalars), 1)
    assert 0 < sum(want_counts) < sum(p.size for p in params)
    rng = np.random.default_rng(6)
    masks = [np.asarray(rng.random(p.shape) > 0.4) for p in params]
    kept, rest = (_cython.caution_counts(
        caution.count.name, (params, params, grads) + tuple(
            [ss[k] for ss in counted] for k in range(len(reads))),
        caution.count.args.record(dtype, scalars), 2, [np.asarray(m, np.uint8) for m in ms])
        for ms in (masks, [~m for m in masks]))
    np.testing.assert_array_equal(kept + rest, want_counts)  # each agreeing entry once
    assert 0 < sum(kept) < sum(want_counts)
    factors = _scalars.caution_factors(want_counts, [p.size for p in params], dtype)
    aux = [factors[t:t + 1] for t in range(len(params))]
    want_p = [x.copy() for x in params]
    want_s = [[x.copy() for x in ss] for ss in states]
    _cython.elementwise(caution.step.name, (want_p, want_p, grads) + tuple(
        [ss[k] for ss in want_s] for k in range(len(base.state))) + (aux,),
        caution.step.args.record(dtype, scalars), 1, n_aux=1)
    for n_threads in (1, 2):
        counts = jax.jit(lambda r, p, g, s: _jax_ffi.caution_counts(
            caution.count.name, r, p, g, s, n_threads))(record, params, grads, counted)
        assert counts.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(counts), want_counts)
        counts = jax.jit(lambda r, p, g, s, m: _jax_ffi.caution_counts(
            caution.count.name, r, p, g, s, n_threads, masks=m))(
            record, params, grads, counted, masks)
        np.testing.assert_array_equal(np.asarray(counts), kept)
        got = jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(
            caution.step.name, r, p, g, s, n_threads))(
            record, params, grads, [list(ss) + [a] for ss, a in zip(states, aux)])
        _assert_step(got, (want_p, want_s))


@pytest.mark.parametrize("kernel", sorted(RULE_OF))
def test_jit_step_is_bitwise_cython_f32(kernel):
    scalars = _hyper(kernel, np.float32)
    params, grads, states = _case(kernel, np.float32)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
    step = jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(kernel, r, p, g, s, 2))
    got = step(jnp.asarray(record), [jnp.asarray(x) for x in params],
               [jnp.asarray(x) for x in grads], [[jnp.asarray(x) for x in s] for s in states])
    _assert_step(got, _reference(kernel, scalars, params, grads, states))


@pytest.mark.parametrize("kernel", sorted(RULE_OF))
def test_jit_step_is_bitwise_cython_f64(kernel, x64):
    scalars = _hyper(kernel, np.float64)
    params, grads, states = _case(kernel, np.float64, seed=1)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float64, scalars)
    step = jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(kernel, r, p, g, s, 2))
    got = step(record, params, grads, states)
    assert got[0][0].dtype == jnp.float64
    _assert_step(got, _reference(kernel, scalars, params, grads, states))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_delta_is_the_new_param_minus_the_param(dtype, x64):
    """With delta the param results are the new params minus the params, rounded once (as
    XLA's subtraction): bit for bit, on a multi-chunk two-thread tensor too; the params
    stay as they were and the state is updated as without delta."""
    kernel = "adam"
    scalars = _hyper(kernel, dtype)
    params, grads, states = _case(kernel, dtype, seed=4)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, dtype, scalars)
    jp = [jnp.asarray(x) for x in params]
    deltas, new_states = jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(
        kernel, r, p, g, s, 2, delta=True))(record, jp, grads, states)
    want, want_states = _reference(kernel, scalars, params, grads, states)
    _assert_step(([np.asarray(d) for d in deltas], new_states),
                 ([w - p for w, p in zip(want, params)], want_states))
    _assert_step((jp, []), (params, []))


@pytest.mark.parametrize("param, state", [("float32", None), ("float64", None),
                                          ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
@pytest.mark.parametrize("over", [1, 2], ids=["param", "grad"])
def test_delta_may_share_the_params_or_the_grads_buffer(param, state, over, x64):
    """XLA may give the delta result the buffer of a dead param or gradient (the caller
    aliases it to the gradient): the same results, bit for bit, on a tensor of two threads'
    chunks, with formats (`state` given: stochastic rounding) too; the differences are the
    new params minus the params. (Over the gradient, the kernel's reads come before its
    writes to an element, so only `over` param tells the old two-pass delta from this.)"""
    from fastopt._backends import _formats
    from fastopt._interop import bfloat16
    kernel, n = "adam", 4 * 16384 + 5
    dt = bfloat16() if param == "bfloat16" else np.dtype(param)
    sdt = dt if state is None else bfloat16()
    compute = np.float64 if param == "float64" else np.float32
    scalars = _hyper(kernel, compute)
    rng = np.random.default_rng(12)
    p, g = (rng.standard_normal(n).astype(dt) for _ in range(2))
    m, v = rng.standard_normal(n).astype(sdt), np.abs(rng.standard_normal(n)).astype(sdt)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, compute, scalars)
    extra, attrs = (), dict(kernel=kernel, delta=np.int64(1), n_threads=np.int64(2))
    keys = np.array([_formats.tensor_key(5, 0)], np.uint32)
    if state is not None:
        extra, attrs = (keys.view(np.int32), np.int32(3)), dict(attrs, formats=np.int64(1),
                                                                 stochastic=np.int64(1))
    want = _raw_call(3, record, p, g, m, v, *extra, results=(1, 3, 4), aliases={3: 1, 4: 2},
                     **attrs)
    got = _raw_call(3, record, p, g, m, v, *extra, results=(1, 3, 4),
                    aliases={over: 0, 3: 1, 4: 2}, **attrs)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(_bytes(x), _bytes(y))
    new = np.asarray(jax.jit(lambda *a: _jax_ffi.elementwise(
        kernel, a[0], [a[1]], [a[2]], [[a[3], a[4]]], 2,
        formats=None if state is None else (True, keys, 3)))(record, p, g, m, v)[0][0])
    diff = new - p if state is None else new.astype(np.float32) - p.astype(np.float32)
    np.testing.assert_array_equal(_bytes(want[0]), _bytes(diff.astype(dt)))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_subnormals_are_not_flushed(n_threads):
    """XLA runs the handler on threads that flush subnormals to zero; the kernel runs with
    IEEE subnormals, as the Cython driver: the same bits. And the OpenMP workers of that
    pass, handed later to the process's other teams, do not flush the Cython driver's
    results afterwards (they did: its second thread's half came out 0)."""
    n = 3 * 16384 + 5  # several chunks: a two-thread pass
    p, g = np.full(n, 1e-38, np.float32), np.full(n, 1e-38, np.float32)
    scalars = _scalars.sgd_scalars(np.float32, lr=0.5, momentum=0.0, dampening=0.0,
                                   weight_decay=0.0, nesterov=False, maximize=False,
                                   first=False, grad_scale=1.0, grad_clip=INF)
    record = _jax_ffi.record_bytes(_rules.SGD_ARGS, np.float32, scalars)
    (got,), _ = jax.jit(lambda r, p, g: _jax_ffi.elementwise("sgd", r, p, g, [[]], n_threads))(
        record, [jnp.asarray(p)], [jnp.asarray(g)])
    want = _reference("sgd", scalars, [p], [g], [[]])[0][0]
    assert want[0] == np.float32(5e-39) and want[-1] == want[0]  # subnormal
    _assert_bits(got, want)
    again = p.copy()
    _cython.elementwise("sgd", ([again], [again], [g]), _rules.SGD_ARGS.record(np.float32,
                                                                              scalars), 2)
    _assert_bits(again, want)


@pytest.mark.parametrize("delta", [False, True])
def test_masks_zero_the_pruned_entries(delta):
    """masks: the pruned entries of the new parameters and state are +0 (with delta, the
    update takes the parameter there to 0), the others are the unmasked call's bits; a
    tensor may go without a mask; a multi-chunk tensor on 2 threads."""
    kernel = "rmsprop_centered_momentum"
    scalars = _hyper(kernel, np.float32)
    params, grads, states = _case(kernel, np.float32, seed=7)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
    rng = np.random.default_rng(7)
    masks = [np.asarray(rng.random(p.shape) > 0.4) for p in params]
    masks[1] = None
    masks[2] = np.asarray(masks[2], np.uint8)

    def call(m):
        return jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(kernel, r, p, g, s, 2,
                                                               delta=delta, masks=m))(
            record, params, grads, states)
    plain, masked = call(None), call(masks)
    for t, m in enumerate(masks):
        keep = np.ones(params[t].shape, bool) if m is None else np.asarray(m, bool)
        want = np.where(keep, np.asarray(plain[0][t]), -params[t] if delta else 0)
        _assert_bits(np.asarray(masked[0][t]) + 0, want.astype(np.float32) + 0)
        if not delta:
            assert not np.signbit(np.asarray(masked[0][t])[~keep]).any()  # +0
        for x, y in zip(masked[1][t], plain[1][t]):
            _assert_bits(np.asarray(x), np.where(keep, np.asarray(y), 0).astype(np.float32))


@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "rne"])
@pytest.mark.parametrize("kernel, param, grad, state", [
    ("adam", "bfloat16", "bfloat16", "float32"),
    ("adam", "bfloat16", "float32", "bfloat16"),
    ("sgd_momentum", "float16", "float16", "float32"),
    ("lion", "float32", "float32", "bfloat16"),
])
def test_formats_are_the_cython_drivers(kernel, param, grad, state, stochastic):
    """formats: float32 arithmetic on bfloat16 / float16 / float32 storage, rounded
    stochastically (each tensor's key, the step) or to nearest even: the Cython driver's
    storage formats, bit for bit, on 1 and 2 threads, delta too."""
    from fastopt._backends import _formats
    from fastopt._interop import bfloat16
    dt = {"bfloat16": bfloat16(), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}
    scalars = _hyper(kernel, np.float32)
    params, grads, states = _case(kernel, np.float32, seed=9)
    params = [x.astype(dt[param]) for x in params]
    grads = [x.astype(dt[grad]) for x in grads]
    states = [[x.astype(dt[state]) for x in ss] for ss in states]
    keys = np.array([_formats.tensor_key(5, t) for t in range(len(params))], np.uint32)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
    want_p = [x.copy() for x in params]
    want_s = [[x.copy() for x in ss] for ss in states]
    n_state = _jax_ffi.KERNELS[kernel]
    codes = tuple(_formats.code_of(x) for x in (dt[param], dt[param], dt[grad]))
    codes += (_formats.code_of(dt[state]),) * n_state
    _cython.elementwise(kernel, (want_p, want_p, grads) + tuple(
        [ss[k] for ss in want_s] for k in range(n_state)),
        _rules.KERNELS[kernel].args.record(np.float32, scalars), 1,
        formats=_formats.Formats(codes, stochastic, 7, keys))
    for n_threads in (1, 2):
        got = jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(
            kernel, r, p, g, s, n_threads, formats=(stochastic, keys, jnp.int32(7))))(
            record, params, grads, states)
        assert got[0][0].dtype == dt[param]
        for x, y in zip(got[0], want_p):
            np.testing.assert_array_equal(_bytes(x), _bytes(y))
        for xs, ys in zip(got[1], want_s):
            for x, y in zip(xs, ys):
                np.testing.assert_array_equal(_bytes(x), _bytes(y))
    deltas, _ = _jax_ffi.elementwise(kernel, record, params, grads, states, 2, delta=True,
                                     formats=(stochastic, keys, 7))
    for d, new, old in zip(deltas, want_p, params):  # rounded to nearest, as XLA's
        diff = (new.astype(np.float32) - old.astype(np.float32)).astype(dt[param])
        np.testing.assert_array_equal(_bytes(d), _bytes(diff))


@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "rne"])
@pytest.mark.parametrize("kernel, param", [
    ("adam", "float32"), ("adam", "bfloat16"), ("sgd_momentum", "float16"),
    ("adadelta", "float32"), ("lion", "bfloat16"),
])
def test_8bit_state_is_the_cython_drivers(kernel, param, stochastic, monkeypatch):
    """formats with 8-bit state: the uint8 codes and their block scales (the signed map
    for first moments, the unsigned one for second moments) are updated as the Cython
    driver's storage formats update them, bit for bit, on 1 and 2 threads, eager, donated
    (in place) and called without aliases (separate result buffers: the handler copies the
    state and the scales chunk by chunk), delta too; tensors of several chunks and a
    partial last block."""
    from fastopt._backends import _formats
    from fastopt._interop import bfloat16
    dt = {"bfloat16": bfloat16(), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}[param]
    scalars = _hyper(kernel, np.float32)
    shapes = ((70001,), (300, 50), (4097,))
    params, grads, values = _case(kernel, np.float32, shapes=shapes, seed=10)
    params = [x.astype(dt) for x in params]
    names = _rules.KERNELS[kernel].state
    codes = [_formats.Q8S if name in _rules.SIGNED_STATE else _formats.Q8U for name in names]
    states, scales = [], []
    for vs in values:
        pairs = [_quantized(v * 0.1, c) for v, c in zip(vs, codes)]
        states.append([c for c, _ in pairs])
        scales.append([a for _, a in pairs])
    keys = np.array([_formats.tensor_key(5, t) for t in range(len(params))], np.uint32)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
    want_p = [x.copy() for x in params]
    want_s = [[x.copy() for x in ss] for ss in states]
    want_a = [[x.copy() for x in ss] for ss in scales]
    n_state = len(names)
    storage = (_formats.code_of(dt),) * 2 + (_formats.F32,) + tuple(codes)
    _cython.elementwise(kernel, (want_p, want_p, grads) + tuple(
        [ss[k] for ss in want_s] for k in range(n_state)),
        _rules.KERNELS[kernel].args.record(np.float32, scalars), 1,
        formats=_formats.Formats(storage, stochastic, 7, keys, False,
                                 tuple([a[k] for a in want_a] for k in range(n_state))))

    def check(got):
        for x, y in zip(got[0], want_p):
            np.testing.assert_array_equal(_bytes(x), _bytes(y))
        for xs, ys in zip(got[1] + got[2], want_s + want_a):
            for x, y in zip(xs, ys):
                np.testing.assert_array_equal(_bytes(x), _bytes(y))

    def call(r, p, g, s, a, n_threads, delta=False):
        return _jax_ffi.elementwise(kernel, r, p, g, s, n_threads, delta=delta,
                                    formats=(stochastic, keys, jnp.int32(7)), scales=a)

    for n_threads in (1, 2):
        check(call(record, params, grads, states, scales, n_threads))  # eager: new buffers
        donated = jax.jit(call, static_argnums=5, donate_argnums=(1, 3, 4))
        args = [jax.tree.map(jnp.array, x) for x in (params, states, scales)]
        pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(args)]
        got = donated(record, args[0], grads, args[1], args[2], n_threads)
        assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(got)] == pointers
        check(got)
    with monkeypatch.context() as m:  # the same call without aliases
        ffi_call = jax.ffi.ffi_call
        m.setattr(jax.ffi, "ffi_call", lambda *a, input_output_aliases, **k: ffi_call(*a, **k))
        check(jax.jit(call, static_argnums=5)(record, params, grads, states, scales, 2))
    deltas, new_s, new_a = call(record, params, grads, states, scales, 2, delta=True)
    check((want_p, new_s, new_a))
    for d, new, old in zip(deltas, want_p, params):
        diff = (new.astype(np.float32) - old.astype(np.float32)).astype(dt)
        np.testing.assert_array_equal(_bytes(d), _bytes(diff))


def _quantized(values, code):
    """(codes, block scales) of float32 `values` in 8-bit map `code`."""
    from fastopt._backends import _formats
    codes = np.empty(values.shape, np.uint8)
    absmax = np.empty(-(-values.size // _formats.BLOCK), np.float32)
    _formats.q8_store(codes, absmax, values, code)
    return codes, absmax


def _bytes(x):
    return np.asarray(x).reshape(-1).view(np.uint8)


def test_eager_call_leaves_its_inputs_alone():
    """Without donation, XLA gives the aliased results buffers of their own: the inputs keep
    their values (and a one-thread step gives the same bits)."""
    kernel = "rmsprop_centered_momentum"
    scalars = _hyper(kernel, np.float32)
    params, grads, states = _case(kernel, np.float32, seed=2)
    jp = [jnp.asarray(x) for x in params]
    js = [[jnp.asarray(x) for x in s] for s in states]
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
    got = _jax_ffi.elementwise(kernel, bytes(record), jp, grads, js, 1)
    _assert_step(got, _reference(kernel, scalars, params, grads, states))
    _assert_step((jp, js), (params, states))


def test_record_computed_inside_jit():
    """The struct may be a traced value: SGD's built from a traced learning rate."""
    def sgd_record(lr):
        reals = jnp.stack([jnp.float32(INF), jnp.float32(1), jnp.float32(0), jnp.float32(0.9),
                           jnp.float32(1), -lr])  # clip, gscale, wd, momentum, 1 - damp, -lr
        flags = jnp.array([0, 1], jnp.int32)  # first, nesterov
        return jnp.concatenate([jax.lax.bitcast_convert_type(reals, jnp.uint8).reshape(-1),
                                jax.lax.bitcast_convert_type(flags, jnp.uint8).reshape(-1)])

    @jax.jit
    def step(lr, p, g, s):
        record = sgd_record(lr)
        return record, _jax_ffi.elementwise("sgd_momentum", record, p, g, s, 2)

    params, grads, states = _case("sgd_momentum", np.float32, seed=3)
    record, got = step(jnp.float32(0.05), params, grads, states)
    scalars = _scalars.sgd_scalars(np.float32, lr=0.05, momentum=0.9, dampening=0.0,
                                   weight_decay=0.0, nesterov=True, first=False, maximize=False,
                                   grad_scale=1.0, grad_clip=INF)
    want = _jax_ffi.record_bytes(_rules.SGD_ARGS, np.float32, scalars)
    np.testing.assert_array_equal(np.asarray(record), want)
    _assert_step(got, _reference("sgd_momentum", scalars, params, grads, states))


def test_vmap_runs_one_call_per_batch_element():
    kernel = "adam"
    scalars = _hyper(kernel, np.float32)
    params, grads, states = _case(kernel, np.float32, shapes=((2, 7),), seed=4)
    record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
    got = jax.vmap(lambda p, g, m, v: _jax_ffi.elementwise(kernel, record, [p], [g], [[m, v]], 1))(
        params[0], grads[0], *states[0])
    _assert_step(got, _reference(kernel, scalars, params, grads, states))


def test_no_tensors():
    assert _jax_ffi.elementwise("adam", np.zeros(3, np.uint8), [], [], [], 1) == ([], [])
    assert _jax_ffi.elementwise("adam", np.zeros(3, np.uint8), [], [], [], 1,
                                formats=(True, [], 1), shadow=[], scales=[]) == ([],) * 4


# -- donated buffers are updated in place --------------------------------------------------

def test_donated_steps_update_in_place():
    """Steps of a jitted loop that donates the parameters and the state: every result lives
    in its input's buffer, the compiled program copies nothing, and the bits after 5 steps
    are the Cython backend's."""
    kernel = "adam_amsgrad"
    shapes = ((70001,), (3, 5, 7), ())
    params, grads, states = _case(kernel, np.float32, shapes=shapes, seed=5)
    step = jax.jit(lambda r, p, g, s: _jax_ffi.elementwise(kernel, r, p, g, s, 2),
                   donate_argnums=(1, 3))

    def record(t):
        scalars = _scalars.adam_scalars(np.float32, step=t, lr=1e-2, beta1=0.9, beta2=0.999,
                                        eps=1e-8, weight_decay=0.01, decoupled=False,
                                        maximize=False, grad_scale=1.0, grad_clip=INF)
        return scalars, _jax_ffi.record_bytes(_rules.ADAM_ARGS, np.float32, scalars)

    jp = [jnp.asarray(x) for x in params]
    jg = [jnp.asarray(x) for x in grads]
    js = [[jnp.asarray(x) for x in s] for s in states]
    text = step.lower(jnp.asarray(record(1)[1]), jp, jg, js).compile().as_text()
    assert "custom_call_target=\"fastopt_elementwise_v1\"" in text
    assert not re.search(r"\scopy(-start)?\(", text), text
    buffers = [x.unsafe_buffer_pointer() for x in jp + [s for ss in js for s in ss]]
    want = params, states
    for t in range(1, 6):
        scalars, rec = record(t)
        jp, js = step(jnp.asarray(rec), jp, jg, js)
        assert [x.unsafe_buffer_pointer() for x in jp + [s for ss in js for s in ss]] == buffers
        want = _reference(kernel, scalars, want[0], grads, want[1])
    _assert_step((jp, js), want)


# -- errors ------------------------------------------------------------------------------

def _python_case():
    params, grads, states = _case("adam", np.float32, shapes=((4, 3), (5,)), seed=6)
    record = _jax_ffi.record_bytes(_rules.ADAM_ARGS, np.float32, _hyper("adam", np.float32))
    return dict(kernel="adam", record=record, params=params, grads=grads, states=states,
                n_threads=1)


@pytest.mark.parametrize("change, error, match", [
    (dict(kernel="adamw"), ValueError, "no elementwise kernel named 'adamw'"),
    (dict(kernel=3), TypeError, "kernel: expected a kernel name"),
    (dict(grads=lambda c: [c["grads"][0].T, c["grads"][1]]), ValueError,
     r"grads\[0\]: expected the shape of params\[0\], \(4, 3\), got \(3, 4\)"),
    (dict(states=lambda c: [c["states"][0][:1], c["states"][1]]), ValueError,
     r"states\[0\]: kernel 'adam' takes 2 state arrays \('exp_avg', 'exp_avg_sq'\), got 1"),
    (dict(grads=lambda c: c["grads"][:1]), ValueError, "expected one entry per tensor"),
    (dict(params=lambda c: np.stack(c["params"][1:] * 2)), TypeError,
     "params: expected a list of arrays"),
    (dict(grads=lambda c: [c["grads"][0], 1.0]), TypeError, r"grads\[1\]: expected an array"),
    (dict(states=lambda c: [c["states"][0], [c["states"][1][0].astype(np.float16)] * 2]),
     TypeError, r"states\[1\]\[0\]: expected float32 as params\[0\], got float16"),
    (dict(params=lambda c: [x.astype(np.int32) for x in c["params"]]), TypeError,
     r"params\[0\]: expected float32 or float64, got int32"),
    (dict(params=lambda c: [x.astype(np.float64) for x in c["params"]]), ValueError,
     "float64 tensors need jax_enable_x64"),
    (dict(record=lambda c: c["record"][:-8]), ValueError,
     "record: expected the packed float32 struct of kernel 'adam', a 1-D uint8 array of 48 "
     r"bytes, got uint8 of shape \(40,\)"),
    (dict(record=lambda c: c["record"].view(np.int32)), ValueError, "got int32 of shape"),
    (dict(record=[0] * 48), TypeError, "record: expected a uint8 array"),
    (dict(n_threads=0), ValueError, "n_threads: expected an integer >= 1"),
    (dict(n_threads=2.0), TypeError, "n_threads: expected an integer >= 1, got float"),
    (dict(n_threads=True), TypeError, "n_threads: expected an integer >= 1, got a bool"),
    (dict(delta=1), TypeError, "delta: expected a bool, got int"),
    (dict(shadow=lambda c: c["params"]), ValueError,
     "shadow: only with formats, and not with delta"),
    (dict(formats=(False, np.zeros((2, 2), np.uint32), 1),
          shadow=lambda c: [c["params"][0].astype(np.float16)] * 2), ValueError,
     r"shadow\[1\]: expected the shape of params\[1\], \(5,\), got \(4, 3\)"),
    (dict(formats=(False, np.zeros((2, 2), np.uint32), 1), shadow=lambda c: c["params"]),
     TypeError, r"shadow\[0\]: expected bfloat16 or float16 \(as shadow\[0\]\), got float32"),
])
def test_python_checks(change, error, match):
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)  # the float64 case needs x64 off
    try:
        case = _python_case()
        case.update({k: v(case) if callable(v) else v for k, v in change.items()})
        with pytest.raises(error, match=match):
            _jax_ffi.elementwise(**case)
    finally:
        jax.config.update("jax_enable_x64", before)


def _raw_call(n_results, *operands, **attributes):
    """The handler called directly, past the Python checks; the results shaped as the
    operands after the struct, or as those of `results=` (indices)."""
    _jax_ffi.register()
    attrs = dict(kernel="sgd", n_tensors=np.int64(1), n_threads=np.int64(1))
    attrs.update(attributes)
    like = attrs.pop("results", range(1, 1 + n_results))
    results = [jax.ShapeDtypeStruct(operands[i].shape, operands[i].dtype) for i in like]
    aliases = attrs.pop("aliases", None)
    out = jax.ffi.ffi_call(_jax_ffi.TARGET, results, input_output_aliases=aliases,
                           vmap_method="sequential")(*operands, **attrs)
    return [np.asarray(x) for x in out]


P3 = np.arange(3, dtype=np.float32)
SGD_RECORD = np.zeros(32, np.uint8)


@pytest.mark.parametrize("operands, n_results, attributes, match", [
    ((np.zeros(40, np.uint8), P3, P3), 1, {},
     "argument 0: expected the 32 bytes of kernel sgd's packed float32 struct, got 40 bytes"),
    ((SGD_RECORD.reshape(4, 8), P3, P3), 1, {},
     "argument 0 .*: expected a 1-D uint8 array, got uint8 of rank 2"),
    ((SGD_RECORD, P3, P3), 1, dict(kernel="nope"), "no elementwise kernel named 'nope'"),
    ((SGD_RECORD, P3, P3), 1, dict(kernel="adafactor_vector"),
     "no elementwise kernel named 'adafactor_vector'"),
    ((SGD_RECORD, P3, np.ones(4, np.float32)), 1, {},
     "tensor 0, grad: expected 3 elements, as the param, got 4"),
    ((SGD_RECORD, P3, P3), 1, dict(n_tensors=np.int64(2)),
     r"kernel sgd over 2 tensors takes 5 arguments .* and gives 2 results \(1 per tensor\), "
     "got 3 and 1"),
    ((SGD_RECORD, P3, P3, P3), 2, dict(kernel="adam"),
     r"kernel adam over 1 tensors takes 5 arguments .* and gives 3 results \(3 per tensor\), "
     "got 4 and 2"),
    ((SGD_RECORD, P3.astype(np.float16), P3.astype(np.float16)), 1, {},
     "tensor 0, param: expected float32 or float64, got float16"),
    ((SGD_RECORD, P3, P3, P3.astype(np.int32)), 2, dict(kernel="sgd_momentum"),
     "tensor 0, state 0: expected float32, got int32"),
    ((SGD_RECORD, P3, P3), 1, dict(n_threads=np.int32(3)),  # (jax caches by value: 3 is new)
     "attribute n_threads: expected an int64 scalar"),
    ((SGD_RECORD, P3, P3), 1, dict(n_threads=np.int64(0)),
     r"expected the attributes kernel .* and n_threads in \[1, 2147483647\]"),
    ((SGD_RECORD, P3, P3), 1, dict(kernel=np.int64(1)), "attribute kernel: expected a string"),
    ((SGD_RECORD, P3, P3), 1, dict(lr=np.float32(1)), "unexpected attribute 'lr'"),
    ((SGD_RECORD, P3, P3), 1, dict(delta=np.int64(2)),
     "attribute delta: expected 0 or 1, got 2"),
    ((SGD_RECORD, P3, P3), 1, dict(count=np.int64(1)),
     "no cautious count kernel named 'sgd'"),
    ((SGD_RECORD, P3, P3), 1, dict(kernel="adam_caution", count=np.int64(1), delta=np.int64(1)),
     "attribute count: not with delta, into_grad or shadow"),
    ((SGD_RECORD, P3, P3), 1, dict(kernel="adam_caution", count=np.int64(1), formats=np.int64(1),
                                   shadow=np.int64(1)),
     "attribute count: not with delta, into_grad or shadow"),
    ((SGD_RECORD, P3, P3), 1, dict(delta=np.int64(1), into_grad=np.int64(1)),
     "attribute into_grad: not with delta or formats"),
    ((SGD_RECORD, P3, P3), 1, dict(discard=np.int64(1)),
     "attribute discard: only with sums, and a kernel without factors"),
    ((SGD_RECORD, P3, P3), 1, dict(sums=np.int64(1 + 4 * 1 + 3), delta=np.int64(1)),
     "attribute sums: not with delta, count or formats"),
    ((SGD_RECORD, P3, P3), 1, dict(sums=np.int64(1 + 4 * 2 + 1), into_grad=np.int64(1)),
     "attribute sums: not the grad .operand 2. with into_grad"),
    ((SGD_RECORD, P3, P3), 1, dict(sums=np.int64(1 + 4 * 1)),  # kind 0
     r"attribute sums: expected up to 4 bytes .* the operand below 3 .*, got 5"),
    ((SGD_RECORD, P3, P3), 1, dict(sums=np.int64(1 + 4 * 3 + 2)),  # sgd has no state
     r"attribute sums: expected up to 4 bytes .* the operand below 3"),
    ((SGD_RECORD, P3, P3), 1, dict(sums=np.int64(1 + 4 * 1 + 3)),  # the sums' result missing
     r"kernel sgd over 1 tensors takes 3 arguments .* and gives 2 results \(1 per tensor, "
     r"then the sums\), got 3 and 1"),
    ((SGD_RECORD, P3, P3, np.ones(2, np.uint8)), 1, dict(masked=np.int64(1)),
     "tensor 0, mask: expected 3 elements, as the param, or none, got 2"),
    ((SGD_RECORD, P3, P3, np.ones(3, np.int32)), 1, dict(masked=np.int64(1)),
     "tensor 0, mask: expected uint8, got int32"),
    ((SGD_RECORD, P3, P3), 1, dict(delta=np.int32(1)),
     "attribute delta: expected an int64 scalar"),
    ((SGD_RECORD, P3, P3), 1, dict(guarded=np.int64(1)),
     r"kernel sgd over 1 tensors takes 4 arguments .* and 1 guard\) and gives 1 results"),
    ((SGD_RECORD, P3, P3, np.float32(0)), 1, dict(guarded=np.int64(1)),
     r"argument 3 \(the guard\): expected a 0-d int32, got float32 of rank 0"),
    ((SGD_RECORD, P3, P3, np.zeros(1, np.int32)), 1, dict(guarded=np.int64(1)),
     r"argument 3 \(the guard\): expected a 0-d int32, got int32 of rank 1"),
    ((SGD_RECORD, P3, P3, P3), 2, dict(shadow=np.int64(1), results=(1, 3)),
     "attribute shadow: only with formats, not with delta"),
    ((SGD_RECORD, P3, P3, P3, np.zeros((1, 2), np.int32), np.int32(0)), 2,
     dict(shadow=np.int64(1), formats=np.int64(1), results=(1, 3)),
     "tensor 0: with shadow, expected a float32 param .the master copy. and a bfloat16 or "
     "float16 shadow, got float32 and float32"),
    ((SGD_RECORD, P3, P3.astype(np.float16), P3.astype(jnp.bfloat16),
      np.zeros((1, 2), np.int32), np.int32(0)), 2,
     dict(shadow=np.int64(1), formats=np.int64(1), results=(1, 3)),
     "tensor 0, grad: expected the parameter's dtype or float32, got float16"),
])
def test_handler_checks(operands, n_results, attributes, match):
    """A bad call reaching the C handler raises jax's error with the handler's message,
    and the next good call works."""
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=f"INVALID_ARGUMENT: fastopt_elementwise_v1: {match}"):
        _raw_call(n_results, *operands, **attributes)
    record = _jax_ffi.record_bytes(_rules.SGD_ARGS, np.float32, _hyper("sgd", np.float32))
    (got,) = _raw_call(1, record, P3, np.ones(3, np.float32))
    _assert_bits(got, _reference("sgd", _hyper("sgd", np.float32), [P3],
                                 [np.ones(3, np.float32)], [[]])[0][0])


def test_record_bytes():
    scalars = _hyper("radam", np.float64)
    got = _jax_ffi.record_bytes(_rules.RADAM_ARGS, np.float64, scalars)
    assert got.dtype == np.uint8 and got.ndim == 1 and got.size % 8 == 0
    np.testing.assert_array_equal(got, _rules.pack(_rules.RADAM_ARGS.record(np.float64,
                                                                            scalars)))
    with pytest.raises(TypeError, match="args: expected a fastopt._rules.Args"):
        _jax_ffi.record_bytes("radam", np.float64, scalars)
    with pytest.raises(TypeError, match="dtype: expected float32 or float64, got float16"):
        _jax_ffi.record_bytes(_rules.RADAM_ARGS, np.float16, scalars)


# -- concurrency, registration, import ---------------------------------------------------

def test_concurrent_calls_from_two_threads():
    """XLA may run custom calls concurrently: two threads stepping different kernels at the
    same time, each with two OpenMP threads, get their own exact results."""
    jobs = []
    for kernel, seed in (("adam", 7), ("lion", 8)):
        scalars = _hyper(kernel, np.float32)
        case = _case(kernel, np.float32, shapes=((300001,), (17,)), seed=seed)
        record = _jax_ffi.record_bytes(_rules.KERNELS[kernel].args, np.float32, scalars)
        step = jax.jit(lambda r, p, g, s, kernel=kernel: _jax_ffi.elementwise(
            kernel, r, p, g, s, 2))
        jax.block_until_ready(step(record, *case))  # compiled before the race
        jobs.append((step, record, case, _reference(kernel, scalars, *case)))
    barrier = threading.Barrier(len(jobs))
    results = [[] for _ in jobs]

    def run(i):
        step, record, case, _ = jobs[i]
        barrier.wait()
        for _ in range(6):
            results[i].append(jax.block_until_ready(step(record, *case)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, _, _, want), got in zip(jobs, results):
        assert len(got) == 6
        for step_result in got:
            _assert_step(step_result, want)


def test_register_is_idempotent_and_thread_safe():
    errors = []

    def run():
        try:
            _jax_ffi.register()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _jax_ffi.register()
    assert errors == [] and _jax_ffi._registered


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_refused_handler_raises_and_leaves_jax_working(tmp_path, monkeypatch):
    """A handler that XLA refuses (here: one reporting a future FFI major version) makes
    register() raise with XLA's reason, and jax's CPU backend keeps working."""
    import ctypes
    source = tmp_path / "future.c"
    source.write_text(
        "#include \"fastopt/xla_ffi.h\"\n"
        "fo_xla_error *handler(fo_xla_call_frame *call) {\n"
        "    fo_xla_metadata *m = ((fo_xla_metadata_extension *)call->extension_start)"
        "->metadata;\n"
        "    m->api_version.struct_size = FO_XLA_STRUCT_SIZE(fo_xla_api_version, "
        "minor_version);\n"
        "    m->api_version.major_version = FO_XLA_API_MAJOR + 1;\n"
        "    m->api_version.minor_version = 0;\n"
        "    m->traits = 0;\n"
        "    return 0;\n"
        "}\n")
    lib = tmp_path / "future.so"
    subprocess.run(["cc", "-shared", "-fPIC", f"-I{KERNELS_DIR / 'include'}", str(source), "-o",
                    str(lib)], check=True)
    capsule = jax.ffi.pycapsule(ctypes.CDLL(str(lib)).handler)

    class Future:
        @staticmethod
        def targets():
            return {"fastopt_test_future_v1": capsule}

    monkeypatch.setattr(_jax_ffi, "_xla", Future)
    monkeypatch.setattr(_jax_ffi, "_registered", False)
    with pytest.raises(RuntimeError, match="jax refused fastopt's XLA FFI handler "
                                           "'fastopt_test_future_v1': .*API version"):
        _jax_ffi.register()
    assert not _jax_ffi._registered
    assert float(jax.jit(lambda x: x + 1)(jnp.float32(1))) == 2.0


def test_module_imports_jax_lazily():
    code = ("import sys, fastopt._jax_ffi\n"
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
