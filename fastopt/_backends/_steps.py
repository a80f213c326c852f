"""Any rule of the table on any compiled backend: the generic step the registry hands out.

A compiled backend (fastopt._backends._contracts.Compiled) runs kernels of the rule table by name
through ``elementwise``; ``rule_step`` turns an optimizer's call (its operands and
hyperparameters) into that call: the kernel variant for the state present, the host scalars
packed as the kernel's struct, and the pruning masks, zeroed inside the kernel where the
backend can, else right after it. Multi-pass rules have drivers of their own
(fastopt._backends._twopass), which run their passes through ``run_pass``.
"""

import functools

from fastopt import _rules, _scalars
from fastopt._backends import _formats
from fastopt._backends._contracts import Compiled
from fastopt._backends._layout import CHUNK
from fastopt._backends._masked import zero_pruned


def run_pass(backend: Compiled, kernel, operands, scalars, n_threads, masks, n_aux=0,
             formats=None, ema=None):
    """One pass of `kernel` (a name of the rule table) with host scalars `scalars` (a dict of
    its Args fields); with pruning masks, the pruned entries of its written operand (1) and
    of its state (not the `n_aux` per-tensor auxiliaries) become 0 before anything reads
    them: inside the pass where the backend can (MASKS_IN_KERNELS), else right after it.
    With `formats` (fastopt._backends._formats.Formats), the operands are stored in those
    formats (the shadow, if any, after the state): converted inside the pass where the
    backend converts each of them (its FORMATS: the storage codes it handles), else around
    it, over whole arrays. With `ema` ((averages, decay); not with `formats`), each written
    parameter's weight EMA moves toward it: in the same pass where the backend can
    (FUSES_EMA), else in a pass of its own right after."""
    dtype = operands[0][0].dtype if formats is None else formats.compute
    if ema is not None:
        averages, decay = ema
        if not getattr(backend, "FUSES_EMA", False):
            run_pass(backend, kernel, operands, scalars, n_threads, masks, n_aux)
            utility_step(backend, "ema", _scalars.ema_scalars, averages, operands[1],
                         n_threads=n_threads, masks=masks, decay=decay)
            return
        ema = (averages, _rules.EMA_ARGS.record(dtype, _scalars.ema_scalars(dtype,
                                                                            decay=decay)))
    record = _rules.ALL_KERNELS[kernel].args.record(dtype, scalars)
    if formats is not None and (
            not set(formats.storage) <= getattr(backend, "FORMATS", set())
            # pruned entries of 8-bit state are zeroed before their block is quantized
            or formats.scales and masks is not None and not backend.MASKS_IN_KERNELS):
        def inner(*wide, masks):
            run_pass(backend, kernel, wide, scalars, n_threads, masks, n_aux)
        _formats.around(inner, operands[:len(operands) - n_aux], formats, masks=masks,
                        rest=operands[len(operands) - n_aux:])
        return
    extra = {} if formats is None else {"formats": formats}
    if ema is not None:
        extra["ema"] = ema
    if masks is not None and backend.MASKS_IN_KERNELS:
        backend.elementwise(kernel, operands, record, n_threads, masks=masks, n_aux=n_aux,
                            **extra)
        return
    backend.elementwise(kernel, operands, record, n_threads, n_aux=n_aux, **extra)
    if masks is not None:
        written = operands[3:len(operands) - n_aux]  # the state and the shadow
        for t, mask in enumerate(masks):
            zero_pruned(mask, [operands[1][t]] + [op[t] for op in written]
                        + ([ema[0][t]] if ema is not None else []))


def utility_step(backend: Compiled, kernel, scalars, averages, params, *, n_threads,
                 masks=None, formats=None, **hyper):
    """A pass of a kernel of no rule (fastopt._rules.UTILITY_OPS, the weight EMA): the
    `averages` in the parameter slots, updated in place from `params` in the gradient
    slot; `scalars(dtype, **hyper)` its struct's fields."""
    dtype = averages[0].dtype if formats is None else formats.compute
    run_pass(backend, kernel, (averages, averages, params), scalars(dtype, **hyper), n_threads,
             masks, formats=formats)


def rule_step(backend: Compiled, rule, params, out, grads, *states, n_threads, masks=None,
              formats=None, shadow=None, caution=None, ema=None, **hyper):
    """One step of `rule` over tensors: `states` in the rule's state order (None for an
    optional one that is off), the hyperparameters as the rule's scalars function takes
    them; `formats` and `shadow` as fastopt._backends._formats.formatted takes them. With
    `caution` (a function returning scratch arrays like the parameters, in the compute
    dtype, where the backend needs them), the cautious step (see cautious_step); with `ema`
    ((averages, decay); not with `formats`), the weight EMA of the new parameters (see
    run_pass)."""
    if caution is not None:
        if formats is not None:  # whole arrays converted around the passes
            return _formats.formatted(functools.partial(cautious_step, backend, rule))(
                params, out, grads, *states, n_threads=n_threads, masks=masks,
                formats=formats, shadow=shadow, caution=caution, **hyper)
        return cautious_step(backend, rule, params, out, grads, *states, n_threads=n_threads,
                             masks=masks, caution=caution, ema=ema, **hyper)
    present = tuple(name for name, s in zip(rule.state, states) if s is not None)
    kernel = rule.kernel(present)
    operands = (params, out, grads) + tuple(s for s in states if s is not None)
    if shadow is not None:
        operands += (shadow,)
    dtype = params[0].dtype if formats is None else formats.compute
    run_pass(backend, kernel.name, operands, rule.scalars(dtype, **hyper), n_threads, masks,
             formats=formats, ema=ema)


def cautious_step(backend: Compiled, rule, params, out, grads, *states, n_threads, caution,
                  masks=None, ema=None, **hyper):
    """A cautious step of `rule` (its Caution of the kernel for the state present): the
    count pass finds each element's agreement K, whose per-tensor sums (exact: they are
    counts) give each tensor's factor, and the step kernel takes it as its last operand.
    A backend with ``caution_counts`` sums K in the count pass; the others write it to the
    scratch arrays ``caution()`` returns and sum those. A pruned element (`masks`) counts as
    disagreeing (K = 0), whatever its gradient, as the NumPy reference counts it."""
    named = {name: s for name, s in zip(rule.state, states) if s is not None}
    present = tuple(named)
    variant = rule.caution(rule.kernel(present).name)
    dtype = params[0].dtype
    scalars = rule.scalars(dtype, **hyper)
    counted = tuple(named[name] for name in variant.count.state)
    if hasattr(backend, "caution_counts"):
        counts = backend.caution_counts(
            variant.count.name, (params, params, grads) + counted,
            variant.count.args.record(dtype, scalars), n_threads, masks)
    else:
        scratch = caution()
        run_pass(backend, variant.count.name, (params, scratch, grads) + counted, scalars,
                 n_threads, None)
        for t, mask in enumerate(masks or ()):  # K only: the count writes no state
            zero_pruned(mask, [scratch[t]])
        counts = _scalars.tensor_sums(backend.norm_partials(scratch, 1, n_threads=n_threads),
                                      [p.size for p in params], CHUNK)
    factors = _scalars.caution_factors(counts, [p.size for p in params], dtype)
    factors = backend.device([factors[t:t + 1] for t in range(len(params))], params[0])
    run_pass(backend, variant.step.name,
             (params, out, grads) + tuple(named.values()) + (factors,), scalars, n_threads,
             masks, n_aux=1, ema=ema)
