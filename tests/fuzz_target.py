"""The Hypothesis fuzz targets of tests/test_fuzz.py, run in a child process so that a crash
(SIGSEGV, an abort) fails that test instead of killing the pytest run.

    python tests/fuzz_target.py FAMILY [--torch] [--examples N] [--trace PATH] [--survey]
                                       [--seed S] [--shrink]

FAMILY is one of FAMILIES (or a self-test of the harness, see TARGETS). Each target draws
calls of the public API with arrays of many dtypes (float32/64, float16, bfloat16,
integers, bool, complex, non-native byte order), shapes (0-d, 0-size, N-D, 1-D across the
16384-element chunks up to 70000), layouts (strided, negative strides, transposes,
zero-stride broadcasts, read-only, starting at an odd element, unaligned) and frameworks
(NumPy; PyTorch with --torch: non-contiguous, expanded, negated or conjugated views,
tensors that require grad), plus good and bad scalar arguments and thread counts.
Optimizers also get parameters overlapping another one's memory, parameters passed as
gradients, and set_masks between steps. Half the examples keep the arguments valid, so
that the kernels run.

The property: every call returns or raises TypeError/ValueError; anything else fails
(except the RuntimeError that clip_grad_norm_ documents for error_if_nonfinite=True). An
optimizer step that raises, or that skip_nonfinite skips, leaves the parameters, the state
arrays and the step counts bit for bit as they were; a step with pruning masks leaves the
pruned entries of each stepped parameter and of its state exactly +0 (both documented in
fastopt.optim.Optimizer).

Before each call its reproducer is written to the --trace file, so that the parent can say
which call a crash happened in; an unexpected exception carries it as a note ("fuzz
call: ..."). The arrays are described as ``build(Spec(...))``, which rebuilds them:
``from fuzz_target import Spec, build`` (run from tests/).

--survey runs every example instead of stopping at the first failure, and lists each
distinct failure with its first reproducer (for bug hunting; the test does not use it).
"""

import argparse
import atexit
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass

import numpy as np
from conftest import CPU_BACKENDS
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt._rules import RULES

FAMILIES = ("optimizers", "clip", "prune", "quant", "distill")  # and the self-tests
ALLOWED = (TypeError, ValueError)
BACKENDS = ("auto",) + CPU_BACKENDS
CHUNK_EDGES = (16383, 16384, 16385, 32767, 32768, 32769, 65535, 65536, 65537, 70000)

torch = None  # set by main() with --torch
FRAMEWORKS = ("numpy",)


# -- arrays ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """How to build one input array (see build)."""
    framework: str
    dtype: str
    shape: tuple
    layout: str
    fill: str
    seed: int


FLOATS = ("float32", "float64")
OTHER_DTYPES = {
    "numpy": ("float16", "int8", "int32", "int64", "uint8", "bool", "complex64",
              "complex128", ">f4", ">f8"),
    "torch": ("float16", "bfloat16", "int8", "int32", "int64", "uint8", "bool", "complex64"),
}
NP_LAYOUTS = ("c", "c", "c", "odd", "unaligned", "unaligned_ro", "strided", "negative",
              "transpose", "broadcast", "readonly")
TORCH_LAYOUTS = ("c", "c", "c", "odd", "strided", "transpose", "broadcast", "requires_grad",
                 "neg", "conj")
WRITABLE = {"numpy": ("c", "odd", "unaligned"), "torch": ("c", "odd")}
FILLS = ("normal", "normal", "ties", "zeros", "nonfinite", "extreme")

_BUILT = {}  # id -> (source, array) of this example's arrays, for the reproducers


def _values(shape, fill, seed):
    """float64 values of `shape`."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if fill == "zeros":
        v = np.zeros(n)
    elif fill == "ties":
        v = rng.integers(-2, 3, n).astype(np.float64)
    elif fill == "extreme":
        v = rng.choice([0.0, -0.0, 5e-324, 1e-40, 65504.0, 3.4e38, -1e300, 1e308], n)
    else:
        v = rng.standard_normal(n) * 3
        if fill == "nonfinite" and n:
            v[rng.integers(0, n, max(1, n // 7))] = rng.choice([np.nan, np.inf, -np.inf])
    return v.reshape(shape)


def _cast(v, dtype):
    with np.errstate(all="ignore"):
        if dtype.kind == "b":
            out = v > 0
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            out = np.clip(np.nan_to_num(v * 8), info.min, info.max).astype(dtype)
        elif dtype.kind == "c":
            out = (v - 0.5j * v).astype(dtype)
        else:
            out = v.astype(dtype)
    return np.array(out, dtype).reshape(v.shape)  # 0-d stays an array, not a scalar


def _np_layout(vals, layout):
    shape, dt, n = vals.shape, vals.dtype, vals.size
    if layout == "readonly":
        a = vals.copy()
        a.flags.writeable = False
        return a
    if layout == "odd":
        a = np.empty(n + 1, dt)[1:].reshape(shape)
    elif layout in ("unaligned", "unaligned_ro") and n:
        buf = bytearray(n * dt.itemsize + 1)
        a = np.frombuffer(buf, dt, count=n, offset=1).reshape(shape)
        a[...] = vals
        if layout == "unaligned_ro":
            a = np.frombuffer(bytes(buf), dt, count=n, offset=1).reshape(shape)
        return a
    elif layout == "strided" and vals.ndim:
        a = np.empty(shape[:-1] + (2 * shape[-1],), dt)[..., ::2]
    elif layout == "negative" and vals.ndim:
        a = np.empty(shape, dt)[(slice(None, None, -1),) * vals.ndim]
    elif layout == "transpose" and vals.ndim > 1:
        a = np.empty(shape[::-1], dt).T
    elif layout == "broadcast" and n and vals.ndim:
        return np.broadcast_to(vals[:1], shape)
    else:
        return vals
    a[...] = vals
    return a


_TORCH_NP = {"bfloat16": "float32"}  # dtypes NumPy lacks: values made in this one first


def _torch_layout(vals, dtype_name, layout):
    tdt = getattr(torch, dtype_name)
    src = torch.from_numpy(np.array(vals, order="C"))  # ascontiguousarray makes 0-d 1-d
    shape = tuple(vals.shape)
    if layout == "odd":
        t = torch.empty(src.numel() + 1, dtype=tdt)[1:].reshape(shape)
    elif layout == "strided" and vals.ndim:
        t = torch.empty(shape[:-1] + (2 * shape[-1],), dtype=tdt)[..., ::2]
    elif layout == "transpose" and vals.ndim > 1:
        t = torch.empty(shape[::-1], dtype=tdt).permute(*range(vals.ndim - 1, -1, -1))
    elif layout == "broadcast" and vals.size and vals.ndim:
        return src[:1].to(tdt).expand(shape)
    else:
        t = src.to(tdt).clone()
        if layout == "requires_grad" and t.is_floating_point():
            return t.requires_grad_()
        if layout == "neg" and (t.is_floating_point() or t.is_complex()):
            return torch._neg_view(t)
        if layout == "conj" and t.is_complex():
            return t.conj()
        return t
    t.copy_(src)
    return t


def build(spec):
    """The array `spec` describes (the same one for the same spec)."""
    np_name = _TORCH_NP.get(spec.dtype, spec.dtype)
    vals = _cast(_values(spec.shape, spec.fill, spec.seed), np.dtype(np_name))
    if spec.framework == "torch":
        arr = _torch_layout(vals, spec.dtype, spec.layout)
    else:
        arr = _np_layout(vals, spec.layout)
    _BUILT[id(arr)] = (f"build({spec!r})", arr)
    return arr


SHAPES = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    st.sampled_from(CHUNK_EDGES).map(lambda n: (n,)),
    st.integers(1, 70000).map(lambda n: (n,)),
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
)


@st.composite
def specs(draw, shape=None, dtype=None, fw=None, valid=False):
    """An array Spec; `valid`: a float32/float64 contiguous writable one."""
    if fw is None:
        fw = draw(st.sampled_from(FRAMEWORKS))
    if dtype is None:
        floats = st.sampled_from(FLOATS)
        dtype = draw(floats if valid else st.one_of(floats, st.sampled_from(OTHER_DTYPES[fw])))
    if shape is None:
        shape = draw(SHAPES)
    layouts = WRITABLE[fw] if valid else (NP_LAYOUTS if fw == "numpy" else TORCH_LAYOUTS)
    layout = draw(st.sampled_from(layouts))
    return Spec(fw, dtype, shape, layout, draw(st.sampled_from(FILLS)),
                draw(st.integers(0, 2**16)))


def made(source):
    """The value of the expression `source` (of np and torch), which the reproducers then
    print as `source`."""
    value = eval(source, {"np": np, "torch": torch})
    _BUILT[id(value)] = (source, value)
    return value


def overlapping(arr, start):
    """A view of `arr`'s memory from flat element `start` on (1-D): another array object
    over the same buffer. The reproducers name arr once: (vN := build(...))."""
    source, _ = _BUILT[id(arr)]
    if not source.startswith("("):
        source = f"(v{len(_BUILT)} := {source})"
        _BUILT[id(arr)] = (source, arr)
    view = arr.reshape(-1)[start:]
    _BUILT[id(view)] = (f"{source.partition(' :=')[0][1:]}.reshape(-1)[{start}:]", view)
    return view


def like(spec, valid):
    """A Spec of `spec`'s framework, dtype and shape (any layout), or (not valid) any."""
    same = specs(shape=spec.shape, dtype=spec.dtype, fw=spec.framework)
    return same if valid else st.one_of(same, same, same, specs())


# -- calls -----------------------------------------------------------------------------

class Trace:
    path = None
    file = None

    @classmethod
    def write(cls, text):
        if cls.file is not None:
            cls.file.seek(0)
            cls.file.write(text + "\n")
            cls.file.truncate()
            cls.file.flush()


def describe(x):
    """Python source that rebuilds x (arrays as build(Spec(...)))."""
    found = _BUILT.get(id(x))
    if found is not None and found[1] is x:
        return found[0]
    if isinstance(x, list):
        return "[" + ", ".join(map(describe, x)) + "]"
    if isinstance(x, tuple):
        return "(" + "".join(describe(v) + ", " for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, np.ndarray):
        return f"np.array({x.tolist()!r}, {x.dtype.str!r})"
    if torch is not None and isinstance(x, torch.Tensor):
        return f"torch.tensor({x.tolist()!r}, dtype={x.dtype})"
    if isinstance(x, float) and not math.isfinite(x):
        return f"float({str(x)!r})"
    if isinstance(x, int) and abs(x) > 2**64 and str(abs(x)).rstrip("0") == "1":
        return f"{'-' if x < 0 else ''}10**{len(str(abs(x))) - 1}"
    return repr(x)


def call_text(label, args, kwargs):
    """The source of the call label(*args, **kwargs)."""
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return f"{label}({', '.join(parts)})"


SURVEY = None  # --survey: {key: [count, message, reproducer]}
STATS = {}  # --survey: (label, status) -> count
HISTORY = []  # the calls of this example so far, as source


def fail(message, exc=None):
    """A violated property: raise, or in survey mode record it."""
    if SURVEY is None:
        raise AssertionError(f"{message}\n  calls:\n    " + "\n    ".join(HISTORY)) from exc
    where = "?"
    if exc is not None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "fastopt" in f.filename
                  or "numpy" in f.filename or "torch" in f.filename]
        if frames:
            where = f"{frames[-1].filename.rpartition('/')[2]}:{frames[-1].lineno}"
    key = (type(exc).__name__ if exc is not None else "property", where,
           re.sub(r"\d+", "N", message)[:80] if exc is None else "")
    entry = SURVEY.setdefault(key, [0, message, "\n   ".join(HISTORY)])
    entry[0] += 1


def attempt(label, fn, *args, also=None, bind=None, **kwargs):
    """("ok", result), ("refused", TypeError/ValueError) or, in survey mode, ("crashed",
    exception); anything else than the allowed errors fails. `also(exc)`: another
    exception this call documents; `bind`: the name the reproducers give the result."""
    text = call_text(label, args, kwargs)
    HISTORY.append(f"{bind} = {text}" if bind else text)
    Trace.write("\n".join(HISTORY))
    try:
        result = fn(*args, **kwargs)
    except ALLOWED as exc:
        if SURVEY is not None:
            STATS[label, "refused"] = STATS.get((label, "refused"), 0) + 1
        return "refused", exc
    except Exception as exc:
        if also is not None and also(exc):
            return "refused", exc
        if SURVEY is None:
            exc.add_note("fuzz calls (the last one raised it):\n    " + "\n    ".join(HISTORY))
            raise
        fail(f"{type(exc).__name__}: {str(exc)[:200]}", exc)
        return "crashed", exc
    if SURVEY is not None:
        STATS[label, "ok"] = STATS.get((label, "ok"), 0) + 1
    return "ok", result


def bits(x):
    """(dtype, shape, bytes) of an array of any framework, or a scalar's repr."""
    if isinstance(x, np.ndarray):
        return (x.dtype.str, x.shape, np.ascontiguousarray(x).tobytes())
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().resolve_conj().resolve_neg()
        flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # unit stride
        return (str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes())
    return (type(x).__name__, repr(x))


def host(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().resolve_conj().resolve_neg().cpu().numpy()
    return np.asarray(x)


# -- scalar arguments ------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
ODD_NUMBERS = (0.0, -1.0, NAN, INF, -INF, 1e308, 5e-324, True, None, "0.1", 10**400, 1 + 1j,
               np.float32(0.5), np.float64(2.0), np.int64(3), np.array(0.1), np.array([0.1]))
ODD = st.sampled_from(ODD_NUMBERS)
GOOD_REALS = st.sampled_from((1e-3, 0.1, 0.5, 0.9, 1.0))
GOOD_UNIT = st.sampled_from((0.0, 0.5, 0.9, 0.999))
GOOD_POSITIVE = st.sampled_from((1.0, 1e-3, 1e30, 0.5))
GOOD_BOOLS = st.booleans()
REALS = st.one_of(GOOD_REALS, ODD)
BOOLS = st.sampled_from((True, False, True, False, 0, 1, None, "yes", np.bool_(True)))
UNIT = st.one_of(GOOD_UNIT, ODD)
POSITIVE = st.one_of(GOOD_POSITIVE, ODD)
GOOD_NORM_TYPES = st.sampled_from((2.0, 2, 1, INF, "inf", np.float32(1)))
NORM_TYPES = st.one_of(GOOD_NORM_TYPES, st.sampled_from(("fro", 3, 0, -1, NAN, None)))
AXES = st.sampled_from((None, 0, 1, -1, -2, 3, -5, 1.0, True, "0"))
INTS = st.one_of(st.integers(-3, 10), st.sampled_from((2**31, 2**63, 2.0, 2.5, None, True,
                                                       np.int64(4), "2")))


def pick(valid, good, odd):
    """`good` (a strategy) for a valid example, else either."""
    return good if valid else st.one_of(good, odd)


def _backend(draw):
    return draw(st.sampled_from(BACKENDS + ("cupy", "bogus")))


# -- optimizers ------------------------------------------------------------------------

_BETAS = st.one_of(st.tuples(UNIT, UNIT), st.sampled_from(((0.9,), 0.9, None)))
HYPER = {  # key -> (good values, odd ones)
    **{k: (GOOD_REALS, ODD) for k in ("lr", "weight_decay", "eps", "momentum", "dampening",
                                      "alpha", "rho", "lr_decay", "initial_accumulator_value",
                                      "momentum_decay", "d")},
    **{k: (GOOD_BOOLS, BOOLS) for k in ("nesterov", "amsgrad", "centered", "maximize",
                                        "decoupled_weight_decay", "decouple")},
    "betas": (st.tuples(GOOD_UNIT, GOOD_UNIT), _BETAS),
    "beta2_decay": (st.sampled_from((-0.8, -0.5, -1.0)), REALS),
}
HYPER_OF = {"Adafactor": {"eps": (st.sampled_from(((None, 1e-3), (1e-30, 1e-3))), REALS),
                          "d": (st.sampled_from((1.0, 2.0)), REALS)}}
RULE_NAMES = tuple(rule.name for rule in RULES)


def _hyper_keys(name):
    import inspect
    return tuple(k for k in inspect.signature(getattr(fastopt, name)).parameters if k in HYPER)


def snapshot(opt):
    return ([bits(p) for p in opt.params()],
            {i: {k: bits(v) for k, v in s.items()} for i, s in opt.state.items() if s})


def check_unchanged(opt, before, why):
    after = snapshot(opt)
    if after[0] != before[0]:
        changed = [i for i, (a, b) in enumerate(zip(after[0], before[0])) if a != b]
        fail(f"{why}, but params {changed} changed")
    elif after[1] != before[1]:
        fail(f"{why}, but the optimizer state changed: "
                   f"{sorted(before[1].items())!r:.300} -> {sorted(after[1].items())!r:.300}")


def check_masked(opt, grads, masks):
    for i, (p, g, m) in enumerate(zip(opt.params(), grads, masks)):
        if g is None or m is None:
            continue
        pruned = host(m) == 0
        arrays = [("param", p)] + [(k, v) for k, v in opt.state.get(i, {}).items()
                                   if hasattr(v, "shape") and tuple(v.shape) == tuple(p.shape)]
        for name, a in arrays:
            vals = host(a)[pruned]
            if not (np.all(vals == 0) and not np.signbit(vals).any()):
                fail(f"masks[{i}]: pruned entries of {name} are not +0 after the step")


def _draw_masks(draw, pspecs, fw, valid):
    """Pruning masks for parameters of these specs: bool/uint8 ones of their shapes, None,
    and (not valid) any array."""
    mask_specs = [draw(st.one_of(st.none(), specs(shape=s.shape, dtype="bool", fw=fw),
                                 specs(shape=s.shape, dtype="uint8", fw=fw),
                                 st.none() if valid else specs())) for s in pspecs]
    return [None if m is None else build(m) for m in mask_specs]


STEP_COUNTS = st.sampled_from((0, 1, 7, 2**53, 2**53 + 1, -1, 1.5, 3.0, NAN, INF, "3", None,
                               True, np.int64(5), np.float64(2.0), 10**400))


def _mutated_state(draw, opt):
    """opt.state_dict(), as is or with one thing changed (a state array, a step count, a
    key, an index, a hyperparameter, the groups). Its entries are new dicts; the arrays
    left in them are the optimizer's own, named opt.state[i][key] in the reproducers."""
    sd = opt.state_dict()
    for i, entry in opt.state.items():
        for key, value in entry.items():
            if hasattr(value, "shape"):
                _BUILT[id(value)] = (f"opt.state[{i}][{key!r}]", value)
    state, groups = sd["state"], sd["param_groups"]
    kind = draw(st.sampled_from(("same", "same", "array", "step", "drop", "extra", "index",
                                 "hyper", "groups")), label="state change")
    if kind in ("array", "step", "drop", "extra") and state:
        entry = state[draw(st.sampled_from(sorted(state)))]
        arrays = [k for k, v in entry.items() if hasattr(v, "shape")]
        if kind == "array" and arrays:
            key = draw(st.sampled_from(arrays))
            v = entry[key]
            same = specs(shape=tuple(v.shape), dtype=v.dtype.name, fw="numpy")
            entry[key] = build(draw(st.one_of(same, same, specs(shape=tuple(v.shape)),
                                              specs())))
        elif kind == "step":
            entry["step"] = draw(STEP_COUNTS)
        elif kind == "drop" and entry:
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif kind == "extra":
            key = draw(st.sampled_from(("bogus", "exp_avg", "momentum_buffer", "row_var")))
            entry[key] = build(draw(specs()))
    elif kind == "index" and state:
        new = draw(st.sampled_from((99, -1, "0", 0.0, None, np.int64(0))))
        state[new] = state.pop(draw(st.sampled_from(sorted(state))))
    elif kind == "hyper":
        group = groups[0]
        group[draw(st.sampled_from(sorted(k for k in group if k != "params")))] = draw(REALS)
    elif kind == "groups":
        sd["param_groups"] = draw(st.sampled_from((groups[:-1], groups * 2, groups[::-1],
                                                   [dict(g, params=[0]) for g in groups])))
    return sd


def fuzz_optimizers(data):
    draw = data.draw
    valid = draw(st.booleans(), label="valid")
    name = draw(st.sampled_from(RULE_NAMES), label="rule")
    fw = draw(st.sampled_from(FRAMEWORKS), label="framework")
    dtype = draw(st.sampled_from(FLOATS)) if valid else None
    pspecs = draw(st.lists(specs(fw=fw, dtype=dtype, valid=valid), min_size=1, max_size=3),
                  label="params")
    params = [build(s) for s in pspecs]
    overlap = draw(st.integers(0, 9), label="overlap") == 0 and bool(pspecs[0].shape) and (
        params[0].is_contiguous() if fw == "torch" else params[0].flags.c_contiguous)
    if overlap:  # one more parameter over (part of) the first one's memory
        view = overlapping(params[0], draw(st.integers(0, 2)))
        pspecs.append(Spec(fw, pspecs[0].dtype, tuple(view.shape), "c", "normal", 0))
        params.append(view)
    keys = draw(st.lists(st.sampled_from(_hyper_keys(name)), unique=True, max_size=2))
    hyper = {k: draw(pick(valid, *HYPER_OF.get(name, HYPER).get(k, HYPER[k])), label=k)
             for k in keys}
    options = {"backend": draw(st.sampled_from(BACKENDS)) if valid else _backend(draw)}
    for key in draw(st.lists(st.sampled_from(("max_grad_norm", "grad_norm_type",
                                              "max_grad_value", "skip_nonfinite", "masks",
                                              "n_threads")), unique=True, max_size=3)):
        if key == "masks":
            options["masks"] = _draw_masks(draw, pspecs, fw, valid)
        elif key == "skip_nonfinite":
            options[key] = draw(pick(valid, st.sampled_from((True, True, False)),
                                     st.sampled_from((1, None))))
        elif key == "grad_norm_type":
            options[key] = draw(pick(valid, GOOD_NORM_TYPES, NORM_TYPES))
        elif key == "n_threads":
            options[key] = draw(pick(valid, st.sampled_from((None, 1, 2, 3, 64, 2**31 - 1)),
                                     st.sampled_from((0, -1, 2**31, 1.5, True))))
        else:
            options[key] = draw(pick(valid, GOOD_POSITIVE, ODD), label=key)
    if valid and "max_grad_norm" in options:
        options.pop("max_grad_value", None)  # not both (documented)
    if draw(st.booleans(), label="groups"):
        groups = [{"params": [p], **hyper} for p in params]
        status, opt = attempt(f"fastopt.{name}", getattr(fastopt, name), groups, bind="opt",
                              **options)
    else:
        status, opt = attempt(f"fastopt.{name}", getattr(fastopt, name), params, bind="opt",
                              **hyper, **options)
    if status != "ok":
        return
    masks = options.get("masks") or [None] * len(params)
    for action in draw(st.lists(st.sampled_from(("step", "step", "step", "set_masks",
                                                 "alias", "load")), min_size=1, max_size=4)):
        if action == "load":  # documented: checked before anything changes
            state_dict = _mutated_state(draw, opt)
            before = snapshot(opt)
            status, _ = attempt("opt.load_state_dict", opt.load_state_dict, state_dict)
            if status != "ok":
                check_unchanged(opt, before, f"load_state_dict raised ({status})")
            continue
        if action == "set_masks":
            new = _draw_masks(draw, pspecs, fw, valid) if draw(st.booleans()) else None
            if attempt("opt.set_masks", opt.set_masks, new)[0] == "ok":
                masks = new or [None] * len(params)
            continue
        if action == "alias":  # each parameter its own gradient, or the next one's
            grads = params[draw(st.integers(0, len(params) - 1)):] + params
            grads = grads[:len(params)]
        else:
            gspecs = [draw(st.one_of(like(s, valid), like(s, valid), st.none())) for s in pspecs]
            if not valid and draw(st.booleans()):
                gspecs = draw(st.lists(st.one_of(specs(), st.none()), max_size=4))
            grads = [None if g is None else build(g) for g in gspecs]
        before = snapshot(opt)
        status, _ = attempt("opt.step", opt.step, grads)
        if status != "ok":
            check_unchanged(opt, before, f"the step raised ({status})")
            return
        if opt.last_step_skipped:
            check_unchanged(opt, before, "skip_nonfinite skipped the step")
        elif len(grads) == len(masks) and not overlap:  # overlapping params rewrite each other
            check_masked(opt, grads, masks)


# -- clipping --------------------------------------------------------------------------

def _container(draw, arrays):
    kind = draw(st.sampled_from(("list", "list", "tuple", "generator", "single")))
    if kind == "tuple":
        return tuple(arrays)
    if kind == "generator":
        gen = (a for a in arrays)
        _BUILT[id(gen)] = (f"iter({describe(arrays)})", gen)
        return gen
    if kind == "single" and arrays:
        return arrays[0]
    return arrays


def _nonfinite_norm(exc):
    return isinstance(exc, RuntimeError) and "non-finite" in str(exc)


def fuzz_clip(data):
    draw = data.draw
    valid = draw(st.booleans(), label="valid")
    fw = draw(st.sampled_from(FRAMEWORKS), label="framework")
    arrays = [build(s) for s in draw(st.lists(specs(fw=fw, valid=valid), max_size=3))]
    grads = arrays if valid else _container(draw, arrays)
    if draw(st.booleans(), label="norm"):
        kwargs = dict(norm_type=draw(pick(valid, GOOD_NORM_TYPES, NORM_TYPES)),
                      error_if_nonfinite=draw(st.sampled_from((False, True))),
                      backend=draw(st.sampled_from(BACKENDS)) if valid else _backend(draw))
        if draw(st.booleans()):
            kwargs["n_threads"] = draw(pick(valid, st.sampled_from((None, 1, 2, 64)),
                                            st.sampled_from((0, -1, 1.5))))
        # error_if_nonfinite=True: a non-finite norm raises RuntimeError, as in torch
        attempt("fastopt.clip_grad_norm_", fastopt.clip_grad_norm_, grads,
                draw(pick(valid, GOOD_POSITIVE, ODD)), also=_nonfinite_norm, **kwargs)
    else:
        attempt("fastopt.clip_grad_value_", fastopt.clip_grad_value_, grads,
                draw(pick(valid, GOOD_POSITIVE, ODD)))


# -- pruning ---------------------------------------------------------------------------

ODD_AMOUNTS = st.sampled_from((-1, NAN, INF, -0.5, 1.5, True, None, "0.5", np.float32(0.25),
                               np.int64(1), 10**20, np.array(0.5)))
MASK_DTYPES = st.sampled_from(("bool", "uint8"))
ODD_MASK_DTYPES = st.sampled_from(("int8", np.bool_, None, "float32", bool))
SEEDS = st.integers(0, 2**64 - 1)
ODD_SEEDS = st.sampled_from((-1, 2**64, 1.5, None, True, np.uint64(2**63)))
PRUNE_FNS = ("magnitude_mask", "global_magnitude_masks", "random_mask", "ln_structured_mask",
             "nm_mask", "apply_mask_", "apply_mask", "polynomial_sparsity")


def _dims(shape):
    return st.integers(-len(shape), len(shape) - 1) if shape else st.just(0)


def fuzz_prune(data):
    draw = data.draw
    valid = draw(st.booleans(), label="valid")
    fw = draw(st.sampled_from(FRAMEWORKS), label="framework")
    fn = draw(st.sampled_from(PRUNE_FNS), label="function")
    prune = fastopt.prune
    spec = draw(specs(fw=fw, valid=valid), label="w")
    w = build(spec)
    size = math.prod(spec.shape)
    amount = pick(valid, st.one_of(st.floats(0, 1), st.integers(0, size)), ODD_AMOUNTS)
    dtype = pick(valid, MASK_DTYPES, ODD_MASK_DTYPES)
    backend = {"backend": draw(pick(valid, st.sampled_from(BACKENDS), st.sampled_from(
        ("cupy", "bogus"))))}
    if fn == "magnitude_mask":
        attempt("fastopt.prune.magnitude_mask", prune.magnitude_mask, w, draw(amount),
                dtype=draw(dtype), **backend)
    elif fn == "global_magnitude_masks":
        more = [build(s) for s in draw(st.lists(specs(fw=fw, dtype=spec.dtype, valid=valid)
                                                if valid else specs(), max_size=3))]
        ws = [w] + more if valid else _container(draw, [w] + more)
        total = sum(math.prod(a.shape) for a in [w] + more)
        amount = pick(valid, st.one_of(st.floats(0, 1), st.integers(0, total)), ODD_AMOUNTS)
        attempt("fastopt.prune.global_magnitude_masks", prune.global_magnitude_masks, ws,
                draw(amount), dtype=draw(dtype), **backend)
    elif fn == "random_mask":
        attempt("fastopt.prune.random_mask", prune.random_mask, w, draw(amount),
                seed=draw(pick(valid, SEEDS, ODD_SEEDS)), dtype=draw(dtype), **backend)
    elif fn == "ln_structured_mask":
        n = draw(pick(valid, st.sampled_from((1, 2, INF, -INF, "fro", 0.5, 3)),
                      st.sampled_from((0, -1, NAN, "nuc", None))))
        dim = draw(pick(valid, _dims(spec.shape), AXES))
        rows = spec.shape[dim] if valid and spec.shape else 0
        amount = pick(valid, st.one_of(st.floats(0, 1), st.integers(0, rows)), ODD_AMOUNTS)
        attempt("fastopt.prune.ln_structured_mask", prune.ln_structured_mask, w,
                draw(amount), n, dim, dtype=draw(dtype))
    elif fn == "nm_mask":
        dim = draw(pick(valid, _dims(spec.shape), AXES))
        width = spec.shape[dim] if valid and spec.shape else 0
        m = draw(pick(valid, st.sampled_from([k for k in (1, 2, 4, 8) if width % k == 0]),
                      INTS))
        n = draw(pick(valid, st.integers(0, max(m, 0)) if isinstance(m, int) else st.just(0),
                      INTS))
        attempt("fastopt.prune.nm_mask", prune.nm_mask, w, n, m, dim, dtype=draw(dtype))
    elif fn in ("apply_mask_", "apply_mask"):
        good = st.one_of(specs(shape=spec.shape, dtype="bool", fw=fw),
                         specs(shape=spec.shape, dtype="uint8", fw=fw))
        mask = build(draw(pick(valid, good, st.one_of(specs(shape=spec.shape, fw=fw),
                                                      specs()))))
        attempt(f"fastopt.prune.{fn}", getattr(prune, fn), w, mask)
    else:
        steps = st.integers(0, 100)
        begin = draw(pick(valid, steps, INTS))
        end = draw(st.integers(begin, 200) if valid else st.one_of(steps, INTS))
        sparsity, power = pick(valid, GOOD_UNIT, UNIT), pick(valid, GOOD_REALS, REALS)
        attempt("fastopt.prune.polynomial_sparsity", prune.polynomial_sparsity,
                draw(pick(valid, steps, INTS)), draw(sparsity), draw(sparsity), begin, end,
                draw(power))


# -- quantization ----------------------------------------------------------------------

QDTYPES = st.sampled_from(("int8", "uint8", "int4", "uint4", np.int8, np.uint8))
ODD_QDTYPES = st.sampled_from(("int16", "float32", None, "INT8", np.float32))
QUANT_FNS = ("quantize", "dequantize", "fake_quantize", "fake_quantize_backward", "qparams",
             "pack_int4", "unpack_int4", "observer")
QRANGES = st.sampled_from(((-128, 127), (0, 255), (-8, 7), (0, 15), (0, 0), (-2**31, 2**31 - 1),
                           (-(2**40), 2**40)))
ODD_QRANGES = st.sampled_from(((5, -5), (0.5, 3), (None, 1), (-2**31 - 1, 0), (0, "7")))


def _channel_params(draw, fw, shape, axis, valid, zlo, zhi):
    """(scale, zero_point), one each per tensor or per channel of `axis`, zero points in
    [zlo, zhi] when valid."""
    count = shape[axis] if isinstance(axis, int) and not isinstance(axis, bool) \
        and shape and -len(shape) <= axis < len(shape) else 1
    if valid or draw(st.booleans()):
        seed = draw(st.integers(0, 99))
        tiny = draw(st.sampled_from((1e-3, 1e-3, 1e-30, 1e-45)))
        if axis is None:
            rng = np.random.default_rng(seed)
            return float(rng.uniform(tiny, 1)), int(rng.integers(zlo, zhi + 1))
        wrap = "torch.from_numpy({})" if fw == "torch" else "{}"
        rng = f"np.random.default_rng({seed})"
        return (made(wrap.format(f"{rng}.uniform({tiny!r}, 1, {count})")),
                made(wrap.format(f"{rng}.integers({zlo}, {zhi + 1}, {count})")))
    scale = draw(st.sampled_from(("number", f"np.ones({count + 1})", f"np.zeros({count})",
                                  f"np.full({count}, np.nan)", f"np.ones(({count}, 1))",
                                  f"[0.1] * {count}", f"np.ones({count}, np.float16)",
                                  f"np.full({count}, -1)", f"np.full({count}, 2**40)")))
    zp = draw(st.sampled_from(("number", f"np.zeros({count}, np.int64)", f"np.zeros({count})",
                               "np.array([True])", "0.5", "300", "-300")))
    return (draw(POSITIVE) if scale == "number" else made(scale),
            draw(INTS) if zp == "number" else made(zp))


def fuzz_quant(data):
    draw = data.draw
    quant = fastopt.quant
    valid = draw(st.booleans(), label="valid")
    fw = draw(st.sampled_from(FRAMEWORKS), label="framework")
    fn = draw(st.sampled_from(QUANT_FNS), label="function")
    backend = {"backend": draw(pick(valid, st.sampled_from(BACKENDS), st.sampled_from(
        ("cupy", "bogus"))))}
    codes = ("uint8",) if fn == "unpack_int4" else ("int8", "uint8")
    code_spec = specs(fw=fw, dtype=draw(st.sampled_from(codes)) if valid else None)
    spec = draw(code_spec if fn in ("dequantize", "pack_int4", "unpack_int4")
                else specs(fw=fw, valid=valid), label="x")
    x = build(spec)
    ndim = len(spec.shape)
    axis = draw(pick(valid, st.one_of(st.none(), _dims(spec.shape)) if ndim else st.none(),
                     AXES))
    qdtype = draw(pick(valid, QDTYPES, ODD_QDTYPES))
    qmin, qmax = draw(pick(valid, QRANGES, ODD_QRANGES))
    if fn in ("fake_quantize", "fake_quantize_backward"):
        zlo, zhi = (qmin, qmax) if valid else (-8, 7)
    elif fn == "dequantize":
        zlo, zhi = (-128, 127) if spec.dtype == "int8" else (0, 255)
    else:
        zlo, zhi = (0, 7)  # in every code range
    scale, zp = _channel_params(draw, fw, spec.shape, axis, valid, max(zlo, -2**40),
                                min(zhi, 2**40))
    if fn == "quantize":
        attempt("fastopt.quant.quantize", quant.quantize, x, scale, zp, qdtype, axis, **backend)
    elif fn == "dequantize":
        attempt("fastopt.quant.dequantize", quant.dequantize, x, scale, zp, axis,
                dtype=draw(pick(valid, st.sampled_from(("float32", "float64", np.float64)),
                                st.sampled_from(("float16", "int8", None)))), **backend)
    elif fn == "fake_quantize":
        attempt("fastopt.quant.fake_quantize", quant.fake_quantize, x, scale, zp, qmin, qmax,
                axis, **backend)
    elif fn == "fake_quantize_backward":
        gy = build(draw(like(spec, valid)))
        attempt("fastopt.quant.fake_quantize_backward", quant.fake_quantize_backward, gy, x,
                scale, zp, qmin, qmax, axis, **backend)
    elif fn == "qparams":
        attempt("fastopt.quant.qparams", quant.qparams, x, qdtype, axis,
                draw(pick(valid, st.booleans(), st.sampled_from((None, 1)))),
                draw(pick(valid, st.sampled_from(("minmax", "percentile", "mse")),
                          st.just("kl"))),
                percentile=draw(pick(valid, st.sampled_from((99.99, 50.0, 100.0, 75.5)),
                                     st.sampled_from((0.0, 101.0, -1.0, NAN)))),
                grid=draw(pick(valid, st.sampled_from((1, 2, 17, 100)),
                               st.sampled_from((0, -1, 2.5, True)))))
    elif fn == "pack_int4":
        if valid:  # codes in the 4-bit range of their dtype
            lo, hi = (-8, 8) if spec.dtype == "int8" else (0, 16)
            source = (f"np.random.default_rng({spec.seed}).integers({lo}, {hi}, "
                      f"{spec.shape}).astype({spec.dtype!r})")
            x = made(f"torch.from_numpy({source})" if fw == "torch" else source)
        attempt("fastopt.quant.pack_int4", quant.pack_int4, x)
    elif fn == "unpack_int4":
        n = draw(pick(valid, st.integers(0, 2 * math.prod(spec.shape)), INTS))
        attempt("fastopt.quant.unpack_int4", quant.unpack_int4, x, n,
                signed=draw(pick(valid, st.booleans(), BOOLS)))
    else:
        status, obs = attempt("fastopt.quant.MovingAverageObserver",
                              quant.MovingAverageObserver, qdtype, axis,
                              draw(pick(valid, st.booleans(), st.just(1))),
                              draw(pick(valid, st.sampled_from((0.01, 1.0, 0.5)),
                                        st.sampled_from((0.0, -0.5, 2.0, NAN)))), bind="obs")
        if status == "ok":
            for s in draw(st.lists(like(spec, valid), min_size=1, max_size=3)):
                attempt("obs.observe", obs.observe, build(s))
            attempt("obs.qparams", obs.qparams)


# -- distillation ----------------------------------------------------------------------

def fuzz_distill(data):
    draw = data.draw
    valid = draw(st.booleans(), label="valid")
    fw = draw(st.sampled_from(FRAMEWORKS), label="framework")
    shape = draw(st.tuples(st.integers(0, 8), st.sampled_from((1, 2, 511, 512, 513, 1531, 3000)))
                 if valid else st.one_of(SHAPES, st.tuples(st.integers(0, 8),
                                                           st.integers(0, 1100))))
    s_spec = draw(specs(fw=fw, shape=shape, valid=valid), label="student")
    t_spec = draw(like(s_spec, valid), label="teacher")
    rows, classes = (shape + (1, 1))[:2]
    kind = draw(st.sampled_from(("none", "good", "good") if valid else ("good", "odd")),
                label="labels")
    if kind == "none":
        labels = None
    elif kind == "good":
        ldt = draw(st.sampled_from(("int64", "int32", "uint8", "int8", "uint64")))
        source = (f"np.random.default_rng({draw(st.integers(0, 99))})"
                  f".integers(0, {max(classes, 1)}, {rows}).astype({ldt!r})")
        labels = made(f"torch.from_numpy({source})" if fw == "torch" and ldt != "uint64"
                      else source)
    else:
        labels = build(draw(specs(fw=fw)))
    temperature = pick(valid, st.sampled_from((4.0, 1.0, 2.0, 8.0, 0.5, 1e-30, 1e30)),
                       st.sampled_from(ODD_NUMBERS))
    reductions = st.sampled_from(("batchmean", "sum", "mean", "none"))
    attempt("fastopt.distill.kd_loss", fastopt.distill.kd_loss, build(s_spec), build(t_spec),
            labels, temperature=draw(temperature),
            alpha=draw(pick(valid, st.sampled_from((0.0, 0.5, 0.9, 1.0)), UNIT)),
            reduction=draw(pick(valid, reductions, st.sampled_from(("max", None)))),
            backend=draw(pick(valid, st.sampled_from(BACKENDS),
                              st.sampled_from(("cupy", "bogus")))))


# -- running ---------------------------------------------------------------------------

def selftest_refused(data):
    attempt("int", int, "not a number")  # ValueError: allowed


def selftest_error(data):
    attempt("operator.truediv", operator.truediv, data.draw(st.integers(0, 3)), 0)


def selftest_crash(data):
    import ctypes
    attempt("ctypes.string_at", ctypes.string_at, 0)  # reads address 0: SIGSEGV


TARGETS = {"optimizers": fuzz_optimizers, "clip": fuzz_clip, "prune": fuzz_prune,
           "quant": fuzz_quant, "distill": fuzz_distill,
           # the harness's own checks (tests/test_fuzz.py): what passes, what fails
           "selftest-refused": selftest_refused, "selftest-error": selftest_error,
           "selftest-crash": selftest_crash}


def run(family, examples, seed=None, shrink=False):
    def example(data):
        _BUILT.clear()
        HISTORY.clear()
        # the default thread count of the kernels (optimizers without n_threads, clipping,
        # pruning, quantization, distillation)
        fastopt.set_num_threads(data.draw(st.sampled_from((2, 1, 3, 16)), label="threads"))
        TARGETS[family](data)

    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # nothing lands in the checkout
        home = tempfile.mkdtemp(prefix="fastopt-fuzz-")
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = home
    phases = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if shrink else ())
    test = given(data=st.data())(example)
    if seed is not None:
        from hypothesis import seed as fixed_seed
        test = fixed_seed(seed)(test)
    test = settings(max_examples=examples, derandomize=seed is None, database=None,
                    deadline=None, phases=phases, print_blob=False,
                    suppress_health_check=list(HealthCheck))(test)
    test()


def main(argv=None):
    global torch, FRAMEWORKS, SURVEY
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("family", choices=tuple(TARGETS))
    parser.add_argument("--torch", action="store_true", help="also draw torch tensors")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--trace", help="write each call's reproducer here before it runs")
    parser.add_argument("--survey", action="store_true",
                        help="list every distinct failure instead of stopping at the first")
    parser.add_argument("--seed", type=int, help="a random seed instead of derandomize")
    parser.add_argument("--shrink", action="store_true", help="shrink a failing example")
    args = parser.parse_args(argv)
    if args.torch:
        import torch as torch_module
        torch = torch_module
        FRAMEWORKS = ("numpy", "torch")
    if args.trace:
        Trace.file = open(args.trace, "w")
    if args.survey:
        SURVEY = {}
    import faulthandler
    import warnings
    faulthandler.enable()
    warnings.simplefilter("ignore")  # overflow in casts, non-writable tensors: expected here
    run(args.family, args.examples, args.seed, args.shrink)
    if SURVEY is not None:
        print("calls:", ", ".join(f"{k[0]} {k[1]} {v}" for k, v in sorted(STATS.items())))
    if SURVEY:
        for (kind, where, _), (count, message, text) in sorted(SURVEY.items()):
            print(f"== {kind} at {where} (x{count}): {message}\n   {text}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
