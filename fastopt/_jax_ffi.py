"""fastopt's C optimizer kernels inside ``jax.jit``, through XLA's FFI (private).

The handler (kernels/cpu/xla_loops.h, built into fastopt._cpu._xla) runs one elementwise
kernel of the rule table over many tensors in one OpenMP pass, as the Cython backend does,
with bit-identical results. Here it is registered with jax and staged as one
``jax.ffi.ffi_call`` per step, each parameter and state array aliased to its result: a
jitted step that donates them updates them in place, without copies.

The front end that turns optimizer hyperparameters into the scalar struct and walks pytrees
builds on these functions; jax is imported only inside them, so importing this module (and
fastopt) loads no framework.
"""

import functools
import operator
import threading

import numpy as np

from fastopt import _interop, _rules
from fastopt._backends import _formats
from fastopt._cpu import _xla

TARGET = _xla.ELEMENTWISE  # "fastopt_elementwise_v1"
FACTORED = _xla.FACTORED   # "fastopt_factored_v1": optax's Adafactor passes
KERNELS = _xla.KERNELS     # {kernel name: number of state operands (a factor included)}
COUNTS = _xla.COUNTS       # the same of the cautious count kernels

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# 8-bit state: elements per block scale, and the dynamic maps (signed, unsigned)
_Q8_BLOCK = _formats.BLOCK
_QMAPS = np.stack([_formats.QMAPS[_formats.Q8S], _formats.QMAPS[_formats.Q8U]])
_register_lock = threading.Lock()
_registered = False


def register():
    """Register fastopt's FFI handlers with jax for the CPU platform (XLA's typed FFI).

    Once per process: later calls return at once, and concurrent first calls register once.
    The CPU backend is started first: jax hands a registration made before that to the
    backend's start, where a refused handler (an XLA whose FFI version range excludes the
    handler's, fastopt/xla_ffi.h) would stop the whole backend from starting; made after, a
    refusal raises here, as a RuntimeError naming the target, and leaves jax usable.
    """
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        import jax
        try:
            jax.devices("cpu")
        except RuntimeError as e:
            raise RuntimeError(f"fastopt's XLA FFI handlers run on jax's CPU backend, which "
                               f"is not available: {e}") from e
        for name, capsule in _xla.targets().items():
            try:
                jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
            except RuntimeError as e:  # jax.errors.JaxRuntimeError, with XLA's reason
                raise RuntimeError(f"jax refused fastopt's XLA FFI handler {name!r}: {e}") from e
        _registered = True


def record_bytes(args, dtype, scalars):
    """The scalar struct of a kernel (`args`, a fastopt._rules.Args) for parameters of
    `dtype` (float32 or float64), from its host scalars (a dict of exactly its fields, as
    the fastopt._scalars functions give them), packed as the handler reads it: a 1-D uint8
    NumPy array, zero-padded to a multiple of 8 bytes."""
    if not isinstance(args, _rules.Args):
        raise TypeError(f"args: expected a fastopt._rules.Args, got {type(args).__name__}")
    dtype = _float_dtype(dtype, "dtype")
    return np.ascontiguousarray(_rules.pack(args.record(dtype, scalars)))


def elementwise(kernel, record, params, grads, states, n_threads, delta=False, masks=None,
                formats=None, into_grad=False, shadow=None, scales=None, sums=None,
                discard=False, guard=None):
    """One step of elementwise kernel `kernel` over many tensors, as one XLA custom call on
    jax's CPU backend; works eagerly and inside ``jax.jit`` (and ``jax.vmap``, one call per
    batch element).

    Args:
        kernel: a kernel name of the rule table (fastopt._rules.KERNELS, e.g. "adam",
            "sgd_momentum", or a cautious step of fastopt._rules.CAUTIOUS_KERNELS, e.g.
            "adam_cautious"); see KERNELS for each one's number of state operands.
        record: its scalar struct as packed bytes, a 1-D uint8 array: concrete
            (record_bytes) or computed inside the jitted function.
        params, grads: lists of float32 or float64 arrays, all of one dtype, each gradient
            shaped like its parameter.
        states: per tensor, the list of the kernel's state arrays in the kernel's order
            (fastopt._rules.ALL_KERNELS[kernel].state), each shaped like its parameter; a
            cautious step's last is the tensor's factor, one element (not updated, so not
            among the results).
        n_threads: the OpenMP threads the step may use (small steps take fewer).
        delta: return each new parameter's difference from the parameter (optax's updates:
            new - old, rounded once to the dtype) in place of the new parameter, computed
            chunk by chunk in the same pass.
        masks: None, or per tensor a pruning mask (bool or uint8 of the parameter's shape; 0
            prunes an entry: its new parameter and state are +0) or None (no mask).
        into_grad: the new parameters as they are (not with `delta` or `formats`), each
            aliased to its gradient as `delta`'s differences are: for a pass whose "new
            parameter" is a scratch result read by a later pass (Lamb's update direction),
            which then takes the dead gradient's buffer rather than a copy of the
            parameters.
        formats: None, or (stochastic, keys, step): the kernel computes in float32 (the
            record is its float32 struct) on parameters stored as float32, bfloat16 or
            float16, gradients of their dtype or float32, state arrays of any of the three
            (each the same for every tensor); the written ones are rounded stochastically
            (Philox bits from each tensor's key, keys[t] of an (n, 2) uint32 or int32 array
            of fastopt._backends._formats.tensor_key, and `step`, a traced or concrete
            int32) or to nearest even. A cautious step's factors (its last state operand)
            are float32 then.
        shadow: None, or (with `formats`, not `delta`) master weights: per tensor the
            bfloat16 or float16 parameter (all of one dtype) whose float32 master copy is
            its entry of `params`; the kernel updates the copy, and the parameter gets the
            new copy rounded (as the array API's ``master_weights``); the gradients may be
            of the parameters' dtype or float32. Each is aliased to its result and not read.
        scales: None, or (with `formats`) blockwise 8-bit state: the state arrays that are
            uint8 (the same for every tensor) hold the codes of the array API's
            ``state_dtype="int8"`` (the signed map for the states of
            fastopt._rules.SIGNED_STATE, else the unsigned one), and scales[t] lists their
            block scales in state order, float32 of ceil(size / 256) elements each, updated
            with them (aliased to results).
        sums: None, or (not with delta or formats) (operand, kind) pairs, at most four: the
            pass also sums those of the kernel's operands (0 the parameter, only with
            `discard` or `into_grad`: otherwise its buffer is the new parameter's; 1 the new
            parameter; 2 the gradient, not with `into_grad`, whose new parameters go over
            it; 3 + s the new state s) as each chunk leaves it, while it is in cache (the
            written ones with pruned entries zeroed, as the array API's pass_sums): kind 1
            the sum of |x|, 2 of x x, 3 of x, each tensor's in fastopt/reduce.h's fixed
            order (per chunk, the chunks in order, in float64).
        discard: with `sums`, the new parameters are not stored (nor returned): a pass whose
            "new parameter" is a term whose sum is its one use (Prodigy's), which then
            needs no buffer. Not for a kernel with factors.
        guard: None, or a 0-d bool or integer (traced or concrete): where it is false the
            step is skipped: every result equals its input (with `delta` the differences
            are +0, and the sums are 0), in place under donation. The call for
            ``skip_nonfinite``, without a ``lax.cond`` around it, whose branch result XLA
            would copy into a fresh buffer every step.

    Returns:
        (new_params, new_states), with `shadow` the new parameters after them and with
        `scales` the new block scales last: lists shaped as `params`, `states`, `shadow`
        and `scales` (with `delta`, the differences in place of the new parameters; with
        `discard`, None). With `sums`, last an array of shape (len(params), len(sums)) in
        jax's default float type (float64 under jax_enable_x64, else float32): each
        tensor's sums, rounded once. For
        "lamb_update" (the first pass of Lamb) the "new parameter" is the update direction
        u, which the caller scales per tensor and applies.

    Each state array is aliased to its result, and each parameter too unless `delta`: when a
    jitted function donates them, XLA updates their buffers in place; otherwise it copies
    them first (a pass over the parameters and the state) and the kernel updates the copies.
    With `delta` the parameters are only read and each difference is aliased to its
    gradient where their dtypes agree: inside a jitted training step, whose gradients are
    dead after the update, the updates take their buffers, where buffers of their own would
    be a second set of temporaries (on jax's CPU backend, allocated and page-faulted at every
    call past 32 MiB: 2x optax's time at 10M float32); a gradient passed in (not donated) is
    copied first, which costs about what the new buffer would.
    """
    import jax

    name = _kernel_name(kernel, KERNELS, "elementwise")
    n_state, n_aux = KERNELS[name], _rules.ALL_KERNELS[name].aux
    if shadow is not None:
        if formats is None or delta:
            raise ValueError("shadow: only with formats, and not with delta")
        shadow = _shadow(shadow, params)
    params, grads, states, dtype = _operands(
        name, n_state, n_aux, params, grads, states, formats is not None,
        shadow[0].dtype if shadow else None, scales is not None)
    quantized, scales = _quantized(states, scales, params, formats)
    n_threads = _threads(n_threads)
    for flag, value in (("delta", delta), ("into_grad", into_grad)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__}")
    if into_grad and (delta or formats is not None):
        raise ValueError("into_grad: not with delta or formats")
    code = _sum_pairs(sums, discard, into_grad, 3 + n_state - n_aux, n_aux,
                      delta or formats is not None)
    masks = _masks(masks, params)
    n = len(params)
    summed = jax.ShapeDtypeStruct((n, len(sums)), jax.numpy.result_type(float)) \
        if sums else None
    if n == 0:
        return ((None if discard else [], []) + ([],) * ((shadow is not None)
                                                         + (scales is not None))
                + ((jax.numpy.zeros(summed.shape, summed.dtype),) if sums else ()))
    record = _record(record, name, np.dtype(np.float32) if formats is not None else dtype)

    register()
    operands, results, aliases = [record], [], {}
    for t, (p, g, ss) in enumerate(zip(params, grads, states)):
        for i, x in enumerate((p, g, *ss)):
            # the gradient and a factor are read only; with discard, the parameter too
            if i != 1 and i < 2 + n_state - n_aux and not (i == 0 and discard):
                if i > 1 or not (delta or into_grad):
                    aliases[len(operands)] = len(results)
                elif g.dtype == p.dtype:  # with delta the parameter's is the gradient's
                    aliases[len(operands) + 1] = len(results)
                results.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
            operands.append(x)
        if shadow is not None:
            aliases[len(operands)] = len(results)
            results.append(jax.ShapeDtypeStruct(shadow[t].shape, shadow[t].dtype))
            operands.append(shadow[t])
        for x in scales[t] if quantized else ():
            aliases[len(operands)] = len(results)
            results.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
            operands.append(x)
        if masks is not None:
            operands.append(masks[t])
    extra = {}
    if sums:
        results.append(summed)
        extra = dict(sums=np.int64(code), discard=np.int64(bool(discard)))
    if formats is not None:
        operands += _formats_operands(formats, n)
        extra = dict(formats=np.int64(1), stochastic=np.int64(bool(formats[0])))
        if shadow is not None:
            extra["shadow"] = np.int64(1)
        if quantized:
            operands += _q8_operands(name, quantized, extra)
    operands += _guard_operands(guard, extra)
    out = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases,
                           vmap_method="sequential")(
        *operands, kernel=name, n_tensors=np.int64(n), n_threads=np.int64(n_threads),
        delta=np.int64(bool(delta)), into_grad=np.int64(bool(into_grad)),
        masked=np.int64(masks is not None), **extra)
    n_q = len(quantized) if scales is not None else 0
    first = 0 if discard else 1  # a tensor's first state result
    step = first + n_state - n_aux + (shadow is not None) + n_q
    new = (None if discard else [out[t * step] for t in range(n)],
           [list(out[t * step + first:t * step + first + n_state - n_aux]) for t in range(n)])
    if shadow is not None:
        new += ([out[t * step + 1 + n_state - n_aux] for t in range(n)],)
    if scales is not None:
        new += ([list(out[(t + 1) * step - n_q:(t + 1) * step]) for t in range(n)],)
    if sums:
        new += (out[-1],)
    return new


def _sum_pairs(sums, discard, into_grad, n_operands, n_aux, excluded):
    """The handler's sums attribute for `sums` ((operand, kind) pairs; see elementwise):
    pair j in byte j as 1 + 4 operand + kind; 0 for none."""
    if not isinstance(discard, (bool, np.bool_)):
        raise TypeError(f"discard: expected a bool, got {type(discard).__name__}")
    if not sums:
        if discard:
            raise ValueError("discard: only with sums")
        return 0
    if excluded:
        raise ValueError("sums: not with delta or formats")
    if discard and n_aux:
        raise ValueError("discard: not for a kernel with factors")
    if len(sums) > 4 or not all(
            isinstance(pair, tuple) and len(pair) == 2 and pair[0] in range(n_operands)
            and pair[1] in (1, 2, 3) for pair in sums):
        raise ValueError(f"sums: expected up to 4 (operand, kind) pairs, each operand below "
                         f"{n_operands} and kind 1, 2 or 3, got {sums!r}")
    if not (discard or into_grad) and any(op == 0 for op, _ in sums):
        raise ValueError("sums: operand 0 (the parameter) only with discard or into_grad: "
                         "the pass writes the new parameter over it")
    if into_grad and any(op == 2 for op, _ in sums):
        raise ValueError("sums: operand 2 (the gradient) not with into_grad: the pass "
                         "writes the new parameter over it")
    return sum((1 + 4 * op + kind) << (8 * j) for j, (op, kind) in enumerate(sums))


def factored(phase, scalars, params, grads, firsts, seconds, infos, n_threads, coefs=None,
             moments=None, decay=False, delta=False, guard=None):
    """One phase of optax's Adafactor over many tensors (kernels/cpu/xla_factored.h, which
    documents the phases and the operands), as one XLA custom call.

    `scalars` (clip, gscale, decay, 1 - decay, eps) and `coefs` ((n, 6), phase 2) are arrays
    of the parameters' dtype; `infos` per tensor an int32 array (B, R, C, mode); `firsts`
    and `seconds` per tensor the statistics of its first and second factored dimension, or
    its second moment and an empty array (a vector). Phase 0 takes no `params` (None) and
    returns (firsts, seconds) updated; phase 1 returns (firsts, means), the vectors' second
    moments updated and the (n, 2) means of u u and p p; phase 2 returns (the new params,
    or with `delta` optax's updates, and the new `moments`, or None). The statistics, the
    moments and the params (without `delta`; with it, the updates take the gradients'
    buffers) are aliased to their results. Where `guard` (as elementwise's) is false the
    phase changes nothing: its results are its inputs, the updates +0, the means 0."""
    import jax

    n = len(grads)
    dtype = scalars.dtype
    if n == 0:
        return ([], []) if phase == 0 else ([], jax.numpy.zeros((0, 2), dtype)) \
            if phase == 1 else ([], None if moments is None else [])
    register()
    first = [scalars] + ([coefs] if phase == 2 else [])
    operands, results, aliases = list(first), [], {}
    for t in range(n):
        if phase:
            if phase == 2:
                at = len(operands) + (1 if delta else 0)  # the gradient's, with delta
                aliases[at] = len(results)
            # phase 1 writes a vector's second moment (a), a factored tensor's a not
            elif seconds[t].size == 0:
                aliases[len(operands) + 2] = len(results)
            results.append(jax.ShapeDtypeStruct(params[t].shape, dtype) if phase == 2
                           else jax.ShapeDtypeStruct(firsts[t].shape, dtype))
            operands.append(params[t])
        else:
            aliases[len(operands) + 1] = len(results)
            aliases[len(operands) + 2] = len(results) + 1
            results += [jax.ShapeDtypeStruct(firsts[t].shape, dtype),
                        jax.ShapeDtypeStruct(seconds[t].shape, dtype)]
        operands += [grads[t], firsts[t], seconds[t], infos[t]]
        if phase == 2 and moments is not None:
            aliases[len(operands)] = len(results)
            results.append(jax.ShapeDtypeStruct(moments[t].shape, dtype))
            operands.append(moments[t])
    if phase == 1:
        results.append(jax.ShapeDtypeStruct((n, 2), dtype))
    extra = dict(momentum=np.int64(moments is not None), decay=np.int64(bool(decay)),
                 delta=np.int64(bool(delta))) if phase == 2 else {}
    operands += _guard_operands(guard, extra)
    out = jax.ffi.ffi_call(FACTORED, results, input_output_aliases=aliases,
                           vmap_method="sequential")(
        *operands, phase=np.int64(phase), n_tensors=np.int64(n),
        n_threads=np.int64(_threads(n_threads)), **extra)
    if phase == 0:
        return [out[2 * t] for t in range(n)], [out[2 * t + 1] for t in range(n)]
    if phase == 1:
        return list(out[:n]), out[n]
    step = 2 if moments is not None else 1
    return ([out[step * t] for t in range(n)],
            [out[step * t + 1] for t in range(n)] if moments is not None else None)


def caution_counts(kernel, record, params, grads, states, n_threads, formats=None,
                   scales=None, low=None, masks=None, guard=None):
    """The cautious option's count pass as one XLA custom call: per tensor, how many of its
    elements agree (K = 1) and are not pruned (`masks`), an int32 array of one count per
    tensor; nothing is written. `kernel` is a cautious count kernel (COUNTS, e.g.
    "adam_caution"); the other arguments as elementwise's (the state: the arrays the count
    reads, fastopt._rules' Caution.count.state; with `formats` and `scales` stored as the
    step's, loaded as it loads them, and with master weights `low` the parameters' dtype,
    which the gradients may have; where `guard` is false, every count is 0)."""
    import jax
    import jax.numpy as jnp

    name = _kernel_name(kernel, COUNTS, "cautious count")
    params, grads, states, dtype = _operands(name, COUNTS[name], 0, params, grads, states,
                                             formats is not None, low, scales is not None)
    quantized, scales = _quantized(states, scales, params, formats)
    masks = _masks(masks, params)
    n_threads = _threads(n_threads)
    if not params:
        return jnp.zeros(0, jnp.int32)
    record = _record(record, name, np.dtype(np.float32) if formats is not None else dtype)
    register()
    operands = [record]
    for t, (p, g, ss) in enumerate(zip(params, grads, states)):
        operands += [p, g, *ss, *(scales[t] if quantized else ())]
        if masks is not None:
            operands.append(masks[t])
    extra = {}
    if formats is not None:
        operands += _formats_operands(formats, len(params))
        extra = dict(formats=np.int64(1), stochastic=np.int64(0))
        if quantized:
            operands += _q8_operands(name, quantized, extra)
    operands += _guard_operands(guard, extra)
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((len(params),), jnp.int32),
                            vmap_method="sequential")(
        *operands, kernel=name, n_tensors=np.int64(len(params)),
        n_threads=np.int64(n_threads), count=np.int64(1), masked=np.int64(masks is not None),
        **extra)


def _quantized(states, scales, params, formats):
    """(the indices of the uint8 (8-bit) state arrays, their block scales checked), from
    tensor 0's state arrays and `scales` (only with formats)."""
    quantized = [k for k, x in enumerate(states[0]) if np.dtype(x.dtype) == np.uint8] \
        if states else []
    if scales is not None:
        if formats is None:
            raise ValueError("scales: only with formats")
        scales = _scales(scales, params, quantized)
    return quantized, scales


def _q8_operands(name, quantized, attributes):
    """The maps and the quantizer's tables, the operands that follow the keys and the step
    with 8-bit state; sets the q8_unsigned attribute in `attributes`: which of kernel
    `name`'s states take the unsigned map."""
    import jax.numpy as jnp

    names = _rules.ALL_KERNELS[name].state
    attributes["q8_unsigned"] = np.int64(sum(1 << k for k in quantized
                                             if names[k] not in _rules.SIGNED_STATE))
    return [jnp.asarray(_QMAPS), jnp.asarray(_qtables())]


def _formats_operands(formats, n):
    """The keys (int32, the uint32 bits) and the step of `formats` ((stochastic, keys, step))
    for `n` tensors, the operands that follow the tensors' with formats."""
    import jax
    import jax.numpy as jnp

    _, keys, step = formats
    keys = jnp.asarray(keys)
    if keys.shape != (n, 2) or keys.dtype not in (jnp.uint32, jnp.int32):
        raise ValueError(f"formats: expected the keys as (n_tensors, 2) uint32, got "
                         f"{keys.dtype} {keys.shape}")
    if keys.dtype == jnp.uint32:  # the handler reads the bits as uint32
        keys = jax.lax.bitcast_convert_type(keys, jnp.int32)
    return [keys, jnp.asarray(step, jnp.int32)]


def _guard_operands(guard, attributes):
    """The guard's operand (a 0-d int32, the handler's last) and its attribute, set in
    `attributes`; none for no guard."""
    import jax.numpy as jnp

    if guard is None:
        return []
    guard = jnp.asarray(guard)
    if guard.shape != () or not (jnp.issubdtype(guard.dtype, jnp.integer)
                                 or guard.dtype == jnp.bool_):
        raise TypeError(f"guard: expected a 0-d bool or integer, got {guard.dtype} "
                        f"{guard.shape}")
    attributes["guarded"] = np.int64(1)
    return [(guard != 0).astype(jnp.int32)]


def _masks(masks, params):
    """The handler's mask operands (uint8; an empty one for a tensor without a mask), or
    None for no masks."""
    import jax.numpy as jnp

    if masks is None:
        return None
    masks = list(masks) if isinstance(masks, (list, tuple)) else masks
    if not isinstance(masks, list) or len(masks) != len(params):
        raise ValueError(f"masks: expected a list of {len(params)} masks (one per tensor, None "
                         f"for none), got {type(masks).__name__}")
    out = []
    for t, (m, p) in enumerate(zip(masks, params)):
        if m is None:
            out.append(jnp.zeros(0, jnp.uint8))
            continue
        if not (hasattr(m, "shape") and hasattr(m, "dtype")):
            raise TypeError(f"masks[{t}]: expected a bool or uint8 array, got "
                            f"{type(m).__name__}")
        if np.dtype(m.dtype) not in (np.dtype(np.bool_), np.dtype(np.uint8)):
            raise TypeError(f"masks[{t}]: expected a bool or uint8 array, got {m.dtype}")
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"masks[{t}]: expected the shape of params[{t}], "
                             f"{tuple(p.shape)}, got {tuple(m.shape)}")
        out.append(jnp.asarray(m).astype(jnp.uint8))
    return None if all(m is None for m in masks) else out


def _scales(scales, params, quantized):
    """The block scales of the 8-bit state arrays (states `quantized`), checked: per tensor
    one float32 array of ceil(size / 256) elements for each."""
    if not isinstance(scales, (list, tuple)) or len(scales) != len(params):
        raise ValueError(f"scales: expected a list of {len(params)} lists (one per tensor) "
                         f"of block scales")
    out = []
    for t, (xs, p) in enumerate(zip(scales, params)):
        xs = _array_list(xs, f"scales[{t}]")
        if len(xs) != len(quantized):
            raise ValueError(f"scales[{t}]: expected the block scales of the {len(quantized)} "
                             f"uint8 state arrays, got {len(xs)}")
        blocks = -(-int(np.prod(p.shape)) // _Q8_BLOCK)
        for k, x in enumerate(xs):
            if np.dtype(x.dtype) != np.float32 or int(np.prod(x.shape)) != blocks:
                raise ValueError(f"scales[{t}][{k}]: expected float32 of {blocks} elements "
                                 f"(one per {_Q8_BLOCK} of params[{t}]), got {x.dtype} "
                                 f"{tuple(x.shape)}")
        out.append(xs)
    return out


@functools.lru_cache(maxsize=None)
def _qtables():
    """The quantizer's lookup tables of the two maps, as the handler takes them: the uint32
    bits as int32."""
    from fastopt._cpu import _optim
    return np.stack([_optim.q8_table(m) for m in _QMAPS]).view(np.int32)


def _shadow(shadow, params):
    """The low-precision parameters of master weights, checked: one per tensor, all
    bfloat16 or all float16, each its master copy's shape."""
    params, shadow = _array_list(params, "params"), _array_list(shadow, "shadow")
    if len(shadow) != len(params):
        raise ValueError(f"shadow: expected one entry per tensor, {len(params)}, got "
                         f"{len(shadow)}")
    lowp = (_interop.bfloat16(), np.dtype(np.float16))
    for t, (x, p) in enumerate(zip(shadow, params)):
        if np.dtype(x.dtype) not in lowp or np.dtype(x.dtype) != np.dtype(shadow[0].dtype):
            raise TypeError(f"shadow[{t}]: expected bfloat16 or float16 (as shadow[0]), got "
                            f"{x.dtype}")
        if tuple(x.shape) != tuple(p.shape):
            raise ValueError(f"shadow[{t}]: expected the shape of params[{t}], "
                             f"{tuple(p.shape)}, got {tuple(x.shape)}")
    if shadow and np.dtype(params[0].dtype) != np.float32:
        raise TypeError(f"params[0]: expected float32 (the master copies) with shadow, got "
                        f"{params[0].dtype}")
    return shadow


def _operands(name, n_state, n_aux, params, grads, states, formats=False, low=None,
              q8=False):
    """(params, grads, states, dtype), checked: lists of one dtype's arrays, one entry per
    tensor, each tensor's `n_state` state operands its parameter's shape but the last
    `n_aux` (one element each). With `formats`: parameters float32, bfloat16 or float16,
    gradients of their dtype (of `low`, the shadow's, where given) or float32, each state
    array any of the three (or with `q8`, uint8: 8-bit codes), the same for every
    tensor."""
    import jax

    params = _array_list(params, "params")
    grads = _array_list(grads, "grads")
    if not isinstance(states, (list, tuple)):
        raise TypeError(f"states: expected a list (per tensor) of lists of state arrays, got "
                        f"{type(states).__name__}")
    states = [_array_list(s, f"states[{t}]") for t, s in enumerate(states)]
    n = len(params)
    if len(grads) != n or len(states) != n:
        raise ValueError(f"params, grads, states: expected one entry per tensor, got "
                         f"{n}, {len(grads)} and {len(states)}")
    if n == 0:
        return params, grads, states, None

    dtype = np.dtype(params[0].dtype) if formats else _float_dtype(params[0].dtype,
                                                                   "params[0]")
    lowp = (np.dtype(np.float32), _interop.bfloat16(), np.dtype(np.float16))
    if formats:
        if dtype not in lowp:
            raise TypeError(f"params[0]: expected float32, bfloat16 or float16 with formats, "
                            f"got {dtype}")
        first = [np.dtype(x.dtype) for x in (params[0], grads[0], *states[0])]
        own = dtype if low is None else np.dtype(low)
        if first[1] not in (own, np.dtype(np.float32)):
            raise TypeError(f"grads[0]: expected {own} or float32, got {first[1]}")
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError("params: float64 tensors need jax_enable_x64 (jax would compute "
                         "them in float32)")
    for t in range(n):
        shape = tuple(params[t].shape)
        if len(states[t]) != n_state:
            raise ValueError(f"states[{t}]: kernel {name!r} takes {n_state} state arrays "
                             f"{_rules.ALL_KERNELS[name].state}, got {len(states[t])}")
        for k, x in enumerate((params[t], grads[t], *states[t])):
            what = (f"params[{t}]", f"grads[{t}]")[k] if k < 2 else f"states[{t}][{k - 2}]"
            factor = k >= 2 + n_state - n_aux
            if formats and factor and np.dtype(x.dtype) != np.float32:
                raise TypeError(f"{what}: expected the tensor's factor as float32 (the "
                                f"kernel computes in float32 with formats), got {x.dtype}")
            if formats and not q8 and k >= 2 and np.dtype(x.dtype) == np.uint8:
                raise ValueError(f"{what}: a uint8 (8-bit) state array needs its block "
                                 f"scales (scales=)")
            if formats and k < len(first):  # as tensor 0's operand
                if np.dtype(x.dtype) != first[k] or (
                        first[k] not in lowp and not (q8 and k >= 2 and first[k] == np.uint8)):
                    raise TypeError(f"{what}: expected {first[k]} (float32, bfloat16 or "
                                    f"float16{', uint8 for state' if q8 else ''}, as for "
                                    f"tensor 0), got {x.dtype}")
            elif np.dtype(x.dtype) != dtype:
                raise TypeError(f"{what}: expected {dtype} as params[0], got {x.dtype}")
            if factor:
                if int(np.prod(x.shape)) != 1:
                    raise ValueError(f"{what}: expected the tensor's factor, one element, got "
                                     f"shape {tuple(x.shape)}")
            elif tuple(x.shape) != shape:
                raise ValueError(f"{what}: expected the shape of params[{t}], {shape}, got "
                                 f"{tuple(x.shape)}")
    return params, grads, states, dtype


def _kernel_name(kernel, table, kind):
    if not isinstance(kernel, str):
        raise TypeError(f"kernel: expected a kernel name (str), got {type(kernel).__name__}")
    if kernel not in table:
        raise ValueError(f"kernel: no {kind} kernel named {kernel!r}; expected one of "
                         f"{', '.join(sorted(table))}")
    return kernel


def _threads(n):
    """`n` as an OpenMP thread count (a C int >= 1); NumPy integers count, bools do not."""
    if isinstance(n, bool):
        raise TypeError("n_threads: expected an integer >= 1, got a bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n_threads: expected an integer >= 1, got {type(n).__name__}") from None
    if not 1 <= n < 2**31:
        raise ValueError(f"n_threads: expected an integer >= 1 (and < 2**31), got {n}")
    return n


def _float_dtype(dtype, what):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: expected float32 or float64, got {dtype!r}") from None
    if dtype not in _FLOATS:
        raise TypeError(f"{what}: expected float32 or float64, got {dtype}")
    return dtype


def _array_list(xs, what):
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{what}: expected a list of arrays, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"{what}[{i}]: expected an array, got {type(x).__name__}")
    return list(xs)


def _record(record, kernel, dtype):
    """`record` checked to be the packed struct of `kernel` for `dtype`."""
    if isinstance(record, (bytes, bytearray)):
        record = np.frombuffer(record, np.uint8)
    if not (hasattr(record, "shape") and hasattr(record, "dtype")):
        raise TypeError(f"record: expected a uint8 array, got {type(record).__name__}")
    size = _record_size(kernel, dtype)
    if np.dtype(record.dtype) != np.uint8 or tuple(record.shape) != (size,):
        raise ValueError(f"record: expected the packed {dtype} struct of kernel {kernel!r}, "
                         f"a 1-D uint8 array of {size} bytes, got {record.dtype} of shape "
                         f"{tuple(record.shape)}")
    return record


@functools.lru_cache(maxsize=None)
def _record_size(kernel, dtype):
    """The length in bytes of `kernel`'s packed struct for `dtype`, as record_bytes makes it
    and the handler checks it."""
    args = _rules.ALL_KERNELS[kernel].args
    return _rules.pack(args.record(dtype, dict.fromkeys(args.fields, 0))).size
