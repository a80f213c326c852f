r"""fastopt's optimizer kernels inside ``jax.jit``: optax transformations and a fused step.

>>> import jax, jax.numpy as jnp, numpy as np
>>> import fastopt.jax
>>> opt = fastopt.jax.adamw(learning_rate=0.1, weight_decay=0.0)
>>> params = {"w": jnp.zeros(2)}
>>> state = opt.init(params)
>>> params, state = jax.jit(opt.step)(params, {"w": jnp.array([1.0, -1.0])}, state)
>>> np.asarray(params["w"]).round(4)
array([-0.1,  0.1], dtype=float32)

Each factory (:func:`adam`, :func:`adamw`, :func:`nadam`, :func:`nadamw`, :func:`sgd`,
:func:`lion`, :func:`adamax`, :func:`radam`, :func:`adadelta`, :func:`adagrad`,
:func:`rmsprop`, :func:`adopt`, :func:`ademamix`, :func:`adan`, :func:`rprop`,
:func:`asgd`, :func:`lamb`, :func:`muon`, :func:`prodigy`, :func:`adafactor`,
:func:`schedule_free_adamw`, :func:`schedule_free_sgd`) takes
optax's name, arguments and defaults (torch's where optax has no such rule) and returns a
:class:`FusedTransformation`: an optax ``GradientTransformationExtraArgs`` (its ``init``
and ``update`` work in ``optax.chain``, ``optax.MultiSteps`` and any optax training loop)
whose update is one call of fastopt's compiled kernel over every leaf of the parameter
pytree (the XLA FFI handler of ``fastopt._jax_ffi``, run on jax's CPU backend), and which
also offers ``step``: the same update written into the parameters and the state in place
when ``jax.jit`` donates them.

Inside the jitted function the step count and the learning rate (a constant or an optax
schedule of the count) are traced values: the kernel's scalar struct (bias corrections,
step size, the clipping coefficient) is computed and packed there, so a schedule changes
nothing in the compiled program. The other hyperparameters are fixed when the
transformation is made, except those optax also takes as schedules (AdEMAMix's b3 and
alpha, ADOPT's clip_value_fn) and under ``optax.inject_hyperparams``, which traces them.
"""

import functools
import importlib
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

try:
    import optax
except ImportError as e:  # a clear message: fastopt.jax's objects are optax transformations
    raise ImportError("fastopt.jax needs optax (pip install optax, or fastopt[jax])") from e

from fastopt import _jax_ffi, _rules, _scalars
from fastopt._backends import _formats
from fastopt._check import flag, integer, real
from fastopt._config import check_threads, get_num_threads
from fastopt.optim._base import ABSMAX, MASTER, _q8_code

__all__ = ["adam", "adamw", "nadam", "nadamw", "sgd", "lion", "adamax", "radam", "adadelta",
           "adagrad", "rmsprop", "adopt", "ademamix", "adan", "rprop", "asgd", "lamb", "muon",
           "prodigy", "adafactor", "schedule_free_adamw", "schedule_free_sgd",
           "schedule_free_eval_params",
           "FusedTransformation", "AdamState", "SGDState", "LionState", "AdamaxState",
           "AdadeltaState", "AdagradState", "RMSpropState", "AdEMAMixState", "AdanState",
           "RpropState", "ASGDState", "MuonState", "ProdigyState", "AdafactorState",
           "ScheduleFreeState"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_LOWP = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))  # computed in float32
# state_dtype="int8": blockwise 8-bit state, uint8 codes (tensors of MIN_QUANTIZED elements
# or more; smaller ones keep float32 state, as the array API's)
_U8 = np.dtype(np.uint8)
_STATE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
                 "int8": _U8}
_QMAPS = {_formats.Q8S: jnp.asarray(_formats.QMAPS[_formats.Q8S]),
          _formats.Q8U: jnp.asarray(_formats.QMAPS[_formats.Q8U])}
_PARAMS = object()  # a state array's fill (_make): a copy of the parameter
ABSMAX_FIELD = "absmax"  # the state's field of the block scales of 8-bit state


def _low_precision_fields(cls):
    """State NamedTuple `cls` with its docstring's paragraph on the two last fields, which
    every elementwise rule's state has (master_param, absmax)."""
    cls.__doc__ += """

    The last two fields: ``master_param``, with ``master_weights`` the float32 copies of
    bfloat16 / float16 parameters; ``absmax``, with ``state_dtype="int8"`` a dict of each
    state array's block scales (see :func:`adam`); None otherwise."""
    return cls


@_low_precision_fields
class AdamState(NamedTuple):
    """The state of :func:`adam`, :func:`adamw`, :func:`nadam`, :func:`nadamw`,
    :func:`radam`, :func:`adopt` and :func:`lamb`: the step count (an int32 scalar) and the
    moments m and v, each a pytree shaped like the parameters (fastopt's and torch's names;
    optax calls them ``mu`` and ``nu``)."""
    count: Any
    exp_avg: Any
    exp_avg_sq: Any
    master_param: Any = None
    absmax: Any = None


@_low_precision_fields
class SGDState(NamedTuple):
    """The state of :func:`sgd`: the step count (an int32 scalar) and, with momentum, the
    momentum buffer, a pytree shaped like the parameters (optax's ``trace``); None
    without momentum."""
    count: Any
    momentum_buffer: Any = None
    master_param: Any = None
    absmax: Any = None


@_low_precision_fields
class LionState(NamedTuple):
    """The state of :func:`lion`: the step count (an int32 scalar) and the momentum m, a
    pytree shaped like the parameters (optax's ``mu``)."""
    count: Any
    exp_avg: Any
    master_param: Any = None
    absmax: Any = None


class FusedTransformation(optax.GradientTransformationExtraArgs):
    """An optax ``GradientTransformationExtraArgs`` computed by one fastopt kernel call,
    with a fused in-place step. Made by the factories (:func:`adamw`, ...), not directly.

    - ``init(params) -> state``: the rule's state (:class:`AdamState`, ...), zeros shaped
      like `params` and a step count of 0.
    - ``update(updates, state, params, masks=None, **extra_args) -> (updates, state)``:
      optax's interface. `updates` are the gradients; `params` is required. The kernel computes
      the new parameters and writes their difference from `params` (rounded once) as the
      returned updates, in the same pass, so ``optax.apply_updates(params, updates)``
      gives them (exactly where a parameter changes by less than half its magnitude, else
      within one rounding). Extra keyword arguments (``optax.chain`` passes them on) are
      ignored. This path writes the updates over the gradients (inside a jitted step,
      where they are dead afterwards, in their buffers; gradients the caller still holds
      are copied first) and ``apply_updates`` makes one more pass (reading the parameters
      and the updates, writing the parameters); ``step`` has neither.
    - ``step(params, grads, state, masks=None) -> (params, state)``: the fused update, see
      :attr:`step`.

    `masks` (both): pruning masks, a pytree like `params` with a bool or uint8 array of the
    parameter's shape (0 prunes an entry) or None (a parameter left whole) at each leaf, as
    the array API's ``masks=`` option: after the step the pruned entries of the parameters
    and of the state are +0 (zeroed in the kernel's pass), and a pruned entry's gradient
    counts as 0 in ``max_grad_norm``'s norm and ``skip_nonfinite``'s check (and as
    disagreeing in the ``cautious`` option's count). Through
    ``optax.chain``, pass ``masks=`` to the chain's ``update``.

    `params` is any pytree of float32, bfloat16 or float16 arrays, or of float64 arrays
    with ``jax_enable_x64``; all of one dtype (see the factories' ``state_dtype``).
    """
    __slots__ = ()

    @property
    def step(self):
        """``step(params, grads, state, masks=None) -> (params, state)``: one optimizer step,
        the new parameters computed by the kernel and returned (no update tree, no
        ``apply_updates``); `masks` as :class:`FusedTransformation` says.

        Jitted with ``donate_argnums=(0, 2)`` (`params` and `state` donated, `grads` not)
        it writes the parameters and the state in place: the results live in the donated
        buffers and the compiled program copies nothing. Without donation it returns new
        arrays and leaves its inputs alone.

        >>> import jax, jax.numpy as jnp, fastopt.jax
        >>> opt = fastopt.jax.sgd(learning_rate=0.5, momentum=0.9)
        >>> params = [jnp.ones(3)]
        >>> state = opt.init(params)
        >>> step = jax.jit(opt.step, donate_argnums=(0, 2))
        >>> params, state = step(params, [jnp.ones(3)], state)
        >>> params[0]
        Array([0.5, 0.5, 0.5], dtype=float32)
        """
        return self._fused("step").bound_step

    def state_dict(self, state, params=None):
        """The state as the array API's ``state_dict()`` holds it (NumPy arrays), for
        :class:`fastopt.AdamW` and its kin: ``{"state": {i: {"step": count, name: array}},
        "param_groups": [{"params": [0, ..., n - 1], hyperparameters}]}``, the parameters
        numbered in ``jax.tree.leaves`` order (with optax's weight-decay mask, two param
        groups: the decayed parameters, then the others with weight_decay 0; pass `params`
        where the mask is a function of them), the hyperparameters under the class's names
        (the learning rate only when it is a number). ``fastopt.save`` writes it;
        ``load_state_dict`` of the array API's class (or of this transformation) resumes
        from it, so a run can move between JAX and NumPy, PyTorch or CuPy. The classes of
        SGD and Lion keep no step count (neither is written), but for the random bits of
        stochastic rounding: pass `params` (the parameters, or any pytree of their dtype)
        with bfloat16 / float16 parameters, so that the count is written where the array
        API keeps it (bfloat16 state and master weights show it without). Before the first
        step ``state`` is empty, as the array API's is. A transformation whose update no
        array-API class has (optax's Adagrad, RMSprop with its defaults, NAdam, RAdam)
        raises ValueError here and in ``load_state_dict``: checkpoint its state pytree.

        >>> import jax.numpy as jnp, numpy as np, fastopt, fastopt.jax
        >>> opt = fastopt.jax.adamw(1e-2)
        >>> params = [jnp.zeros(2)]
        >>> _, state = opt.step(params, [jnp.ones(2)], opt.init(params))
        >>> saved = opt.state_dict(state)
        >>> saved["state"][0]["step"], saved["param_groups"][0]["betas"]
        (1, (0.9, 0.999))
        >>> twin = fastopt.AdamW([np.zeros(2, np.float32)])
        >>> twin.load_state_dict(saved)
        """
        return self._fused("state_dict").state_dict(state, params)

    def load_state_dict(self, state_dict, params):
        """This transformation's state for `params` from an array API ``state_dict()`` (or
        ``state_dict``'s): its per-parameter state, the parameters numbered as
        ``state_dict`` numbers them; its hyperparameters are not read (this
        transformation's apply). The count is the entries' step (all equal), 0 where none
        is kept (SGD, Lion: pass the count with ``state._replace(count=...)`` where a
        schedule needs it). Refused as ``state_dict`` is, for a transformation whose update
        no array-API class has."""
        return self._fused("load_state_dict").load_state_dict(state_dict, params)

    def _fused(self, what):
        fused = getattr(self.update, "__self__", None)
        if not isinstance(fused, _Fused):
            raise TypeError(f"{what}: this FusedTransformation was not made by a fastopt.jax "
                            f"factory (fastopt.jax.adamw, ...)")
        return fused


class _Fused:
    """The configuration of one factory call: which kernel, how its scalar struct follows
    from the step count and the learning rate, and the options. FusedTransformation's
    `init` and `update` are bound methods of it, `step` another."""

    def __init__(self, name, kernel, state_cls, scalars, learning_rate, hyper, group, caution,
                 fills, numbers, carried, scaled, max_grad_norm, max_grad_value, maximize,
                 skip_nonfinite, state_dtype, stochastic_rounding, master_weights, seed, n_threads,
                 decay_mask=None, mask_name="mask"):
        self.name = name
        # optax's weight-decay mask (its argument `mask_name`): a pytree of bools or a
        # function of the parameters returning one; `scalars` then takes weight_decay=0.0
        # for the struct of the tensors it leaves undecayed (see _decayed)
        self.decay_mask = decay_mask
        self.mask_name = mask_name
        # a rule that scales its update per tensor (Lamb): factors(params, squares), each
        # tensor's factor of the scaled_apply pass that follows the kernel's (whose "new
        # parameter" is the update) from the sums of p p and u u that pass takes; `scalars`
        # then gives both passes' fields
        self.scaled = scaled
        # a state array's initial value where it is not 0: name -> value, or _PARAMS (a copy
        # of the parameter)
        self.fills = fills
        # (count) -> the array API's per-parameter state numbers after `count` steps
        self.numbers = numbers
        # scalars the state carries from step to step besides the count (Schedule-Free's
        # largest learning rate and weight sum): name -> initial value. `scalars` then takes
        # them as `carried` and returns (fields, their new values)
        self.carried = carried
        self.caution = caution  # a fastopt._rules.Caution: the cautious option; or None
        self.group = group  # the array API class and its group's hyperparameters
        self.kernel = _rules.ALL_KERNELS[kernel]
        self.state_cls = state_cls
        self.scalars = scalars  # (dtype, *, step, lr, grad_scale) -> the struct's fields
        self.learning_rate = learning_rate
        self.max_grad_norm = max_grad_norm
        self.grad_clip = math.inf if max_grad_value is None else max_grad_value
        self.maximize = maximize
        self.skip_nonfinite = skip_nonfinite
        self.state_dtype = state_dtype  # None: float32 for low-precision parameters
        self.stochastic_rounding = stochastic_rounding
        # bfloat16 / float16 parameters get float32 copies in the state (master_param),
        # which the kernel updates; the parameters receive them rounded
        self.master_weights = master_weights
        self.seed = seed
        self.n_threads = n_threads
        self.hyper = dict(learning_rate=learning_rate, **hyper, max_grad_norm=max_grad_norm,
                          max_grad_value=max_grad_value, maximize=maximize,
                          skip_nonfinite=skip_nonfinite, n_threads=n_threads)
        if state_dtype is not None:
            self.hyper["state_dtype"] = "int8" if state_dtype == _U8 else state_dtype.name
        if master_weights:
            self.hyper["master_weights"] = True
        if stochastic_rounding == master_weights or seed:
            self.hyper.update(stochastic_rounding=stochastic_rounding, seed=seed)
        # one bound method, handed out at every opt.step: jax.jit caches its traces by the
        # function object, so jax.jit(opt.step) in a loop compiles once
        self.bound_step = self.step

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"fastopt.jax.{self.name}({args})"

    def transformation(self):
        return FusedTransformation(self.init, self.update)

    def init(self, params):
        params, (_, leaves, treedef), dtype = _params(params)
        self._decayed(params)  # the weight-decay mask checked against the parameters
        each = self._leaf_dtypes(dtype, leaves)
        initial, scales = {}, {}
        for name in self.kernel.state:
            made = [self._initial(name, p, d) for p, d in zip(leaves, each)]
            initial[name] = treedef.unflatten([a for a, _ in made])
            scales[name] = treedef.unflatten([b for _, b in made])
        masters = None
        if self._has_master(dtype):  # copies of their own (donation)
            masters = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
        return self.state_cls(count=jnp.zeros([], jnp.int32), **self._carried_initial(),
                              **initial, **self._absent(masters, self._q8(scales)))

    def _absent(self, masters=None, scales=None):
        """None for each state field this configuration keeps no array in (Prodigy's
        first moment with b1=0), and the master weights' and block scales' fields:
        `masters` and `scales`."""
        absent = {name: None for name in self.state_cls._fields[1:]
                  if name not in self.kernel.state and name not in self.carried}
        if MASTER in absent:
            absent[MASTER] = masters
        if ABSMAX_FIELD in absent:
            absent[ABSMAX_FIELD] = scales
        return absent

    def _q8(self, scales):
        """The block scales' field: `scales` with 8-bit state, else None."""
        return scales if self.state_dtype == _U8 else None

    def _leaf_dtypes(self, dtype, leaves):
        """Each parameter's state dtype (parameters of `dtype`): _state_dtype's, but with
        state_dtype="int8" uint8 (8-bit codes) for tensors of MIN_QUANTIZED elements or
        more and float32 for the others, as the array API's."""
        state_dtype = self._state_dtype(dtype)
        if state_dtype != _U8:
            return [state_dtype] * len(leaves)
        return _q8_dtypes(leaves)

    def _has_master(self, dtype):
        """Whether parameters of `dtype` get master weights: bfloat16 and float16 ones,
        with master_weights (as the array API's)."""
        return self.master_weights and dtype in _LOWP

    def _initial(self, name, param, dtype):
        """(State array `name` of `param` before its first step: 0, or the rule's fill;
        its block scales: float32 with 8-bit state (dtype uint8), else none)."""
        fill = self.fills.get(name, 0)
        if dtype == _U8:
            values = (param.astype(jnp.float32) if fill is _PARAMS
                      else jnp.full(param.shape, fill, jnp.float32))
            return _q8_quantize(values, _q8_code(name))
        if fill is _PARAMS:  # a buffer of its own (donation)
            return jnp.array(param, dtype, copy=True), jnp.zeros(0, jnp.float32)
        return jnp.full(param.shape, fill, dtype), jnp.zeros(0, jnp.float32)

    def _carried_initial(self, values=None):
        """The carried scalars (0-d arrays of jax's default float type: float64 with
        jax_enable_x64), from `values` where given, else their initial values."""
        values = values or {}
        wide = jnp.result_type(float)
        return {name: jnp.asarray(values.get(name, value), wide)
                for name, value in self.carried.items()}

    def _state_dtype(self, dtype):
        """The state arrays' dtype for parameters of `dtype`: state_dtype, or float32 for
        bfloat16 / float16 parameters (the parameters' dtype otherwise)."""
        if self.state_dtype is not None:
            if dtype == np.float64:
                raise TypeError(f"state_dtype={self.hyper['state_dtype']!r}: for float32, "
                                f"bfloat16 or float16 parameters, not float64")
            return self.state_dtype
        return np.dtype(np.float32) if dtype in _LOWP else dtype

    def update(self, updates, state, params=None, masks=None, **extra_args):
        del extra_args  # optax.chain hands them to every transformation
        if params is None:
            raise ValueError(f"params: fastopt.jax.{self.name}'s update needs the parameters, "
                             f"update(updates, state, params): its kernel computes the new "
                             f"parameters")
        treedef, deltas, state = self._apply(params, updates, state, "updates", True, masks)
        return treedef.unflatten(deltas), state

    def step(self, params, grads, state, masks=None):
        treedef, new, state = self._apply(params, grads, state, "grads", False, masks)
        return treedef.unflatten(new), state

    def _apply(self, params, grads, state, grads_name, delta, masks):
        """(treedef, the new parameter leaves, or with `delta` their differences from the
        parameters, the new state)."""
        _, (paths, leaves, treedef), dtype = _params(params)
        compute = np.dtype(np.float32) if dtype in _LOWP else dtype
        grads = _like(grads, grads_name, paths, leaves, treedef,
                      (dtype, np.dtype(np.float32)) if dtype in _LOWP else None)
        masks = _mask_leaves(masks, paths, leaves, treedef)
        # a pruned entry's gradient counts as 0 where gradients are summed up
        summed = grads if masks is None else [
            g if m is None else jnp.where(m, g, jnp.zeros_like(g)) for g, m in zip(grads, masks)]
        summed = [g.astype(compute) for g in summed]  # sums of low-precision ones in float32
        state_dtype = self._state_dtype(dtype)
        each = self._leaf_dtypes(dtype, leaves)
        self._count(state)  # the state's class first, then its block scales (their format)
        scales = self._scales(state, paths, leaves, treedef, each)
        count, states = self._state(state, paths, leaves, treedef, state_dtype, each)
        masters = self._masters(state, paths, leaves, treedef, dtype)
        decayed = self._decayed(params)  # the weight-decay mask, per leaf
        # storage formats: float32 arithmetic on low-precision parameters, gradients or
        # state, the written ones rounded (stochastically: each tensor's key, the step)
        keys = None
        if compute != dtype or state_dtype != dtype or any(g.dtype != dtype for g in grads):
            if self.scaled is not None:
                low = (f"{dtype} parameters" if compute != dtype
                       else f"{self.hyper['state_dtype']} state")
                raise TypeError(f"fastopt.jax.{self.name}: not with {low} yet (float32 "
                                f"or float64 throughout)")
            if self.state_dtype == _U8 and any(_varying_axes(p) for p in leaves):
                raise ValueError(f"fastopt.jax.{self.name}: state_dtype='int8' for parameters "
                                 f"sharded under shard_map is not supported yet (the 8-bit "
                                 f"blocks and which tensors are quantized would follow the "
                                 f"shards, not the arrays): step them under plain jit, or "
                                 f"keep float32 or bfloat16 state")
            if self.stochastic_rounding and any(_varying_axes(p) for p in leaves):
                raise ValueError(f"fastopt.jax.{self.name}: stochastic rounding of parameters "
                                 f"sharded under shard_map is not supported yet (each shard "
                                 f"would draw the first shard's random bits): pass "
                                 f"stochastic_rounding=False, or step them under plain jit")
            # each tensor's key from its number in the state dict (and the array API's
            # param groups): its leaf index, or with a weight-decay mask its place in
            # _group_order's
            number = np.argsort(self._group_order(decayed)[0])
            keys = np.array([_formats.tensor_key(self.seed, int(k)) for k in number],
                            np.uint32).reshape(len(leaves), 2).view(np.int32)
        step = optax.safe_increment(count)  # t, as optax: it stops at int32's maximum
        if not leaves:
            return treedef, [], state._replace(count=step)
        # the schedule sees the count before the step, as optax's. It is read as step - 1,
        # equal to count short of the maximum: the donated count buffer then has a single
        # reader and XLA writes the new count into it without copying the old one
        lr = self._lr(step, compute)
        grad_scale = 1.0
        if self.max_grad_norm is not None:
            grad_scale = _clip_coefficient(self.max_grad_norm, summed)
        scalar_args = dict(step=step, lr=lr, grad_scale=grad_scale, maximize=self.maximize,
                           grad_clip=self.grad_clip)
        carried = {name: getattr(state, name) for name in self.carried}
        if carried:
            fields, new_carried = self.scalars(compute, carried=carried, **scalar_args)
        else:
            fields, new_carried = self.scalars(compute, **scalar_args), {}
        # the weight-decay mask's undecayed tensors: a struct of their own, without decay
        records = [self._pack(compute, fields)]
        if not all(decayed):
            records.append(self._pack(compute, self.scalars(compute, weight_decay=0.0,
                                                            **scalar_args)))
        operands = (records, leaves, grads, [list(s) for s in zip(*states)] if states
                    else [[] for _ in leaves], masters, scales)
        # one kernel call per storage of the state and struct: with 8-bit state, the tensors
        # that keep float32 state (under MIN_QUANTIZED elements) in a call of their own, and
        # with a weight-decay mask the undecayed ones: (tensors, 8-bit?, record) each
        groups = {}
        for t, (d, decays) in enumerate(zip(each, decayed)):
            groups.setdefault((d == _U8, 0 if decays else 1), []).append(t)
        groups = [(ix, q, r) for (q, r), ix in sorted(groups.items())]

        kernel = self.kernel.name
        if self.caution is not None:  # the count pass's kernel and the state it reads
            kernel = (self.caution.count.name,
                      tuple(self.kernel.state.index(name) for name in self.caution.count.state),
                      self.caution.step.name)
        elif self.scaled is not None:
            kernel = ("scaled_apply", kernel, self.scaled)

        # skip_nonfinite: the kernel calls take the verdict and, on a skipped step, change
        # nothing (a lax.cond around them would copy their results every step)
        finite = _count_nonfinite(summed) == 0 if self.skip_nonfinite else None

        def run(records, params, grads, states, masters, scales):
            n = len(params)
            new, new_states = [None] * n, [None] * n
            new_masters = None if masters is None else [None] * n
            new_scales = None if scales is None else list(scales)
            for ix, q, r in groups:
                def sub(xs):
                    return None if xs is None else [xs[t] for t in ix]
                out = _kernel_call(
                    self.name, kernel, self.n_threads, delta and masters is None,
                    self.stochastic_rounding, records[r],
                    sub(params) if masters is None else sub(masters), sub(grads), sub(states),
                    sub(masks), None if keys is None else keys[ix],
                    None if keys is None else step,
                    # master weights: the kernel updates the copies, the parameters get
                    # them rounded
                    None if masters is None else sub(params), sub(scales) if q else None,
                    finite)
                for k, t in enumerate(ix):
                    new[t], new_states[t] = out[0][k], out[1][k]
                    if masters is not None:
                        new_masters[t], new[t] = new[t], out[2][k]
                    if q:
                        new_scales[t] = out[-1][k]
            if masters is not None:
                new_masters = _varying_lists(new_masters, params)
                if delta:  # rounded as the handler's delta: a float32 difference, to nearest
                    new = [(n.astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype)
                           for n, p in zip(new, params)]
                    if finite is not None:  # +0 on a skipped step, for an inf parameter too
                        new = [jnp.where(finite, d, jnp.zeros((), d.dtype)) for d in new]
            if new_scales is not None:
                new_scales = _varying_states(new_scales, params)
            # under shard_map a kernel's results carry no varying axes: its parameters' then
            return (_varying_lists(new, params), _varying_states(new_states, params),
                    new_masters, new_scales)

        new, new_states, masters, scales = run(*operands)
        if self.skip_nonfinite:
            step = jnp.where(finite, step, count)
            new_carried = {name: jnp.where(finite, value, carried[name])
                           for name, value in new_carried.items()}
        names = self.kernel.state
        new_state = self.state_cls(count=step, **{
            name: jnp.asarray(value, carried[name].dtype) for name, value in new_carried.items()
        }, **{name: treedef.unflatten([s[k] for s in new_states])
              for k, name in enumerate(names)},
            **self._absent(None if masters is None else treedef.unflatten(masters),
                           None if scales is None else {
                               name: treedef.unflatten([s[k] for s in scales])
                               for k, name in enumerate(names)}))
        return treedef, new, new_state

    def _lr(self, step, dtype):
        """The learning rate of step `step`: the schedule's value at count step - 1, as
        optax's, in the dtype the kernel computes in (`dtype`). optax's schedules return
        float32 under jax_enable_x64 too; the step's coefficients computed from it (AdamW's
        factor 1 - lr wd, the step size lr / (1 - b1^t)) would then round in float32,
        where optax's products of it with float64 updates do not."""
        if isinstance(self.learning_rate, (int, float)):
            return self.learning_rate
        lr = self.learning_rate(step - 1) if callable(self.learning_rate) else self.learning_rate
        if jnp.shape(lr) != ():
            raise ValueError(f"learning_rate: the schedule returned a value of shape "
                             f"{jnp.shape(lr)}, expected a scalar")
        return jnp.asarray(lr, dtype)

    def _pack(self, dtype, fields):
        """The kernel's struct from its fields (a rule that scales its update per tensor:
        the update pass's struct and the apply pass's)."""
        if self.scaled is None:
            return _record(self.kernel.args, dtype, fields)
        return (_record(self.kernel.args, dtype, fields[0]),
                _record(_rules.ALL_KERNELS["scaled_apply"].args, dtype, fields[1]))

    def _decayed(self, params):
        """Per leaf of `params` (in jax.tree.leaves order), whether the weight decay applies
        to it: optax's `mask` (a pytree of bools, a prefix of the parameters' or the same,
        or a function of the parameters returning one), all True without one."""
        if self.decay_mask is None:
            return [True] * len(jax.tree.leaves(params))
        mask = self.decay_mask(params) if callable(self.decay_mask) else self.decay_mask
        try:
            full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), mask, params)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.mask_name}: expected a pytree of bools shaped as the "
                             f"parameters (or a prefix of them), got {mask!r:.80} for "
                             f"parameters of structure {jax.tree.structure(params)}") from e
        flags = jax.tree.leaves(full)
        for m in flags:
            if isinstance(m, jax.core.Tracer) or np.shape(m) != () or \
                    np.asarray(m).dtype != np.bool_:
                raise TypeError(f"{self.mask_name}: expected Python bools (optax's masks are "
                                f"fixed when the step is traced), got {m!r:.60}")
        return [bool(m) for m in flags]

    def _step_inputs(self, step, grads, masks, dtype):
        """(the learning rate of step `step` in `dtype`, the clipping scale, skip_nonfinite's
        verdict: a traced bool, true where the step runs, or None without the option) of the
        rules with an _apply of their own (Muon, Prodigy, Adafactor), from the gradients
        with their pruned entries 0. The verdict goes to every kernel call of the step (see
        _Fused._apply)."""
        lr = self._lr(step, dtype)
        summed = grads if masks is None else [
            g if m is None else jnp.where(m, g, jnp.zeros_like(g)) for g, m in zip(grads, masks)]
        grad_scale = 1.0
        if self.max_grad_norm is not None:
            grad_scale = _clip_coefficient(self.max_grad_norm, summed)
        finite = _count_nonfinite(summed) == 0 if self.skip_nonfinite else None
        return lr, grad_scale, finite

    def _twin(self, what):
        """The array API's class and its group's hyperparameters, for state_dict and
        load_state_dict; an error where no class has this update."""
        if self.group is None:
            raise ValueError(f"{what}: {self!r} follows optax's update, which no array-API "
                             f"class has (fastopt's classes follow torch.optim), so a state "
                             f"dict would move the run to another rule; checkpoint the state "
                             f"pytree itself (orbax, flax.serialization)")
        return self.group

    def state_dict(self, state, params=None):
        cls, group = self._twin("state_dict")
        steps = dict(_rules.BY_NAME[cls].state_scalars).get("step") is not None
        if not isinstance(state, self.state_cls):
            raise TypeError(f"state: expected the {self.state_cls.__name__} that "
                            f"fastopt.jax.{self.name}'s init returns, got "
                            f"{type(state).__name__}")
        arrays = {name: jax.tree.leaves(getattr(state, name)) for name in self.kernel.state}
        if getattr(state, MASTER, None) is not None:
            arrays[MASTER] = jax.tree.leaves(getattr(state, MASTER))
        scales = getattr(state, ABSMAX_FIELD, None)
        for name in scales or ():  # 8-bit state: the codes' block scales beside them
            arrays[name + ABSMAX] = jax.tree.leaves(scales[name])
        if not steps and self.stochastic_rounding:  # the array API counts the random bits'
            # steps where it rounds: low-precision parameters (master weights say so) or state
            steps = (MASTER in arrays or any(np.dtype(x.dtype).itemsize == 2
                                             for xs in arrays.values() for x in xs)
                     or (params is not None and _params(params)[2] in _LOWP))
        if not arrays:  # SGD without momentum: no state, the count of parameters unknown
            raise ValueError(f"state_dict: fastopt.jax.{self.name} keeps no per-parameter "
                             f"state here (SGD without momentum); nothing to convert")
        count = int(state.count)
        numbers = self.numbers(count) if self.numbers is not None and count else {}
        if count:  # the carried scalars the array API keeps per parameter
            numbers.update({name: float(getattr(state, name)) for name in self.carried
                            if name in dict(_rules.BY_NAME[cls].state_scalars)})
        # with a weight-decay mask two param groups, as the array API keeps them: the
        # decayed parameters, then the others with weight_decay 0, numbered in that order
        order, sizes = self._group_order(self._decayed(
            params if params is not None else getattr(state, self.kernel.state[0])))
        # before the first step, no entries: the array API's state of parameters not
        # stepped yet (its numbers, such as Schedule-Free's, exist from the first step)
        entries = {k: {**({"step": count} if steps else {}), **numbers,
                       **{name: np.asarray(leaves[i]) for name, leaves in arrays.items()
                          if leaves[i].size or not name.endswith(ABSMAX)}}
                   for k, i in enumerate(order)} if count else {}
        if not callable(self.learning_rate):
            group = dict(lr=self.learning_rate, **group)
        groups, start = [], 0
        for size, decay in zip(sizes, (True, False)):
            if size:
                groups.append(dict(group, params=list(range(start, start + size)),
                                   **({} if decay else {"weight_decay": 0.0})))
            start += size
        return {"state": entries, "param_groups": groups}

    @staticmethod
    def _group_order(decayed):
        """(the leaves in the order a state dict numbers them, the sizes of its param
        groups: the decayed leaves', then the others'), from _decayed's flags: without a
        weight-decay mask, or where it decays every leaf, jax.tree.leaves order."""
        order = [t for t, d in enumerate(decayed) if d] + [t for t, d in enumerate(decayed)
                                                          if not d]
        return order, [sum(decayed), len(decayed) - sum(decayed)]

    def load_state_dict(self, state_dict, params):
        self._twin("load_state_dict")
        _, (paths, leaves, treedef), dtype = _params(params)
        each = self._leaf_dtypes(dtype, leaves)
        saved, count = _saved_entries(state_dict, len(leaves))
        order, sizes = self._group_order(self._decayed(params))
        if sizes[1]:  # numbered group after group (state_dict's): back to the leaves
            groups = state_dict.get("param_groups")
            got = [(len(g.get("params", ())), g.get("weight_decay", 0.0) == 0)
                   for g in groups if isinstance(g, dict)] \
                if isinstance(groups, (list, tuple)) else None
            want = [(size, not decay) for size, decay in zip(sizes, (True, False)) if size]
            # a decayed group of weight_decay 0 is the transformation's own (weight_decay=0)
            if got is None or [n for n, _ in got] != [n for n, _ in want] or not got[-1][1] \
                    or (len(got) == 2 and got[0][1] and self.hyper.get("weight_decay")):
                raise ValueError(
                    f"state_dict['param_groups']: with {self.mask_name} this transformation "
                    f"numbers the parameters in the array API's param groups of "
                    f"{[n for n, _ in want]} parameters (those it decays, then the others "
                    f"with weight_decay 0, as its state_dict writes them), got "
                    f"{'no list of groups' if got is None else [n for n, _ in got]} "
                    f"(weight_decay 0: {[] if got is None else [z for _, z in got]})")
            saved = {order[k]: entry for k, entry in saved.items()}
        arrays, scales = {}, {}
        for name in self.kernel.state:
            out, blocks = [], []
            for i, (path, leaf, state_dtype) in enumerate(zip(paths, leaves, each)):
                entry = saved.get(i, {})
                value = entry.get(name) if isinstance(entry, dict) else None
                if value is None:  # not stepped yet: as init
                    made = self._initial(name, leaf, state_dtype)
                    out.append(made[0])
                    blocks.append(made[1])
                    continue
                value = jnp.asarray(np.asarray(value))
                if value.shape != leaf.shape or value.dtype != state_dtype:
                    raise ValueError(f"state_dict['state'][{i}][{name!r}]: expected "
                                     f"{_state_name(state_dtype)} of the shape of "
                                     f"params{path}, {leaf.shape}, got {value.dtype} "
                                     f"{value.shape} (convert the state's format explicitly)")
                out.append(value)
                blocks.append(jnp.zeros(0, jnp.float32))
                if state_dtype == _U8:
                    key = name + ABSMAX
                    absmax = entry.get(key)
                    want = _scales_shape(leaf, _U8)
                    absmax = None if absmax is None else jnp.asarray(np.asarray(absmax))
                    if absmax is None or absmax.dtype != np.float32 or absmax.shape != want:
                        raise ValueError(f"state_dict['state'][{i}][{key!r}]: expected the "
                                         f"block scales of the 8-bit {name!r}, float32 of "
                                         f"shape {want}, got {absmax!r:.80}")
                    blocks[-1] = absmax
            arrays[name] = treedef.unflatten(out)
            scales[name] = treedef.unflatten(blocks)
        for i, entry in saved.items():  # what this transformation would drop
            extra = [key for key in entry if (key == MASTER and not self._has_master(dtype))
                     or (key.endswith(ABSMAX) and (
                         i >= len(each) or each[i] != _U8
                         or key[:-len(ABSMAX)] not in self.kernel.state))]
            if extra:
                raise ValueError(f"state_dict['state'][{i}]: {', '.join(map(repr, extra))} "
                                 f"kept by the saving optimizer (master_weights, "
                                 f"state_dtype='int8') but not by this transformation: make "
                                 f"it with the same options, or convert the state first")
        masters = None
        if self._has_master(dtype):  # saved, or (not stepped yet) the parameters as init's
            masters = []
            for i, (path, leaf) in enumerate(zip(paths, leaves)):
                entry = saved.get(i, {})
                value = entry.get(MASTER) if isinstance(entry, dict) else None
                if value is None:
                    masters.append(jnp.array(leaf, jnp.float32, copy=True))
                    continue
                value = jnp.asarray(np.asarray(value))
                if value.shape != leaf.shape or value.dtype != np.float32:
                    raise ValueError(f"state_dict['state'][{i}][{MASTER!r}]: expected float32 "
                                     f"of the shape of params{path}, {leaf.shape}, got "
                                     f"{value.dtype} {value.shape}")
                masters.append(value)
            masters = treedef.unflatten(masters)
        carried = {}
        for name in self.carried:  # kept per parameter there, all equal after equal steps
            values = {float(e[name]) for e in saved.values() if isinstance(e, dict)
                      and name in e}
            if len(values) > 1:
                raise ValueError(f"state_dict['state']: the parameters have different "
                                 f"{name!r} {sorted(values)}; fastopt.jax keeps one")
            if values:
                carried[name] = values.pop()
        return self.state_cls(count=jnp.asarray(count, jnp.int32),
                              **self._carried_initial(carried), **arrays,
                              **self._absent(masters, self._q8(scales)))

    def _count(self, state):
        """The step count of `state`, which must be this transformation's state class; the
        count an integer scalar array."""
        if not isinstance(state, self.state_cls):
            raise TypeError(f"state: expected the {self.state_cls.__name__} that "
                            f"fastopt.jax.{self.name}'s init returns, got "
                            f"{type(state).__name__}")
        count = state.count
        if not (hasattr(count, "dtype") and jnp.shape(count) == ()
                and jnp.issubdtype(count.dtype, jnp.integer)):
            raise TypeError(f"state.count: expected an integer scalar array, got {count!r:.80}")
        return count

    def _state(self, state, paths, leaves, treedef, state_dtype, each=None):
        """The step count and, per state array of the kernel, its leaves, checked against
        the parameters' (of `state_dtype`, or each[i] for leaf i)."""
        cls = self.state_cls
        count = self._count(state)
        for name in self.carried:
            value = getattr(state, name)
            if not (hasattr(value, "dtype") and jnp.shape(value) == ()
                    and jnp.issubdtype(value.dtype, jnp.floating)):
                raise TypeError(f"state.{name}: expected a float scalar array, got "
                                f"{value!r:.80}")
        for name in cls._fields[1:]:
            if (name not in self.kernel.state and name not in self.carried
                    and name not in (MASTER, ABSMAX_FIELD) and getattr(state, name) is not None):
                raise ValueError(f"state.{name}: expected None (fastopt.jax.{self.name} keeps "
                                 f"no {name} here), got a value: is this another "
                                 f"transformation's state?")
        states = [_like(getattr(state, name), f"state.{name}", paths, leaves, treedef,
                        (state_dtype,), each) for name in self.kernel.state]
        return count, states

    def _scales(self, state, paths, leaves, treedef, each):
        """Per tensor, the block scales of its 8-bit state arrays (an empty float32 array
        for each of a tensor that keeps float32 state), checked; None without 8-bit
        state."""
        value = getattr(state, ABSMAX_FIELD, None)
        if self.state_dtype != _U8:
            if value is not None:
                raise ValueError(f"state.{ABSMAX_FIELD}: expected None (block scales are kept "
                                 f"with state_dtype='int8'), got a value")
            return None
        names = self.kernel.state
        if not isinstance(value, dict) or set(value) != set(names):
            raise ValueError(f"state.{ABSMAX_FIELD}: expected a dict of the block scales of "
                             f"{', '.join(names)} (state_dtype='int8'), got "
                             f"{type(value).__name__}: make the state with this "
                             f"transformation's init or load_state_dict")
        per_name = []
        for name in names:
            where = f"state.{ABSMAX_FIELD}[{name!r}]"
            flat, other = jax.tree.flatten(value[name])
            if other != treedef:
                raise ValueError(f"{where}: expected the tree structure of params, {treedef}, "
                                 f"got {other}")
            out = []
            for path, leaf, d, x in zip(paths, leaves, each, flat):
                x = _array(x, where + path)
                want = _scales_shape(leaf, d)
                if x.dtype != np.float32 or x.shape != want:
                    raise ValueError(f"{where}{path}: expected float32 of shape {want} (one "
                                     f"scale per {_formats.BLOCK} elements of a tensor of "
                                     f"{_formats.MIN_QUANTIZED} or more, none for a smaller "
                                     f"one), got {x.dtype} {x.shape}")
                out.append(x)
            per_name.append(out)
        return [[xs[t] for xs in per_name] for t in range(len(leaves))]

    def _masters(self, state, paths, leaves, treedef, dtype):
        """The master weights' leaves (float32, checked against the parameters), or None
        where the parameters have none."""
        value = getattr(state, MASTER, None)
        if not self._has_master(dtype):
            if value is not None:
                raise ValueError(f"state.{MASTER}: expected None (master weights are kept "
                                 f"for bfloat16 or float16 parameters with "
                                 f"master_weights=True), got a value")
            return None
        if value is None:
            raise ValueError(f"state.{MASTER}: expected the float32 copies of the {dtype} "
                             f"parameters (master_weights=True), got None: make the state "
                             f"with this transformation's init or load_state_dict")
        return _like(value, f"state.{MASTER}", paths, leaves, treedef, (np.dtype(np.float32),))


def _state_name(dtype):
    """A state dtype as state_dtype names it: "int8" for the uint8 codes of 8-bit state."""
    return "int8 (uint8 codes)" if dtype == _U8 else np.dtype(dtype).name


def _q8_dtypes(leaves):
    """The state dtype of each parameter with state_dtype="int8", as the array API's:
    uint8 (8-bit codes) for tensors of MIN_QUANTIZED elements or more, else float32."""
    return [_U8 if leaf.size >= _formats.MIN_QUANTIZED else np.dtype(np.float32)
            for leaf in leaves]


def _scales_shape(leaf, dtype):
    """The shape of the block scales of a state array of `dtype` shaped like `leaf`: one
    per BLOCK elements for 8-bit codes (uint8), none otherwise."""
    return (-(-leaf.size // _formats.BLOCK),) if dtype == _U8 else (0,)


def _q8_quantize(values, code):
    """(codes, block scales) of float32 `values` in the 8-bit map `code`, as the array API's
    quantizer (fastopt._backends._formats.q8_store, torchao's): per block of 256 elements
    the scale max |x| (at least SCALE_MIN; NaN propagates), each element divided by it, the
    map's code found by a binary search, from half the gap up the upper code."""
    qmap = _QMAPS[code]
    flat = values.reshape(-1)
    size = flat.shape[0]
    blocks = -(-size // _formats.BLOCK)
    padded = jnp.zeros(blocks * _formats.BLOCK, jnp.float32).at[:size].set(flat)
    magnitudes = jnp.abs(padded.reshape(blocks, _formats.BLOCK))
    # a block with a NaN gets a NaN scale (XLA's max on the CPU may drop NaN)
    scale = jnp.where(jnp.isnan(magnitudes).any(axis=1), jnp.float32(np.nan),
                      jnp.maximum(jnp.max(magnitudes, axis=1), _formats.SCALE_MIN))
    q = flat / jnp.repeat(scale, _formats.BLOCK)[:size]
    c = jnp.where(q >= qmap[128], 128, 0)
    for step in (64, 32, 16, 8, 4, 2, 1):
        c = c + jnp.where(q >= qmap[c + step], step, 0)
    up = jnp.minimum(c + 1, 255)
    c = jnp.where(q - qmap[c] >= (qmap[up] - qmap[c]) * np.float32(0.5), up, c)
    return c.astype(jnp.uint8).reshape(values.shape), scale


def _q8_dequantize(codes, scales, code):
    """8-bit state as float32, as the array API's q8_load: each code's map value times its
    block's scale."""
    flat = _QMAPS[code][codes.reshape(-1).astype(jnp.int32)]
    return (flat * jnp.repeat(scales, _formats.BLOCK)[:flat.shape[0]]).reshape(codes.shape)


def _saved_entries(state_dict, n):
    """(the per-parameter entries, their common step count or 0) of an array API state
    dict for `n` parameters, checked: known indices, one step count."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise TypeError("state_dict: expected a dict with a 'state' dict, as the array "
                        "API's state_dict() returns")
    saved = state_dict["state"]
    unknown = set(saved) - set(range(n))
    if unknown:
        raise ValueError(f"state_dict['state']: no parameter has the indices "
                         f"{sorted(unknown, key=repr)[:5]} (params has {n})")
    steps = {int(e["step"]) for e in saved.values() if isinstance(e, dict) and "step" in e}
    if len(steps) > 1:
        raise ValueError(f"state_dict['state']: the parameters have different step "
                         f"counts {sorted(steps)}; fastopt.jax keeps one count")
    return saved, steps.pop() if steps else 0


def _params(params):
    """`params` with every leaf a jax array, (paths, leaves, treedef) and their dtype,
    checked: float32, float64, bfloat16 or float16 arrays, all of one dtype."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [_array(leaf, f"params{path}") for path, (_, leaf) in zip(paths, flat)]
    dtype = None
    for path, leaf in zip(paths, leaves):
        if np.dtype(leaf.dtype) not in _FLOATS + _LOWP:
            raise TypeError(f"params{path}: expected float32, float64, bfloat16 or float16 "
                            f"arrays, got {leaf.dtype}")
        if dtype is None:
            dtype, first = np.dtype(leaf.dtype), path
        elif leaf.dtype != dtype:
            raise TypeError(f"params{path}: expected {dtype}, as params{first}: the parameters "
                            f"must share one dtype (mixed dtypes are not supported yet), got "
                            f"{leaf.dtype}")
    return treedef.unflatten(leaves), (paths, leaves, treedef), dtype


def _like(tree, name, paths, leaves, treedef, dtypes=None, each=None):
    """The leaves of `tree` (gradients or a state array), checked to have the parameters'
    tree structure, and each its parameter's shape and dtype (or one of `dtypes`, the same
    for every leaf; or each[i], a dtype per leaf)."""
    flat, other = jax.tree.flatten(tree)
    if other != treedef:
        raise ValueError(f"{name}: expected the tree structure of params, {treedef}, got "
                         f"{other}")
    out = []
    for path, param, leaf in zip(paths, leaves, flat):
        leaf = _array(leaf, f"{name}{path}")
        allowed = (param.dtype,) if dtypes is None else dtypes
        if each is not None:
            allowed = (each[len(out)],)
        elif out:
            allowed = (out[0].dtype,)
        if leaf.dtype not in allowed:
            raise TypeError(f"{name}{path}: expected "
                            f"{' or '.join(str(np.dtype(d)) for d in allowed)}"
                            f"{', as params' + path if dtypes is None else ''}, got {leaf.dtype}")
        if leaf.shape != param.shape:
            raise ValueError(f"{name}{path}: expected the shape of params{path}, "
                             f"{param.shape}, got {leaf.shape}")
        out.append(leaf)
    return out


def _mask_leaves(masks, paths, leaves, treedef):
    """The pruning masks' leaves in the parameters' order (None: a parameter without one),
    checked: bool or uint8 arrays of their parameter's shape; None for no masks."""
    if masks is None:
        return None
    try:
        flat = treedef.flatten_up_to(masks)
    except (TypeError, ValueError) as e:
        raise ValueError(f"masks: expected the tree structure of params, {treedef}, with a "
                         f"mask or None at each leaf: {e}") from None
    out = []
    for path, leaf, m in zip(paths, leaves, flat):
        if m is not None:
            m = _array(m, f"masks{path}")
            if m.dtype not in (jnp.bool_, jnp.uint8):
                raise TypeError(f"masks{path}: expected a bool or uint8 array, got {m.dtype}")
            if m.shape != leaf.shape:
                raise ValueError(f"masks{path}: expected the shape of params{path}, "
                                 f"{leaf.shape}, got {m.shape}")
        out.append(m)
    return None if all(m is None for m in out) else out


def _array(x, what):
    try:
        return jnp.asarray(x)
    except TypeError:
        raise TypeError(f"{what}: expected an array, got {type(x).__name__}") from None


def _clip_coefficient(max_norm, grads):
    """torch's clip_grad_norm_ coefficient min(1, max_norm / (norm + 1e-6)) over all
    gradients, in their dtype (NaN where the norm is NaN or infinite, as torch's). Inside
    shard_map a gradient holds this device's shard: its sum of squares is summed (psum)
    over the mesh axes along which it varies, so that the norm is the global one; a
    gradient replicated over an axis is counted once."""
    total = 0.0
    for g in grads:
        squares = jnp.sum(jnp.square(g))
        axes = _varying_axes(squares)
        total = total + (jax.lax.psum(squares, axes) if axes else squares)
    return jnp.minimum(max_norm / (jnp.sqrt(total) + 1e-6), 1.0)


def _count_nonfinite(grads):
    """How many gradient leaves hold NaN or an infinity (inside shard_map, how many leaf
    shards, summed over the mesh axes along which each leaf varies, as _clip_coefficient's
    norm): 0 where the step may run. The sum of g * 0 tells, 0 or NaN from any NaN or
    infinity, which no order of the additions loses (XLA's
    vectorized max does: its NaN is dropped on CPU). It takes 2.8 ms on 10M float32, where
    a count of the entries took 16-20 ms and jnp.all(jnp.isfinite(g)) 3.7 ms."""
    total = 0
    for g in grads:
        bad = (~jnp.isfinite(jnp.sum(g * 0))).astype(jnp.int32)
        axes = _varying_axes(bad)
        total = total + (jax.lax.psum(bad, axes) if axes else bad)
    return total


def _varying_axes(x):
    """The shard_map mesh axes along which traced `x` varies (jax tracks them with
    shard_map's check_vma, the default); () outside shard_map."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier versions: vma
    varying = manual.varying if manual is not None else getattr(aval, "vma", ())
    return tuple(sorted(varying, key=str))


def _record(args, dtype, fields):
    """The kernel's scalar struct (fastopt._rules.Args `args`, for parameters of `dtype`)
    packed as the FFI handler reads it, from `fields` (traced or Python values): each real
    field cast to `dtype`, each flag to int32, at the offsets of the C layout, zero-padded
    to a multiple of 8 bytes. The same bytes as fastopt._jax_ffi.record_bytes."""
    layout = _rules._record_dtype(args, dtype)
    pieces, end = [], 0
    for name in args.fields:
        field, offset = layout.fields[name][:2]
        if offset > end:
            pieces.append(jnp.zeros(offset - end, jnp.uint8))
        pieces.append(jax.lax.bitcast_convert_type(jnp.asarray(fields[name], field),
                                                   jnp.uint8))
        end = offset + field.itemsize
    size = -(-layout.itemsize // 8) * 8
    if size > end:
        pieces.append(jnp.zeros(size - end, jnp.uint8))
    return jnp.concatenate(pieces)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3, 4))
def _kernel_call(name, kernel, n_threads, delta, stochastic, record, params, grads, states,
                 masks, keys, step, shadow=None, scales=None, guard=None):
    """The FFI call, with a derivative rule that says why there is none. `kernel` is the
    elementwise kernel's name, or for the cautious option (the count kernel, the indices of
    the state arrays it reads, the cautious step): the count pass, each tensor's factor
    1 / max(mean K, 1e-3) in the dtype the kernel computes in
    (fastopt._scalars.caution_factors' formula), then the step with it (both on the
    storage formats); or for a rule that scales its update per tensor
    ("scaled_apply", the update pass's kernel, factors(params, squares)): the update pass,
    which sums each tensor's p p and u u as it goes (squares, of shape (n, 2)), the
    factors, then scaled_apply, `record` the two passes' structs. With `keys`
    (each tensor's Philox key) the operands are in storage formats, rounded stochastically
    (`stochastic`, with the bits of `step`) or to nearest even; with `shadow` (the
    low-precision parameters of master weights, `params` their float32 copies) the new
    parameters are returned third (an elementwise kernel, no delta); with `scales` (the block
    scales of 8-bit state, per tensor) the new ones last. Where `guard` (a traced bool) is
    false, every call changes nothing (skip_nonfinite's skipped step)."""
    if isinstance(kernel, str):
        return _jax_ffi.elementwise(kernel, record, params, grads, states, n_threads,
                                    delta=delta, masks=masks, formats=None if keys is None
                                    else (stochastic, keys, step), shadow=shadow,
                                    scales=scales, guard=guard)
    if kernel[0] == "scaled_apply":  # the update pass, each tensor's factor, the apply pass
        _, update, factors = kernel
        updates, states, squares = _jax_ffi.elementwise(
            update, record[0], params, grads, states, n_threads, masks=masks, into_grad=True,
            sums=((0, 2), (1, 2)), guard=guard)
        new, _ = _jax_ffi.elementwise("scaled_apply", record[1], params, updates,
                                      [[k] for k in factors(params, squares)],
                                      n_threads, delta=delta, masks=masks, guard=guard)
        return new, states
    count, reads, cautious = kernel
    dtype, formats = params[0].dtype, None
    if keys is not None:  # storage formats: float32 arithmetic, the count's too
        formats, dtype = (stochastic, keys, step), np.dtype(np.float32)
    read_scales = None
    if scales is not None:  # the block scales of the 8-bit arrays among those it reads
        eight = [i for i, x in enumerate(states[0]) if x.dtype == _U8]
        read_scales = [[scales[t][eight.index(i)] for i in reads if i in eight]
                       for t in range(len(states))]
    counts = _jax_ffi.caution_counts(count, record, params, grads,
                                     [[s[i] for i in reads] for s in states], n_threads,
                                     formats=formats, scales=read_scales,
                                     low=None if shadow is None else shadow[0].dtype,
                                     masks=masks, guard=guard)
    # inside shard_map, a tensor's count and size over the mesh axes it varies along
    counts = [counts[t] for t in range(len(params))]
    sizes = [p.size for p in params]
    for t, p in enumerate(params):
        axes = _varying_axes(p)
        if axes:
            counts[t] = jax.lax.psum(counts[t], axes)
            sizes[t] = sizes[t] * jax.lax.psum(1, axes)
    # the sizes behind a barrier: XLA's simplifier turns a division by a constant into a
    # product with its reciprocal, off by an ulp for some counts (3158 / 4400, one of 12
    # quotients in float32), where the array API's mean is the quotient rounded once
    counts, sizes = jnp.stack(counts), jax.lax.optimization_barrier(jnp.asarray(sizes, dtype))
    mean = jnp.where(sizes > 0, counts.astype(dtype) / jnp.maximum(sizes, 1), 1)
    factors = 1 / jnp.maximum(mean, jnp.asarray(1e-3, dtype))
    return _jax_ffi.elementwise(cautious, record, params, grads,
                                [list(s) + [factors[t:t + 1]] for t, s in enumerate(states)],
                                n_threads, delta=delta, masks=masks, formats=formats,
                                shadow=shadow, scales=scales, guard=guard)


@_kernel_call.defjvp
def _no_derivative(name, kernel, n_threads, delta, stochastic, primals, tangents):
    raise ValueError(f"fastopt.jax.{name}: an optimizer step cannot be differentiated "
                     f"(fastopt's fused kernel has no derivative rule). Differentiate the loss "
                     f"and pass its gradients to update or step; to differentiate through the "
                     f"update itself, use optax.{name}")


# -- hyperparameters ------------------------------------------------------------------------

def _real(name, value, **bounds):
    """A numeric hyperparameter: a finite real number within `bounds`
    (fastopt._check.real), or a traced scalar: optax.inject_hyperparams passes every
    numeric argument of a factory as one inside jax.jit, whose range is checked when the
    transformation is made outside jit (its init)."""
    if isinstance(value, jax.core.Tracer):
        if jnp.shape(value) != () or not (jnp.issubdtype(value.dtype, jnp.floating)
                                          or jnp.issubdtype(value.dtype, jnp.integer)):
            raise TypeError(f"{name} must be a real number, got a traced {value.dtype} value "
                            f"of shape {jnp.shape(value)}")
        return value
    return real(name, value, **bounds)


def _learning_rate(value):
    """A float >= 0, a traced scalar (_real), or a schedule: a callable of the step count."""
    if callable(value):
        return value
    return _real("learning_rate", value, lo=0.0)


def _weight_decay(value):
    return _real("weight_decay", _no_schedule("weight_decay", value), lo=0.0)


def _no_schedule(name, value):
    if callable(value):
        raise TypeError(f"{name}: a schedule is not supported yet; pass a number")
    return value


def _unsupported(name, value, default, why):
    """Refuses an optax argument that fastopt does not implement yet unless it has its
    default."""
    if value is default or (default is not None and value == default):
        return
    raise ValueError(f"{name}={value!r:.60} is not supported yet by fastopt.jax ({why})")


def _options(max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
             stochastic_rounding, master_weights, seed, n_threads):
    skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
    if state_dtype is not None:
        try:
            name = state_dtype if isinstance(state_dtype, str) else np.dtype(state_dtype).name
        except TypeError:
            name = None
        if name not in _STATE_DTYPES or (name == "int8" and state_dtype != "int8"):
            raise ValueError(f"state_dtype: expected None, 'float32', 'bfloat16' or 'int8', "
                             f"got {state_dtype!r:.60}")
        state_dtype = _STATE_DTYPES[name]
    master_weights = flag("master_weights", master_weights)
    if stochastic_rounding is not None:
        stochastic_rounding = flag("stochastic_rounding", stochastic_rounding)
    else:  # as the array API's: stochastic unless there are master weights
        stochastic_rounding = not master_weights
    if isinstance(seed, jax.Array):
        raise TypeError("seed: expected a Python int, got a jax array (optax."
                        "inject_hyperparams injects numeric arguments: pass "
                        "static_args=('seed',))")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r:.60}")
    maximize = flag("maximize", maximize)
    if max_grad_norm is not None:
        max_grad_norm = _real("max_grad_norm", max_grad_norm, lo=0.0, lo_open=True)
    if max_grad_value is not None:
        if max_grad_norm is not None:
            raise ValueError("max_grad_value: not together with max_grad_norm (one gradient "
                             "clip per step, as the array API's optimizers)")
        max_grad_value = _real("max_grad_value", max_grad_value, lo=0.0, lo_open=True)
    if isinstance(n_threads, jax.Array):
        raise TypeError("n_threads: expected a Python int, got a jax array (optax."
                        "inject_hyperparams injects numeric arguments: pass "
                        "static_args=('n_threads',))")
    n_threads = get_num_threads() if n_threads is None else check_threads(n_threads,
                                                                          "n_threads")
    return (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
            stochastic_rounding, master_weights, seed, n_threads)


def _make(name, kernel, state_cls, scalars, learning_rate, hyper, group, options,
          cautious=False, fills=None, numbers=None, carried=None, scaled=None, decay_mask=None,
          mask_name="mask"):
    """The transformation of factory `name`: its elementwise `kernel`, state NamedTuple,
    struct fields (`scalars`), checked hyperparameters (`hyper`, for the repr) and `group`,
    (the array API's class, its param group's hyperparameters but lr) for state_dict; with
    `cautious`, the kernel's cautious variant of the rule table; `options` the factory's
    options (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
    stochastic_rounding, master_weights, seed, n_threads); `fills` the state arrays'
    initial values that are not 0 (_PARAMS: the parameter's); `numbers(count)` the array
    API's per-parameter state numbers after `count` steps, for state_dict; `carried` the
    scalars the state carries besides the count; `scaled` a rule's per-tensor factors of its
    update (see _Fused); `decay_mask` optax's weight-decay mask, the factory's argument
    `mask_name` (`scalars` then takes weight_decay=)."""
    caution = None
    if flag("cautious", cautious):
        caution = _rules.BY_NAME[group[0]].caution(kernel)
        hyper = dict(hyper, cautious=True)
        group = (group[0], dict(group[1], cautious=True))
    if decay_mask is not None:
        hyper = dict(hyper, **{mask_name: decay_mask})
    return _Fused(name, kernel, state_cls, scalars, learning_rate, hyper, group, caution,
                  fills or {}, numbers, carried or {}, scaled, *_options(*options),
                  decay_mask=decay_mask, mask_name=mask_name).transformation()


def _eps_root(value):
    """Refuses an optax eps_root other than 0 (None, the default, means 0: a number default
    would be traced by optax.inject_hyperparams and could not be checked)."""
    if value is not None:
        _unsupported("eps_root", real("eps_root", value, lo=0.0), 0.0,
                     "the kernel adds eps outside the square root only")


def _adam_arguments(b1, b2, eps, eps_root, mu_dtype):
    """(b1, b2, eps) of adam, adamw and radam, checked; their optax arguments that fastopt does
    not support yet refused unless at their defaults."""
    b1 = _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    eps = _real("eps", eps, lo=0.0)
    _eps_root(eps_root)
    _unsupported("mu_dtype", mu_dtype, None, "the state's dtype is state_dtype's")
    return b1, b2, eps


def _adam_family(name, learning_rate, b1, b2, eps, weight_decay, nesterov, cautious, options,
                 mask=None):
    """adam's (weight_decay None) or adamw's transformation; with `nesterov` optax's
    Nesterov form (optax.nadam / nadamw) on the NAdam kernel, whose two coefficients of g
    and m take optax's bias corrections, and which has no array-API twin (fastopt.NAdam
    follows torch's NAdam, with its momentum decay)."""
    decoupled = weight_decay is not None
    hyper = dict(b1=b1, b2=b2, eps=eps)
    if decoupled:
        hyper["weight_decay"] = weight_decay
    else:
        weight_decay = 0.0
    if not flag("nesterov", nesterov):
        return _make(name, "adam", AdamState,
                     _adam_scalars(b1, b2, eps, weight_decay=weight_decay,
                                   decoupled=decoupled), learning_rate, hyper,
                     ("AdamW" if decoupled else "Adam",
                      dict(betas=(b1, b2), eps=eps, weight_decay=weight_decay)),
                     options, cautious, decay_mask=mask)
    if flag("cautious", cautious):
        raise ValueError(f"cautious: not with nesterov=True (fastopt.jax.{name}'s cautious "
                         f"variant is of Adam's kernel; Nesterov Adam has none)")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        wd, decay = _scalars._decoupled(lr, weight_decay, decoupled)
        return dict(**_scalars.grad_scalars(grad_scale, grad_clip, maximize),
                    weight_decay=wd, decay=decay, one_minus_beta1=1 - b1, beta2=b2,
                    one_minus_beta2=1 - b2, bias_correction2=1 - b2 ** step, eps=eps,
                    grad_coef=-lr * (1 - b1) / (1 - b1 ** step),
                    avg_coef=-lr * b1 / (1 - b1 ** optax.safe_increment(step)),
                    lerp_hi=_scalars._lerp_hi(dtype, 1 - b1))
    return _make(name, "nadam", AdamState, scalars, learning_rate,
                 dict(hyper, nesterov=True), None, options, decay_mask=mask)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=None, mu_dtype=None, *, nesterov=False,
         cautious=False, max_grad_norm=None, max_grad_value=None, maximize=False,
         skip_nonfinite=False, state_dtype=None, stochastic_rounding=None, master_weights=False,
         seed=None, n_threads=None):
    r"""Adam (Kingma & Ba 2014) as an optax transformation run by fastopt's fused kernel.

    Follows ``optax.adam`` (its arguments, defaults and update). With gradient :math:`g_t`
    at step :math:`t = 1, 2, \ldots` and learning rate :math:`\gamma_t` (the schedule's
    value at count :math:`t - 1`, as optax's):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        p_{t+1} &= p_t - \gamma_t \frac{m_t / (1 - \beta_1^t)}
            {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    The kernel (:class:`fastopt.Adam`'s) evaluates this in torch's operation order:
    :math:`m_t = m_{t-1} + (1 - \beta_1)(g_t - m_{t-1})` (torch's lerp; for
    :math:`\beta_1 \le 0.5` its other form, :math:`g_t - (g_t - m_{t-1}) \beta_1`),
    :math:`v_t = \beta_2 v_{t-1} + ((1 - \beta_2) g_t) g_t`, and the denominator
    :math:`\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon` and step size
    :math:`\gamma_t / (1 - \beta_1^t)` once per step; it computes the bias corrections
    :math:`1 - \beta^t` as optax does, in the count's floating type (float32 unless
    ``jax_enable_x64``). Its results differ from ``optax.adam``'s by rounding only, a
    fraction of an ulp of the parameters per step, in float32 as in float64.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        eps_root: optax's; only 0 is supported yet (None, the default, is 0).
        mu_dtype: optax's; only None is supported yet (the state's dtype is
            ``state_dtype``'s).
        nesterov (bool): optax's Nesterov form (:func:`nadam`): the numerator
            :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`
            in place of :math:`m_t / (1 - \beta_1^t)`. Default False.
        cautious (bool): the cautious variant (C-Optim, Liang et al. 2024), as
            :class:`fastopt.Adam`'s option: per tensor, the update's entries whose sign
            disagrees with the gradient's are zeroed and the rest scaled by
            1 / max(mean agreement, 1e-3); one more pass (a count) before the step.
            Not with nesterov. Default False.
        max_grad_norm (float or None): clip the gradients' total 2-norm :math:`N` to this:
            every gradient is scaled by :math:`\min(1, \text{max\_grad\_norm} / (N +
            10^{-6}))`, ``torch.nn.utils.clip_grad_norm_``'s coefficient (optax's
            ``clip_by_global_norm`` has no :math:`10^{-6}`). Default None.
        max_grad_value (float or None): clamp every gradient element to
            :math:`[-v, v]` (``torch.nn.utils.clip_grad_value_``), in the kernel's pass; not
            with max_grad_norm. Default None.
        maximize (bool): ascend instead of descend (the gradients negated, as torch's
            option). Default False.
        skip_nonfinite (bool): skip a step whose gradients hold NaN or inf: the parameters,
            the state and the count stay as they were (``update`` returns zero updates),
            as :class:`fastopt.Adam`'s option. Default False.
        state_dtype (str or None): the state arrays' dtype: None (float32 for bfloat16 and
            float16 parameters, else the parameters'), ``"float32"``, ``"bfloat16"`` or
            ``"int8"`` (blockwise 8-bit: uint8 codes of tensors of 4096 elements or more,
            their float32 block scales in the state's ``absmax`` field, a dict of pytrees
            under the state arrays' names, an empty array for a smaller tensor, which keeps
            float32 state). Low-precision parameters or state are kept as the array API's
            storage formats keep them: the kernel computes in float32 and rounds (or
            quantizes) what it writes.
        stochastic_rounding (bool or None): round the written bfloat16 / float16 values up
            with probability equal to the discarded fraction (Philox bits keyed by `seed`,
            the parameter's number in ``state_dict``, its index in ``jax.tree.leaves``
            order but with a weight-decay mask, the step count and the element, as the
            array API's), else to nearest even. Default None: stochastic,
            to nearest even with master_weights (as the array API's).
        master_weights (bool): keep a float32 copy of each bfloat16 / float16 parameter in
            the state (``master_param``, made by ``init``), update the copy in float32 and
            write the parameter as the copy rounded, in the same pass (the array API's
            option; nothing for float32 or float64 parameters). Default False.
        seed (int or None): the seed of stochastic rounding, in [0, 2**64). Default None:
            0 (None, so that optax.inject_hyperparams leaves it alone).
        n_threads (int or None): CPU threads for the kernel; default
            ``fastopt.get_num_threads()`` when the transformation is made.

    Returns:
        FusedTransformation: with state :class:`AdamState`.
    """
    b1, b2, eps = _adam_arguments(b1, b2, eps, eps_root, mu_dtype)
    return _adam_family("adam", _learning_rate(learning_rate), b1, b2, eps, None, nesterov,
                        cautious, (max_grad_norm, max_grad_value, maximize, skip_nonfinite,
                                   state_dtype, stochastic_rounding, master_weights, seed,
                                   n_threads))


# the Args entries of the options every factory but adam shares (adam's describe them)
_OPTIONS_DOC = """        max_grad_norm (float or None): clip the gradients' total 2-norm, as
            :func:`adam`'s. Default None.
        max_grad_value (float or None): clamp the gradients, as :func:`adam`'s. Default
            None.
        maximize (bool): ascend instead of descend. Default False.
        skip_nonfinite (bool): skip a step with NaN or inf gradients, as :func:`adam`'s.
            Default False.
        state_dtype, stochastic_rounding, master_weights, seed: low-precision parameters
            and state, as :func:`adam`'s. Defaults None (each), master_weights False.
        n_threads (int or None): CPU threads for the kernel; default
            ``fastopt.get_num_threads()`` when the transformation is made.
"""


# the Args entry of optax's weight-decay mask (`mask`, Adadelta's `weight_decay_mask`)
_MASK_DOC = """        {name}: optax's weight-decay mask: a pytree of bools shaped as the
            parameters (or a prefix of them: a bool for a whole subtree), or a function of
            the parameters returning one (under ``optax.inject_hyperparams``, name it in
            ``static_args``); the decay applies where True. None: everywhere. Default None.
"""


# the same for the factories without low-precision parameters and state (Lamb, Muon,
# Prodigy)
_FLOAT_OPTIONS_DOC = _OPTIONS_DOC.replace(
    """        state_dtype, stochastic_rounding, master_weights, seed: low-precision parameters
            and state, as :func:`adam`'s. Defaults None (each), master_weights False.
""", "")


def _options_doc(factory):
    """`factory` with _OPTIONS_DOC in place of the ``{options}`` line of its docstring (or
    _FLOAT_OPTIONS_DOC in place of ``{float_options}``), and the array API's math of the
    rule (its module's MATH) in place of a ``{math}`` line, and _MASK_DOC in place of a
    ``{mask}`` or ``{weight_decay_mask}`` line."""
    doc = factory.__doc__.replace("        {options}\n", _OPTIONS_DOC).replace(
        "        {float_options}\n", _FLOAT_OPTIONS_DOC)
    for name in ("mask", "weight_decay_mask"):
        doc = doc.replace(f"        {{{name}}}\n", _MASK_DOC.format(name=name))
    if "    {math}\n" in doc:
        doc = doc.replace("    {math}\n", importlib.import_module(
            f"fastopt.optim.{factory.__name__}").MATH)
    factory.__doc__ = doc
    return factory


@_options_doc
def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=None, mu_dtype=None,
          weight_decay=1e-4, mask=None, *, nesterov=False, cautious=False, max_grad_norm=None,
          max_grad_value=None, maximize=False, skip_nonfinite=False, state_dtype=None,
          stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""AdamW (Loshchilov & Hutter 2019) as an optax transformation run by fastopt's fused
    kernel.

    Follows ``optax.adamw`` (its arguments, defaults and update): Adam's update plus the
    decoupled weight decay :math:`\lambda p_t`, both scaled by the learning rate. With
    gradient :math:`g_t` at step :math:`t = 1, 2, \ldots` and learning rate
    :math:`\gamma_t` (the schedule's value at count :math:`t - 1`):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        p_{t+1} &= p_t - \gamma_t \left(\frac{m_t / (1 - \beta_1^t)}
            {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda p_t\right)

    The kernel (:class:`fastopt.AdamW`'s) evaluates this in torch's operation order: the
    decay first, as :math:`p_t (1 - \gamma_t \lambda)`, then
    :math:`m_t = m_{t-1} + (1 - \beta_1)(g_t - m_{t-1})` (torch's lerp; for
    :math:`\beta_1 \le 0.5` its other form, :math:`g_t - (g_t - m_{t-1}) \beta_1`),
    :math:`v_t = \beta_2 v_{t-1} + ((1 - \beta_2) g_t) g_t`, and the denominator
    :math:`\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon` and step size
    :math:`\gamma_t / (1 - \beta_1^t)` once per step; it computes the bias corrections
    :math:`1 - \beta^t` as optax does, in the count's floating type (float32 unless
    ``jax_enable_x64``). Its results differ from ``optax.adamw``'s by rounding only: a
    fraction of an ulp of the parameters per step, plus, where :math:`\lambda \ne 0`, the
    rounding of the factor :math:`1 - \gamma_t \lambda` to the parameters' dtype, up to
    half an ulp of the parameters per step, of one sign for a constant learning rate.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        eps_root: optax's; only 0 is supported yet (None, the default, is 0).
        mu_dtype: optax's; only None is supported yet (the state's dtype is
            ``state_dtype``'s).
        weight_decay (float): :math:`\lambda \ge 0`, a number. Default 1e-4.
        {mask}
        nesterov (bool): optax's Nesterov form (:func:`nadamw`): the numerator
            :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`
            in place of :math:`m_t / (1 - \beta_1^t)`. Default False.
        cautious (bool): the cautious variant (C-Optim, Liang et al. 2024), as
            :class:`fastopt.AdamW`'s option: per tensor, the update's entries whose sign
            disagrees with the gradient's are zeroed and the rest scaled by
            1 / max(mean agreement, 1e-3); one more pass (a count) before the step.
            Not with nesterov. Default False.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdamState`.
    """
    b1, b2, eps = _adam_arguments(b1, b2, eps, eps_root, mu_dtype)
    weight_decay = _weight_decay(weight_decay)
    return _adam_family("adamw", _learning_rate(learning_rate), b1, b2, eps, weight_decay,
                        nesterov, cautious, (max_grad_norm, max_grad_value, maximize,
                                             skip_nonfinite, state_dtype, stochastic_rounding,
                                             master_weights, seed, n_threads), mask)


def _adam_scalars(b1, b2, eps, weight_decay, decoupled):
    """Adam's (decoupled False, no decay) or AdamW's struct fields; AdamW's decay factor
    1 - lr * wd is exactly 1 for wd = 0, so a traced wd needs no branch."""
    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        return _scalars.adam_scalars(dtype, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps,
                                     weight_decay=weight_decay, decoupled=decoupled,
                                     maximize=maximize, grad_scale=grad_scale,
                                     grad_clip=grad_clip)
    return scalars


@_options_doc
def nadam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=None, mu_dtype=None, *,
          nesterov=True, max_grad_norm=None, max_grad_value=None, maximize=False,
          skip_nonfinite=False, state_dtype=None, stochastic_rounding=None,
          master_weights=False, seed=None, n_threads=None):
    r"""NAdam as optax has it (Dozat 2016): Nesterov Adam, :func:`adam` with
    ``nesterov=True``, run by fastopt's fused kernel.

    Follows ``optax.nadam`` (its arguments, defaults and update). With gradient :math:`g_t`
    at step :math:`t = 1, 2, \ldots` and learning rate :math:`\gamma_t` (the schedule's
    value at count :math:`t - 1`):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        p_{t+1} &= p_t - \gamma_t \frac{\beta_1 m_t / (1 - \beta_1^{t+1})
            + (1 - \beta_1) g_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    This is not ``torch.optim.NAdam`` (:class:`fastopt.NAdam`), whose momentum coefficient
    decays with the step (its ``momentum_decay``); the kernel is that class's, with the two
    coefficients of :math:`g_t` and :math:`m_t` above computed once per step (in the
    count's floating type, as optax's bias corrections), so its results differ from
    ``optax.nadam``'s by rounding only. No array-API class has this update:
    ``state_dict`` refuses it (checkpoint the state pytree).

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        eps_root: optax's; only 0 is supported yet (None, the default, is 0).
        mu_dtype: optax's; only None is supported yet.
        nesterov (bool): True (False is :func:`adam`), as ``optax.nadam``, a partial of
            ``optax.adam``. Default True.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdamState`.
    """
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov,
                max_grad_norm=max_grad_norm, max_grad_value=max_grad_value,
                maximize=maximize, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype,
                stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                seed=seed, n_threads=n_threads)


@_options_doc
def nadamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=None, mu_dtype=None,
           weight_decay=1e-4, mask=None, *, nesterov=True, max_grad_norm=None,
           max_grad_value=None, maximize=False, skip_nonfinite=False, state_dtype=None,
           stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""NAdamW as optax has it: :func:`nadam`'s update plus the decoupled weight decay
    :math:`\lambda p_t` scaled by the learning rate, :func:`adamw` with ``nesterov=True``.

    Follows ``optax.nadamw`` (its arguments, defaults and update):

    .. math::

        p_{t+1} = p_t - \gamma_t \left(\frac{\beta_1 m_t / (1 - \beta_1^{t+1})
            + (1 - \beta_1) g_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda p_t\right)

    with :math:`m_t, v_t` as :func:`nadam`'s. The kernel applies the decay first, as
    :math:`p_t (1 - \gamma_t \lambda)` (as :func:`adamw`'s); its results differ from
    ``optax.nadamw``'s by rounding only. ``state_dict`` refuses it, as :func:`nadam`'s.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule.
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        eps_root: optax's; only 0 is supported yet (None, the default, is 0).
        mu_dtype: optax's; only None is supported yet.
        weight_decay (float): :math:`\lambda \ge 0`, a number. Default 1e-4.
        {mask}
        nesterov (bool): True (False is :func:`adamw`), as ``optax.nadamw``. Default True.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdamState`.
    """
    return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
                 nesterov=nesterov, max_grad_norm=max_grad_norm, max_grad_value=max_grad_value,
                 maximize=maximize, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype,
                 stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                 seed=seed, n_threads=n_threads)


@_options_doc
def sgd(learning_rate, momentum=None, nesterov=False, accumulator_dtype=None, *, max_grad_norm=None,
        max_grad_value=None, maximize=False, skip_nonfinite=False, state_dtype=None,
        stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum, as an optax
    transformation run by fastopt's fused kernel.

    Follows ``optax.sgd`` (its arguments, defaults and update). With gradient :math:`g_t`
    and learning rate :math:`\gamma_t` (the schedule's value at count :math:`t - 1`):

    .. math::

        b_t &= \mu b_{t-1} + g_t \quad (b_0 = 0) \\
        d_t &= g_t + \mu b_t \text{ with nesterov, else } b_t
            \text{ (} g_t \text{ without momentum)} \\
        p_{t+1} &= p_t - \gamma_t d_t

    This is ``torch.optim.SGD``'s kernel (:class:`fastopt.SGD`) with dampening 0 and the
    buffer starting at zero; it evaluates optax's expressions in optax's order. Results
    differ from ``optax.sgd``'s only where XLA compiles optax's :math:`a b + c` into one
    fused multiply-add (its CPU backend does), which the kernel rounds twice: by a
    fraction of an ulp of the parameters per step.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        momentum (float or None): :math:`\mu \ge 0`; None (the default) keeps no buffer.
        nesterov (bool): Nesterov momentum (no effect without momentum, as optax's).
            Default False.
        accumulator_dtype: optax's; only None is supported yet (the state's dtype is
            ``state_dtype``'s).
        {options}

    Returns:
        FusedTransformation: with state :class:`SGDState`.
    """
    learning_rate = _learning_rate(learning_rate)
    if momentum is not None:
        momentum = _real("momentum", momentum, lo=0.0)
    nesterov = flag("nesterov", nesterov)
    _unsupported("accumulator_dtype", accumulator_dtype, None,
                 "the state's dtype is state_dtype's")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        return _scalars.sgd_scalars(dtype, lr=lr,
                                    momentum=0.0 if momentum is None else momentum,
                                    dampening=0.0, weight_decay=0.0, nesterov=nesterov,
                                    maximize=maximize, first=False, grad_scale=grad_scale,
                                    grad_clip=grad_clip)

    return _make("sgd", "sgd" if momentum is None else "sgd_momentum", SGDState, scalars,
                 learning_rate, dict(momentum=momentum, nesterov=nesterov),
                 ("SGD", dict(momentum=0.0 if momentum is None else momentum, dampening=0.0,
                              weight_decay=0.0, nesterov=nesterov)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads))


@_options_doc
def lion(learning_rate, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3, mask=None, *,
         cautious=False, max_grad_norm=None, max_grad_value=None, maximize=False,
         skip_nonfinite=False, state_dtype=None, stochastic_rounding=None, master_weights=False,
         seed=None, n_threads=None):
    r"""Lion (Chen et al. 2023) as an optax transformation run by fastopt's fused kernel.

    Follows ``optax.lion`` (its arguments, defaults and update). With gradient
    :math:`g_t` and learning rate :math:`\gamma_t` (the schedule's value at count
    :math:`t - 1`):

    .. math::

        u_t &= \operatorname{sign}((1 - \beta_1) g_t + \beta_1 m_{t-1}) + \lambda p_t \\
        m_t &= (1 - \beta_2) g_t + \beta_2 m_{t-1} \\
        p_{t+1} &= p_t - \gamma_t u_t

    The kernel (:class:`fastopt.Lion`'s) evaluates optax's expressions in optax's order.
    Results differ from ``optax.lion``'s only where XLA compiles optax's :math:`a b + c`
    into one fused multiply-add (its CPU backend does), which the kernel rounds twice: by
    a fraction of an ulp of the parameters per step.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1]. Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1]. Default 0.99.
        mu_dtype: optax's; only None is supported yet (the state's dtype is
            ``state_dtype``'s).
        weight_decay (float): decoupled :math:`\lambda \ge 0`, a number. Default 1e-3.
        {mask}
        cautious (bool): the cautious variant (C-Optim, Liang et al. 2024), as
            :class:`fastopt.Lion`'s option: per tensor, the update's entries whose sign
            disagrees with the gradient's are zeroed and the rest scaled by
            1 / max(mean agreement, 1e-3); one more pass (a count) before the step.
            Default False.
        {options}

    Returns:
        FusedTransformation: with state :class:`LionState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0)
    b2 = _real("b2", b2, lo=0.0, hi=1.0)
    weight_decay = _weight_decay(weight_decay)
    _unsupported("mu_dtype", mu_dtype, None, "the state's dtype is state_dtype's")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        return _scalars.lion_scalars(dtype, lr=lr, beta1=b1, beta2=b2,
                                     weight_decay=weight_decay, maximize=maximize,
                                     grad_scale=grad_scale, grad_clip=grad_clip)

    return _make("lion", "lion", LionState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, weight_decay=weight_decay),
                 ("Lion", dict(betas=(b1, b2), weight_decay=weight_decay)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads), cautious,
                 decay_mask=mask)


@_low_precision_fields
class AdamaxState(NamedTuple):
    """The state of :func:`adamax`: the step count (an int32 scalar), the first moment m
    and the infinity moment u, each a pytree shaped like the parameters (torch's names;
    optax calls them ``mu`` and ``nu``)."""
    count: Any
    exp_avg: Any
    exp_inf: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def adamax(learning_rate, b1=0.9, b2=0.999, eps=1e-8, *, max_grad_norm=None, max_grad_value=None,
           maximize=False, skip_nonfinite=False, state_dtype=None, stochastic_rounding=None,
           master_weights=False, seed=None, n_threads=None):
    r"""Adamax (Kingma & Ba 2014, the infinity-norm variant of Adam) as an optax
    transformation run by fastopt's fused kernel.

    Follows ``optax.adamax`` (its arguments, defaults and update), which is also
    ``torch.optim.Adamax``'s. With gradient :math:`g_t` at step :math:`t = 1, 2, \ldots` and
    learning rate :math:`\gamma_t` (the schedule's value at count :math:`t - 1`):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        p_{t+1} &= p_t - \frac{\gamma_t}{1 - \beta_1^t} \frac{m_t}{u_t}

    The kernel (:class:`fastopt.Adamax`'s) updates :math:`m_t` as torch's lerp and applies
    the step size :math:`\gamma_t / (1 - \beta_1^t)`, computed once per step (in the count's
    floating type, as optax's bias correction), to :math:`m_t / u_t`: its results differ
    from ``optax.adamax``'s by rounding only.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdamaxState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    eps = _real("eps", eps, lo=0.0)

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        return _scalars.adamax_scalars(dtype, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps,
                                       weight_decay=0.0, maximize=maximize,
                                       grad_scale=grad_scale, grad_clip=grad_clip)

    return _make("adamax", "adamax", AdamaxState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, eps=eps),
                 ("Adamax", dict(betas=(b1, b2), eps=eps, weight_decay=0.0)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads))


@_options_doc
def radam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=None, threshold=5.0, *,
          nesterov=False, max_grad_norm=None, max_grad_value=None, maximize=False,
          skip_nonfinite=False, state_dtype=None, stochastic_rounding=None,
          master_weights=False, seed=None, n_threads=None):
    r"""RAdam (Liu et al. 2020, rectified Adam) as optax has it, run by fastopt's fused
    kernel.

    Follows ``optax.radam`` (its arguments, defaults and update). With :math:`m_t, v_t` as
    :func:`adam`'s, :math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`:

    .. math::

        \hat m_t &= m_t / (1 - \beta_1^t), \quad \hat v_t = v_t / (1 - \beta_2^t) \\
        p_{t+1} &= p_t - \gamma_t r_t \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
            \text{ where } \rho_t \ge \text{threshold, else } p_t - \gamma_t \hat m_t \\
        r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2) \rho_\infty}
            {(\rho_\infty - 4)(\rho_\infty - 2) \rho_t}}

    ``torch.optim.RAdam`` (:class:`fastopt.RAdam`) adds :math:`\epsilon` to
    :math:`\sqrt{v_t}` before the bias correction and rectifies where
    :math:`\rho_t > 5`; its kernel runs this update with :math:`\epsilon` scaled by
    :math:`\sqrt{1 - \beta_2^t}` and optax's test, computed once per step in the count's
    floating type: the results differ from ``optax.radam``'s by rounding only. No array-API
    class has this update: ``state_dict`` refuses it (checkpoint the state pytree).

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        eps_root: optax's; only 0 is supported yet (None, the default, is 0).
        threshold (float): the least :math:`\rho_t` that rectifies. Default 5.
        nesterov (bool): optax's; only False is supported yet.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdamState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1, b2, eps = _adam_arguments(b1, b2, eps, eps_root, None)
    threshold = _real("threshold", threshold)
    _unsupported("nesterov", flag("nesterov", nesterov), False,
                 "the RAdam kernel has no Nesterov form")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        b2t = b2 ** step
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * step * b2t / (1 - b2t)
        rectify = rho >= threshold
        ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
        bias_correction2_sqrt = (1 - b2t) ** 0.5
        return dict(**_scalars.grad_scalars(grad_scale, grad_clip, maximize),
                    weight_decay=0.0, decay=1.0, one_minus_beta1=1 - b1, beta2=b2,
                    one_minus_beta2=1 - b2, bias_correction1=1 - b1 ** step, lr=lr,
                    bias_correction2_sqrt=bias_correction2_sqrt,
                    eps=eps * bias_correction2_sqrt,
                    rect=jnp.sqrt(jnp.where(rectify, ratio, 1)),
                    lerp_hi=_scalars._lerp_hi(dtype, 1 - b1), rectify=rectify)

    return _make("radam", "radam", AdamState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, eps=eps, threshold=threshold), None,
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads))


@_low_precision_fields
class AdadeltaState(NamedTuple):
    """The state of :func:`adadelta`: the step count (an int32 scalar), the running
    averages of the squared gradients and of the squared updates, each a pytree shaped
    like the parameters (torch's names; optax calls them ``e_g`` and ``e_x``)."""
    count: Any
    square_avg: Any
    acc_delta: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def adadelta(learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, weight_decay_mask=None, *,
             max_grad_norm=None, max_grad_value=None, maximize=False, skip_nonfinite=False,
             state_dtype=None, stochastic_rounding=None, master_weights=False, seed=None,
             n_threads=None):
    r"""Adadelta (Zeiler 2012) as an optax transformation run by fastopt's fused kernel.

    Follows ``optax.adadelta`` (its arguments and update, which are also
    ``torch.optim.Adadelta``'s), except that ``learning_rate`` defaults to 1.0, torch's:
    optax's default, None, skips its learning-rate scaling and with it the sign flip, so
    that ``optax.apply_updates`` ascends. With gradient :math:`g_t` plus the L2 term
    :math:`\lambda p_t` and learning rate :math:`\gamma_t` (the schedule's value at count
    :math:`t - 1`):

    .. math::

        v_t &= \rho v_{t-1} + (1 - \rho) g_t^2 \\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t \\
        u_t &= \rho u_{t-1} + (1 - \rho) \Delta_t^2 \\
        p_{t+1} &= p_t - \gamma_t \Delta_t

    The kernel (:class:`fastopt.Adadelta`'s) evaluates torch's expressions: its results
    differ from ``optax.adadelta``'s by rounding only.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step). Default 1.0.
        rho (float): :math:`\rho` in [0, 1]. Default 0.9.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-6.
        weight_decay (float): the L2 coefficient :math:`\lambda \ge 0`, added to the
            gradient, a number. Default 0.
        {weight_decay_mask}
        {options}

    Returns:
        FusedTransformation: with state :class:`AdadeltaState`.
    """
    if learning_rate is None:
        raise ValueError("learning_rate: expected a number or a schedule; optax's None (no "
                         "scaling, and so no descent) is not offered: pass 1.0 for "
                         "Adadelta without a learning rate")
    learning_rate = _learning_rate(learning_rate)
    rho = _real("rho", rho, lo=0.0, hi=1.0)
    eps = _real("eps", eps, lo=0.0)
    weight_decay = _weight_decay(weight_decay)

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        return _scalars.adadelta_scalars(dtype, lr=lr, rho=rho, eps=eps,
                                         weight_decay=weight_decay, maximize=maximize,
                                         grad_scale=grad_scale, grad_clip=grad_clip)

    return _make("adadelta", "adadelta", AdadeltaState, scalars, learning_rate,
                 dict(rho=rho, eps=eps, weight_decay=weight_decay),
                 ("Adadelta", dict(rho=rho, eps=eps, weight_decay=weight_decay)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads),
                 decay_mask=weight_decay_mask, mask_name="weight_decay_mask")


@_low_precision_fields
class AdagradState(NamedTuple):
    """The state of :func:`adagrad`: the step count (an int32 scalar) and the sums of the
    squared gradients, a pytree shaped like the parameters (torch's name; optax calls it
    ``sum_of_squares``)."""
    count: Any
    sum: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7, *, max_grad_norm=None,
            max_grad_value=None, maximize=False, skip_nonfinite=False, state_dtype=None,
            stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""Adagrad (Duchi et al. 2011) as optax has it, run by fastopt's fused kernel.

    Follows ``optax.adagrad`` (its arguments, defaults and update). With gradient
    :math:`g_t` and learning rate :math:`\gamma_t` (the schedule's value at count
    :math:`t - 1`):

    .. math::

        s_t = s_{t-1} + g_t^2 \quad (s_0 = \text{initial\_accumulator\_value}), \qquad
        p_{t+1} = p_t - \gamma_t \frac{g_t}{\sqrt{s_t + \epsilon}}

    :math:`\epsilon` under the square root, as optax's (``torch.optim.Adagrad``, and
    :class:`fastopt.Adagrad`, add it to the root); an element with :math:`s_t = 0` moves
    by 0, as optax's. The kernel is :class:`fastopt.Adagrad`'s with its ``eps_root``
    field; its results differ from ``optax.adagrad``'s by rounding only. No array-API class
    has this update: ``state_dict`` refuses it (checkpoint the state pytree).

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        initial_accumulator_value (float): :math:`s_0 \ge 0`. Default 0.1.
        eps (float): :math:`\epsilon \ge 0`, not 0 together with
            ``initial_accumulator_value``. Default 1e-7.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdagradState`.
    """
    learning_rate = _learning_rate(learning_rate)
    initial = _real("initial_accumulator_value", initial_accumulator_value, lo=0.0)
    eps = _real("eps", eps, lo=0.0)
    if isinstance(eps, float) and isinstance(initial, float) and eps == initial == 0:
        raise ValueError("eps and initial_accumulator_value are both 0: an element whose "
                         "gradients are all 0 would divide 0 by 0 (optax's jnp.where skips "
                         "it; the kernel has no such test): make one of them positive")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        return _scalars.adagrad_scalars(dtype, step=step, lr=lr, lr_decay=0.0,
                                        weight_decay=0.0, eps=0.0, eps_root=eps,
                                        maximize=maximize, grad_scale=grad_scale,
                                        grad_clip=grad_clip)

    return _make("adagrad", "adagrad", AdagradState, scalars, learning_rate,
                 dict(initial_accumulator_value=initial, eps=eps), None,
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads),
                 fills=dict(sum=initial))


@_low_precision_fields
class RMSpropState(NamedTuple):
    """The state of :func:`rmsprop`: the step count (an int32 scalar), the running average
    of the squared gradients, with ``centered`` that of the gradients, and with
    ``momentum`` the trace of the updates, each a pytree shaped like the parameters, or
    None where not kept (torch's names; optax calls them ``nu``, ``mu`` and ``trace``)."""
    count: Any
    square_avg: Any
    grad_avg: Any = None
    momentum_buffer: Any = None
    master_param: Any = None
    absmax: Any = None


@_options_doc
def rmsprop(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True,
            centered=False, momentum=None, nesterov=False, bias_correction=False, *,
            max_grad_norm=None, max_grad_value=None, maximize=False, skip_nonfinite=False,
            state_dtype=None, stochastic_rounding=None, master_weights=False, seed=None,
            n_threads=None):
    r"""RMSprop (Tieleman & Hinton 2012) as optax has it, run by fastopt's fused kernel.

    Follows ``optax.rmsprop`` (its arguments, defaults and update). With gradient
    :math:`g_t`, learning rate :math:`\gamma_t` (the schedule's value at count
    :math:`t - 1`) and decay :math:`\rho`:

    .. math::

        v_t &= \rho v_{t-1} + (1 - \rho) g_t^2 \quad (v_0 = \text{initial\_scale}) \\
        \bar g_t &= \rho \bar g_{t-1} + (1 - \rho) g_t, \quad
            r_t = v_t - \bar g_t^2 \text{ if centered, else } r_t = v_t \\
        u_t &= -\gamma_t \frac{g_t}{\sqrt{r_t + \epsilon}} \text{ (eps\_in\_sqrt), else }
            -\gamma_t \frac{g_t}{\sqrt{r_t} + \epsilon} \\
        b_t &= \mu b_{t-1} + u_t, \quad p_{t+1} = p_t + b_t \text{ with momentum }
            \mu \text{, else } p_{t+1} = p_t + u_t

    optax's momentum is a trace of the updates after the learning rate, so under a
    schedule it differs from ``torch.optim.RMSprop``'s, whose buffer is multiplied by the
    current rate. The kernel is :class:`fastopt.RMSprop`'s with its ``eps_root`` and
    ``trace_scale`` fields; its results differ from ``optax.rmsprop``'s by rounding only.
    With ``eps_in_sqrt=False``, no momentum and ``initial_scale=0`` the update is
    :class:`fastopt.RMSprop`'s (``alpha`` = ``decay``), and ``state_dict`` converts to it;
    otherwise no array-API class has it and ``state_dict`` refuses it.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        decay (float): :math:`\rho` in [0, 1]. Default 0.9.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        initial_scale (float): :math:`v_0 \ge 0`. Default 0.
        eps_in_sqrt (bool): :math:`\epsilon` under the square root. Default True.
        centered (bool): divide by the estimated standard deviation. Default False.
        momentum (float or None): :math:`\mu \ge 0`, the trace's decay; None for none.
            Default None.
        nesterov (bool): optax's; only False is supported yet.
        bias_correction (bool): optax's; only False is supported yet.
        {options}

    Returns:
        FusedTransformation: with state :class:`RMSpropState`.
    """
    learning_rate = _learning_rate(learning_rate)
    decay = _real("decay", decay, lo=0.0, hi=1.0)
    eps = _real("eps", eps, lo=0.0)
    initial_scale = _real("initial_scale", initial_scale, lo=0.0)
    eps_in_sqrt = flag("eps_in_sqrt", eps_in_sqrt)
    centered = flag("centered", centered)
    if momentum is not None:
        momentum = _real("momentum", momentum, lo=0.0)
    _unsupported("nesterov", flag("nesterov", nesterov), False,
                 "the kernel's momentum is a plain trace")
    _unsupported("bias_correction", flag("bias_correction", bias_correction), False,
                 "the kernel does not divide the averages by 1 - decay**t")
    kernel = "rmsprop" + ("_centered" if centered else "") + (
        "_momentum" if momentum is not None else "")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        return _scalars.rmsprop_scalars(
            dtype, lr=lr, alpha=decay, eps=0.0 if eps_in_sqrt else eps,
            eps_root=eps if eps_in_sqrt else 0.0, weight_decay=0.0,
            momentum=0.0 if momentum is None else momentum, centered=centered,
            lr_in_trace=momentum is not None, maximize=maximize, grad_scale=grad_scale,
            grad_clip=grad_clip)

    group = None  # torch's RMSprop: eps added to the root, no trace, zeros to start
    if not eps_in_sqrt and momentum is None and isinstance(initial_scale, float) \
            and initial_scale == 0:
        group = ("RMSprop", dict(alpha=decay, eps=eps, weight_decay=0.0, momentum=0.0,
                                 centered=centered))
    return _make("rmsprop", kernel, RMSpropState, scalars, learning_rate,
                 dict(decay=decay, eps=eps, initial_scale=initial_scale,
                      eps_in_sqrt=eps_in_sqrt, centered=centered, momentum=momentum),
                 group,
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads),
                 fills=dict(square_avg=initial_scale))


def _quarter_power(count):
    return count ** 0.25


@_options_doc
def adopt(learning_rate, b1=0.9, b2=0.9999, eps=1e-6, mu_dtype=None, *, nesterov=False,
          use_clipping=True, clip_value_fn=_quarter_power, cautious=False, max_grad_norm=None,
          max_grad_value=None, maximize=False, skip_nonfinite=False, state_dtype=None,
          stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""ADOPT (Taniguchi et al. 2024) as an optax transformation run by fastopt's fused
    kernel.

    Follows ``optax.contrib.adopt`` (its arguments, defaults and update), which is also
    the authors' (``iShohei220/adopt``, as :class:`fastopt.ADOPT`). The first step only
    sets :math:`v_1 = g_1^2`. With gradient :math:`g_t` at step :math:`t \ge 2` and learning
    rate :math:`\gamma_t` (the schedule's value at count :math:`t - 1`):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)
            \operatorname{clip}\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},
            -c_t, c_t\right) \\
        p_{t+1} &= p_t - \gamma_t m_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2

    with :math:`c_t` = ``clip_value_fn(t - 1)`` (:math:`(t - 1)^{1/4}` by default; no
    clipping without ``use_clipping``). The kernel updates :math:`m_t` as torch's lerp:
    its results differ from optax's by rounding only.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.9999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-6.
        mu_dtype: optax's; only None is supported yet (the state's dtype is
            ``state_dtype``'s).
        nesterov (bool): optax's; only False is supported yet.
        use_clipping (bool): clip the normalized gradient to :math:`\pm c_t`. Default True.
        clip_value_fn: :math:`c_t` as a function of the count :math:`t - 1`, traced inside
            the jitted step. Default :math:`x^{1/4}`, optax's.
        cautious (bool): the cautious variant (C-Optim, Liang et al. 2024), as
            :class:`fastopt.ADOPT`'s option: per tensor, the update's entries whose sign
            disagrees with the gradient's are zeroed and the rest scaled by
            1 / max(mean agreement, 1e-3); one more pass (a count) before the step.
            Default False.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdamState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    eps = _real("eps", eps, lo=0.0)
    _unsupported("mu_dtype", mu_dtype, None, "the state's dtype is state_dtype's")
    _unsupported("nesterov", flag("nesterov", nesterov), False,
                 "the kernel keeps one first moment")
    use_clipping = flag("use_clipping", use_clipping)
    if use_clipping and not callable(clip_value_fn):
        raise TypeError(f"clip_value_fn: expected a function of the step count, got "
                        f"{type(clip_value_fn).__name__}")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        clip_value = clip_value_fn(step - 1) if use_clipping else None
        return _scalars.adopt_scalars(dtype, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps,
                                      weight_decay=0.0, decoupled=False,
                                      clip_value=clip_value, maximize=maximize,
                                      grad_scale=grad_scale, grad_clip=grad_clip)

    return _make("adopt", "adopt", AdamState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, eps=eps, use_clipping=use_clipping),
                 ("ADOPT", dict(betas=(b1, b2), eps=eps, weight_decay=0.0)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads), cautious)


@_low_precision_fields
class AdEMAMixState(NamedTuple):
    """The state of :func:`ademamix`: the step count (an int32 scalar), the fast and the
    slow first moments and the second moment, each a pytree shaped like the parameters
    (fastopt's names; optax calls them ``m1``, ``m2`` and ``nu``)."""
    count: Any
    exp_avg_fast: Any
    exp_avg_slow: Any
    exp_avg_sq: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def ademamix(learning_rate, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, eps_root=None,
             mu_dtype=None, weight_decay=0.0, mask=None, *, cautious=False, max_grad_norm=None,
             max_grad_value=None, maximize=False, skip_nonfinite=False, state_dtype=None,
             stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""AdEMAMix (Pagliardini, Ablin & Grangier 2024) as an optax transformation run by
    fastopt's fused kernel.

    Follows ``optax.contrib.ademamix`` (its arguments, defaults and update; its
    :math:`\alpha` defaults to 5.0, the authors' and :class:`fastopt.AdEMAMix`'s to 2.0).
    With gradient :math:`g_t` at step :math:`t = 1, 2, \ldots` and learning rate
    :math:`\gamma_t` (the schedule's value at count :math:`t - 1`):

    .. math::

        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1 - \beta_1) g_t \\
        m^{(2)}_t &= \beta_3 m^{(2)}_{t-1} + (1 - \beta_3) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        p_{t+1} &= p_t - \gamma_t \left(\frac{m^{(1)}_t / (1 - \beta_1^t)
            + \alpha m^{(2)}_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda p_t\right)

    :math:`\beta_3` and :math:`\alpha` may be schedules, functions of the count
    :math:`t - 1` (optax's warmups), traced inside the jitted step. The kernel
    (:class:`fastopt.AdEMAMix`'s) updates the moments as torch's lerp and divides by
    :math:`\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon`: its results differ from optax's by
    rounding only.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        b3: :math:`\beta_3` in [0, 1), or a schedule of the count. Default 0.9999.
        alpha: :math:`\alpha \ge 0`, or a schedule of the count. Default 5.0.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        eps_root: optax's; only 0 is supported yet (None, the default, is 0).
        mu_dtype: optax's; only None is supported yet (the state's dtype is
            ``state_dtype``'s).
        weight_decay (float): decoupled :math:`\lambda \ge 0`, a number. Default 0.
        {mask}
        cautious (bool): the cautious variant (C-Optim, Liang et al. 2024), as
            :class:`fastopt.AdEMAMix`'s option: per tensor, the update's entries whose sign
            disagrees with the gradient's are zeroed and the rest scaled by
            1 / max(mean agreement, 1e-3); one more pass (a count) before the step.
            Default False.
        {options}

    Returns:
        FusedTransformation: with state :class:`AdEMAMixState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    if not callable(b3):
        b3 = _real("b3", b3, lo=0.0, hi=1.0, hi_open=True)
    if not callable(alpha):
        alpha = _real("alpha", alpha, lo=0.0)
    eps = _real("eps", eps, lo=0.0)
    _eps_root(eps_root)
    _unsupported("mu_dtype", mu_dtype, None, "the state's dtype is state_dtype's")
    weight_decay = _weight_decay(weight_decay)

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        return _scalars.ademamix_scalars(
            dtype, step=step, lr=lr, beta1=b1, beta2=b2,
            beta3=b3(step - 1) if callable(b3) else b3,
            alpha=alpha(step - 1) if callable(alpha) else alpha, eps=eps,
            weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
            grad_clip=grad_clip)

    group = dict(eps=eps, weight_decay=weight_decay)  # schedules have no class key
    if not callable(b3):
        group["betas"] = (b1, b2, b3)
    if not callable(alpha):
        group["alpha"] = alpha
    return _make("ademamix", "ademamix", AdEMAMixState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, weight_decay=weight_decay),
                 ("AdEMAMix", group),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads), cautious,
                 decay_mask=mask)


@_low_precision_fields
class AdanState(NamedTuple):
    """The state of :func:`adan`: the step count (an int32 scalar) and, each a pytree shaped
    like the parameters, the averages of the gradient, of the squared Nesterov combination
    and of the gradient's change, and the negated previous gradient (the authors' and
    :class:`fastopt.Adan`'s names)."""
    count: Any
    exp_avg: Any
    exp_avg_sq: Any
    exp_avg_diff: Any
    neg_pre_grad: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def adan(learning_rate, b1=0.98, b2=0.92, b3=0.99, eps=1e-8, weight_decay=0.0, *, no_prox=False,
         mask=None, max_grad_norm=None, max_grad_value=None, maximize=False, skip_nonfinite=False,
         state_dtype=None, stochastic_rounding=None, master_weights=False, seed=None,
         n_threads=None):
    r"""Adan (Xie et al. 2022) as an optax transformation run by fastopt's fused kernel.

    Follows the authors' reference (``sail-sg/Adan``), as :class:`fastopt.Adan` does, with
    optax's argument names and defaults; not ``optax.adan`` 0.2.8, which weights the
    difference term by :math:`1 - \beta_2` where the reference uses :math:`\beta_2` and adds
    an ``eps_root`` (this factory has none). With gradient :math:`g_t` at step
    :math:`t = 1, 2, \ldots` (:math:`g_0 = g_1`) and learning rate :math:`\gamma_t` (the
    schedule's value at count :math:`t - 1`):

    .. math::

        d_t &= g_t - g_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        \delta_t &= \beta_2 \delta_{t-1} + (1 - \beta_2) d_t \\
        n_t &= \beta_3 n_{t-1} + (1 - \beta_3) (g_t + \beta_2 d_t)^2 \\
        u_t &= \frac{\gamma_t}{1 - \beta_1^t} \frac{m_t}{\eta_t}
            + \frac{\gamma_t \beta_2}{1 - \beta_2^t} \frac{\delta_t}{\eta_t}, \qquad
            \eta_t = \sqrt{n_t} / \sqrt{1 - \beta_3^t} + \epsilon \\
        p_{t+1} &= (p_t - u_t) / (1 + \gamma_t \lambda)
            \quad (\text{no\_prox: } p_t (1 - \gamma_t \lambda) - u_t)

    The step sizes and bias corrections are computed in the count's floating type (float32
    unless ``jax_enable_x64``), so the results differ from :class:`fastopt.Adan`'s (which
    computes them in float64 on the host) by rounding only.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step).
        b1 (float): :math:`\beta_1` in [0, 1). Default 0.98.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.92.
        b3 (float): :math:`\beta_3` in [0, 1). Default 0.99.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): decoupled :math:`\lambda \ge 0`, a number. Default 0.
        no_prox (bool): decay the parameter before the step instead of the proximal
            division after it. Default False.
        {mask}
        {options}

    Returns:
        FusedTransformation: with state :class:`AdanState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    b3 = _real("b3", b3, lo=0.0, hi=1.0, hi_open=True)
    eps = _real("eps", eps, lo=0.0)
    weight_decay = _weight_decay(weight_decay)
    no_prox = flag("no_prox", no_prox)

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        return _scalars.adan_scalars(dtype, step=step, lr=lr, beta1=b1, beta2=b2, beta3=b3,
                                     eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                                     maximize=maximize, grad_scale=grad_scale,
                                     grad_clip=grad_clip)

    return _make("adan", "adan", AdanState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, b3=b3, eps=eps, weight_decay=weight_decay,
                      no_prox=no_prox),
                 ("Adan", dict(betas=(b1, b2, b3), eps=eps, weight_decay=weight_decay,
                               no_prox=no_prox)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads), decay_mask=mask)


def _shard_total(value, param):
    """A tensor's sum from this shard's (`value`, summed by a kernel in its pass or by
    XLA): inside shard_map the whole tensor's, over the mesh axes along which the parameter
    varies (psum; a custom call's result carries no varying axes, so it is marked first)."""
    axes = _varying_axes(param)
    return jax.lax.psum(_varying_like(value, param), axes) if axes else value


def _tensor_sum(x, param):
    """The sum of `x`, an array shaped like `param`, in jax's default float type (float64
    with jax_enable_x64, else float32), the whole tensor's inside shard_map."""
    return _shard_total(jnp.sum(x.astype(jnp.result_type(float))), param)


def _tensor_norm(x, param):
    """The 2-norm of `x`, an array shaped like `param` (see _tensor_sum)."""
    return jnp.sqrt(_tensor_sum(jnp.square(x.astype(jnp.result_type(float))), param))


def _trust_ratios(params, squares):
    """optax.lamb's trust ratio ||p|| / ||u|| per tensor (1 where either is 0), in the
    parameters' dtype, of the norms rounded to it (fastopt._scalars.lamb_trust_ratios),
    from the update pass's sums of p p and u u (`squares`, a row per tensor). As the array
    API's, ||p|| is of the parameter as the step finds it (pruned entries are 0 after a
    step with masks; the update pass zeroes u's)."""
    dtype = params[0].dtype
    ratios = []
    for t, p in enumerate(params):
        pn, un = (jnp.sqrt(_shard_total(squares[t, k], p)).astype(dtype) for k in (0, 1))
        ratio = jnp.where((pn == 0) | (un == 0), 1, pn / jnp.where(un == 0, 1, un))
        ratios.append(ratio.astype(dtype).reshape(1))
    return ratios


@_options_doc
def lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=None, weight_decay=0.0,
         mask=None, *, max_grad_norm=None, max_grad_value=None, maximize=False,
         skip_nonfinite=False, n_threads=None):
    r"""Lamb (You et al. 2019) as an optax transformation run by fastopt's kernels:
    ``optax.lamb``'s rule, names and defaults, as :class:`fastopt.Lamb`. With gradient
    :math:`g_t` at step :math:`t` and learning rate :math:`\gamma` (a number, or the
    schedule's value at count :math:`t - 1`):
    {math}

    Two kernel calls: the update pass writes :math:`u_t` (and the moments) over the
    gradients (inside a jitted step, where they are dead after it, in their buffers;
    gradients the caller still holds are copied first) and sums each tensor's
    :math:`p^2` and :math:`u_t^2` as it goes (fixed-order float64 sums, as
    :class:`fastopt.Lamb`'s, rounded to float32 without ``jax_enable_x64``; under
    ``shard_map`` summed over the mesh), and the apply pass scales and adds. Parameters
    float32 or float64 (with ``jax_enable_x64``).

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule.
        b1 (float): :math:`\beta_1`. Default 0.9.
        b2 (float): :math:`\beta_2`. Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-6.
        eps_root (float or None): optax's, only 0 (None: 0, the default; not supported
            yet).
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        {mask}
        {float_options}

    Returns:
        FusedTransformation: with state :class:`AdamState` (optax's ``mu``, ``nu``).
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0)
    b2 = _real("b2", b2, lo=0.0, hi=1.0)
    eps = _real("eps", eps, lo=0.0)
    _eps_root(eps_root)
    weight_decay = _weight_decay(weight_decay)

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip, weight_decay=weight_decay):
        return _scalars.lamb_scalars(dtype, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps,
                                     weight_decay=weight_decay, maximize=maximize,
                                     grad_scale=grad_scale, grad_clip=grad_clip)

    return _make("lamb", "lamb_update", AdamState, scalars, learning_rate,
                 dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
                 ("Lamb", dict(betas=(b1, b2), eps=eps, weight_decay=weight_decay)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, None, None, False,
                  None, n_threads), scaled=_trust_ratios, decay_mask=mask)


class MuonState(NamedTuple):
    """The state of :func:`muon`: the step count (an int32 scalar); the momentum buffer of
    each matrix (2-D parameter) and AdamW's moments of every other parameter, pytrees
    shaped like the parameters with None where a parameter keeps no such array (the array
    API's names)."""
    count: Any
    momentum_buffer: Any
    exp_avg: Any
    exp_avg_sq: Any


def _bf16_rounded(x):
    """float32 `x` rounded to bfloat16 values (to nearest even), kept float32: what torch's
    bfloat16 Newton-Schulz stores (fastopt._backends._orthogonalize.round_bf16)."""
    return x.astype(jnp.bfloat16).astype(x.dtype)


def _newton_schulz(u, param, coefficients, steps, eps, ns_dtype):
    """Muon's orthogonalized update of matrix `u` (a momentum pass's result, shaped like
    `param`), as fastopt._backends._orthogonalize computes it on the host: in ns_dtype,
    transposed when it has more rows than columns, divided by its Frobenius norm (at least
    eps), then `steps` iterations of X <- a X + (b A + c A A) X with A = X X^T, each result
    rounded to bfloat16 for ns_dtype "bfloat16"; back in u's dtype. The products are XLA's
    GEMMs (summed in their own order, as the host's are NumPy's)."""
    bf16 = ns_dtype == "bfloat16"
    x = u if ns_dtype is None else u.astype(jnp.float32)
    stored = _bf16_rounded if bf16 else (lambda y: y)
    x = stored(x)
    a, b, c = (jnp.asarray(k, x.dtype) for k in coefficients)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = _tensor_norm(x, param).astype(x.dtype)
    x = stored(x / stored(jnp.maximum(norm, jnp.asarray(eps, x.dtype))))
    for _ in range(steps):
        gram = stored(x @ x.T)
        gram = stored(b * gram + c * (gram @ gram))
        x = stored(a * x + gram @ x)
    return (x.T if tall else x).astype(u.dtype)


def _optional_leaves(tree, name, state_cls, paths, leaves, treedef, shapes, why):
    """The leaves of state pytree `tree` (field `name` of a `state_cls`), checked: None
    where shapes[i] is None (`why(param)` says why, in the error), else an array of that
    shape and the parameter's dtype."""
    try:
        flat = treedef.flatten_up_to(tree)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected the tree structure of params with an array or "
                         f"None at each leaf ({state_cls} from init): {e}") from None
    out = []
    for path, param, leaf, shape in zip(paths, leaves, flat, shapes):
        if shape is None:
            if leaf is not None:
                raise ValueError(f"{name}{path}: expected None (params{path} {why(param)}), "
                                 f"got an array")
            out.append(None)
            continue
        leaf = _array(leaf, f"{name}{path}")
        if tuple(leaf.shape) != tuple(shape) or leaf.dtype != param.dtype:
            raise ValueError(f"{name}{path}: expected {param.dtype} of shape {tuple(shape)}, "
                             f"got {leaf.dtype} {leaf.shape}")
        out.append(leaf)
    return out


class _Muon(_Fused):
    """fastopt.jax.muon: the matrices through the momentum pass, Newton-Schulz (XLA's GEMMs)
    and scaled_apply; every other parameter through AdamW's kernel, in the same step."""

    def __init__(self, learning_rate, hyper, muon, adam, options):
        super().__init__("muon", "muon_momentum", MuonState, None, learning_rate, hyper,
                         ("Muon", {}), None, {}, None, {}, None, *options)
        self.muon = muon  # weight_decay, momentum, nesterov, ns_coefficients, ns_steps, ...
        self.adam = adam  # betas and eps of the AdamW leaves
        # fastopt.Muon's param-group hyperparameters but lr, for state_dict
        self.group_hyper = dict(muon, adam_betas=adam["betas"], adam_eps=adam["eps"])

    def init(self, params):
        _, (_, leaves, treedef), dtype = _params(params)
        self._check_dtype(dtype)
        matrix = [p.ndim == 2 for p in leaves]
        return MuonState(
            count=jnp.zeros([], jnp.int32),
            momentum_buffer=treedef.unflatten([jnp.zeros_like(p) if m else None
                                               for p, m in zip(leaves, matrix)]),
            exp_avg=treedef.unflatten([None if m else jnp.zeros_like(p)
                                       for p, m in zip(leaves, matrix)]),
            exp_avg_sq=treedef.unflatten([None if m else jnp.zeros_like(p)
                                          for p, m in zip(leaves, matrix)]))

    def _check_dtype(self, dtype):
        if dtype not in _FLOATS:
            raise TypeError(f"fastopt.jax.muon: not with {dtype} parameters yet (float32 or "
                            f"float64)")

    def _arrays(self, tree, name, paths, leaves, treedef, wanted):
        """The state arrays `name` in leaf order: an array of its parameter's shape and
        dtype where `wanted[i]`, None elsewhere (a matrix's or not)."""
        return _optional_leaves(tree, f"state.{name}", "MuonState", paths, leaves, treedef,
                                [p.shape if w else None for p, w in zip(leaves, wanted)],
                                lambda p: "is a matrix" if p.ndim == 2 else "is not a matrix")

    def _apply(self, params, grads, state, grads_name, delta, masks):
        _, (paths, leaves, treedef), dtype = _params(params)
        self._check_dtype(dtype)
        grads = _like(grads, grads_name, paths, leaves, treedef)
        masks = _mask_leaves(masks, paths, leaves, treedef)
        count = self._count(state)
        matrix = [p.ndim == 2 for p in leaves]
        for path, p, m in zip(paths, leaves, matrix):
            if m and _varying_axes(p):
                raise ValueError(f"fastopt.jax.muon: params{path} is sharded under shard_map; "
                                 f"the orthogonalization needs the whole matrix: step it under "
                                 f"plain jit (XLA gathers what it needs)")
        bufs = self._arrays(state.momentum_buffer, "momentum_buffer", paths, leaves, treedef,
                            matrix)
        others = [not m for m in matrix]
        exp_avg = self._arrays(state.exp_avg, "exp_avg", paths, leaves, treedef, others)
        exp_avg_sq = self._arrays(state.exp_avg_sq, "exp_avg_sq", paths, leaves, treedef,
                                  others)
        step = optax.safe_increment(count)
        if not leaves:
            return treedef, [], state._replace(count=step)
        lr, grad_scale, finite = self._step_inputs(step, grads, masks, dtype)
        grad = dict(grad_scale=grad_scale, maximize=self.maximize, grad_clip=self.grad_clip)
        hyper = self.muon
        update, apply = _scalars.muon_scalars(dtype, lr=lr, weight_decay=hyper["weight_decay"],
                                              momentum=hyper["momentum"],
                                              nesterov=hyper["nesterov"], **grad)
        beta1, beta2 = self.adam["betas"]
        adam = _scalars.adam_scalars(dtype, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                     eps=self.adam["eps"], weight_decay=hyper["weight_decay"],
                                     decoupled=True, **grad)
        records = (_record(_rules.KERNELS["muon_momentum"].args, dtype, update),
                   _record(_rules.ALL_KERNELS["scaled_apply"].args, dtype, apply),
                   _record(_rules.KERNELS["adam"].args, dtype, adam))
        mats = [i for i, m in enumerate(matrix) if m]
        rest = [i for i, m in enumerate(matrix) if not m]
        factors = [jnp.asarray([-lr * _scalars.muon_lr_ratio(leaves[i].shape,
                                                             hyper["adjust_lr_fn"])], dtype)
                   for i in mats]

        def pick(xs, idx):
            return None if xs is None else [xs[i] for i in idx]

        def run(records, params, grads, bufs, exp_avg, exp_avg_sq, factors):
            new, bufs, exp_avg, exp_avg_sq = list(params), list(bufs), list(exp_avg), \
                list(exp_avg_sq)
            if mats:
                us, states = _jax_ffi.elementwise(
                    "muon_momentum", records[0], pick(params, mats), pick(grads, mats),
                    [[bufs[i]] for i in mats], self.n_threads, masks=pick(masks, mats),
                    into_grad=True, guard=finite)
                orthogonal = [_newton_schulz(u, params[i], hyper["ns_coefficients"],
                                             hyper["ns_steps"], hyper["eps"],
                                             hyper["ns_dtype"]) for u, i in zip(us, mats)]
                out, _ = _jax_ffi.elementwise(
                    "scaled_apply", records[1], pick(params, mats), orthogonal,
                    [[k] for k in factors], self.n_threads, delta=delta,
                    masks=pick(masks, mats), guard=finite)
                for k, i in enumerate(mats):
                    new[i], bufs[i] = out[k], states[k][0]
            if rest:
                out, states = _jax_ffi.elementwise(
                    "adam", records[2], pick(params, rest), pick(grads, rest),
                    [[exp_avg[i], exp_avg_sq[i]] for i in rest], self.n_threads,
                    delta=delta, masks=pick(masks, rest), guard=finite)
                for k, i in enumerate(rest):
                    new[i], (exp_avg[i], exp_avg_sq[i]) = out[k], states[k]
            # under shard_map a kernel's results carry no varying axes: its parameters' then
            return (_varying_lists(new, params), _varying_lists(bufs, params),
                    _varying_lists(exp_avg, params), _varying_lists(exp_avg_sq, params))

        new, bufs, exp_avg, exp_avg_sq = run(records, leaves, grads, bufs, exp_avg, exp_avg_sq,
                                             factors)
        if self.skip_nonfinite:
            step = jnp.where(finite, step, count)
        return treedef, new, MuonState(count=step, momentum_buffer=treedef.unflatten(bufs),
                                       exp_avg=treedef.unflatten(exp_avg),
                                       exp_avg_sq=treedef.unflatten(exp_avg_sq))

    def state_dict(self, state, params=None):
        """The array API's fastopt.Muon state dict: the matrices in a first param group
        (use_muon True), the other parameters in a second (use_muon False), each in leaf
        order, numbered group after group."""
        if not isinstance(state, MuonState):
            raise TypeError(f"state: expected the MuonState that fastopt.jax.muon's init "
                            f"returns, got {type(state).__name__}")
        flat = [jax.tree.leaves(x) for x in (state.momentum_buffer, state.exp_avg)]
        count = int(state.count)
        entries = {}
        for i, b in enumerate(flat[0]):
            entries[i] = {"momentum_buffer": np.asarray(b)}
        m, v = flat[1], jax.tree.leaves(state.exp_avg_sq)
        for k, (a, s) in enumerate(zip(m, v)):
            entries[len(flat[0]) + k] = {"exp_avg": np.asarray(a), "exp_avg_sq": np.asarray(s)}
        if count:
            for entry in entries.values():
                entry["step"] = count
        else:
            entries = {}
        group = dict(self.group_hyper)
        if not callable(self.learning_rate):
            group = dict(lr=self.learning_rate, **group)
        groups = [dict(group, use_muon=True, params=list(range(len(flat[0])))),
                  dict(group, use_muon=False, params=list(range(len(flat[0]),
                                                                len(flat[0]) + len(m))))]
        return {"state": entries, "param_groups": [g for g in groups if g["params"]]}

    def load_state_dict(self, state_dict, params):
        _, (paths, leaves, treedef), dtype = _params(params)
        self._check_dtype(dtype)
        saved, count = _saved_entries(state_dict, len(leaves))
        mats = [i for i, p in enumerate(leaves) if p.ndim == 2]
        order = mats + [i for i, p in enumerate(leaves) if p.ndim != 2]  # flat -> leaf
        fresh = self.init(params)
        arrays = {name: treedef.flatten_up_to(getattr(fresh, name))
                  for name in ("momentum_buffer", "exp_avg", "exp_avg_sq")}
        for flat, i in enumerate(order):
            entry = saved.get(flat, {})
            for name in arrays:
                if arrays[name][i] is None or not isinstance(entry, dict) or name not in entry:
                    continue
                value = jnp.asarray(np.asarray(entry[name]))
                if value.shape != leaves[i].shape or value.dtype != dtype:
                    raise ValueError(f"state_dict['state'][{flat}][{name!r}]: expected "
                                     f"{dtype} of the shape of params{paths[i]}, "
                                     f"{leaves[i].shape}, got {value.dtype} {value.shape}")
                arrays[name][i] = value
        return MuonState(count=jnp.asarray(count, jnp.int32),
                         **{name: treedef.unflatten(xs) for name, xs in arrays.items()})


@_options_doc
def muon(learning_rate, ns_coeffs=(3.4445, -4.7750, 2.0315), ns_steps=5, beta=0.95, eps=1e-7,
         weight_decay=0.1, *, nesterov=True, adjust_lr_fn=None, ns_dtype=None, adam_b1=0.9,
         adam_b2=0.999, adam_eps=1e-8, max_grad_norm=None, max_grad_value=None,
         maximize=False, skip_nonfinite=False, n_threads=None):
    r"""Muon (Jordan et al. 2024) as an optax transformation run by fastopt's kernels,
    following ``torch.optim.Muon`` (torch 2.13) as :class:`fastopt.Muon` does, with
    optax.contrib's argument names; every parameter that is not a matrix is updated by
    AdamW, as optax's convention (and fastopt.Muon's ``use_muon=False`` groups). With
    gradient :math:`g_t` of an :math:`A \times B` matrix and learning rate :math:`\gamma_t`
    (a number, or the schedule's value at count :math:`t - 1`):

    .. math::

        B_t &= \mathrm{lerp}(B_{t-1}, g_t, 1 - \mu) \\
        U_t &= \mathrm{lerp}(g_t, B_t, \mu) \text{ (nesterov) or } B_t \\
        O_t &= \mathrm{NS}_k^{(a,b,c)}\big(U_t / \max(\lVert U_t \rVert_F, \epsilon)\big) \\
        p_t &= p_{t-1} (1 - \gamma_t \lambda) - \gamma_t\, r(A, B)\, O_t

    (:class:`fastopt.Muon` gives :math:`\mathrm{NS}` and :math:`r`). The momentum pass
    and the apply pass are fastopt's kernels (the momentum pass writes :math:`U_t` over the
    gradients); the Newton-Schulz iteration is XLA's GEMMs, summed in their own order, so
    the orthogonalized update agrees with the array API's (NumPy's BLAS) to rounding. The
    other parameters take AdamW's kernel with ``adam_b1``, ``adam_b2``, ``adam_eps`` and
    the same learning rate and weight decay. Parameters float32 or float64 (with
    ``jax_enable_x64``); under ``shard_map`` the matrices must not be sharded (the
    iteration needs whole matrices).

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule.
        ns_coeffs (tuple): :math:`(a, b, c)`. Default (3.4445, -4.7750, 2.0315).
        ns_steps (int): :math:`k`, in [0, 100). Default 5.
        beta (float): the momentum :math:`\mu` in [0, 1]. Default 0.95.
        eps (float): :math:`\epsilon \ge 0`, the least norm divided by. Default 1e-7.
        weight_decay (float): decoupled :math:`\lambda \ge 0`. Default 0.1.
        nesterov (bool): the Nesterov form of the update. Default True.
        adjust_lr_fn (str or None): :math:`r`: None or "original", or "match_rms_adamw".
        ns_dtype (str or None): the iteration's dtype: None (the parameters'), "float32"
            or "bfloat16" (as torch: every result rounded to bfloat16).
        adam_b1, adam_b2, adam_eps (float): AdamW's :math:`\beta_1, \beta_2, \epsilon`
            for the parameters that are not matrices. Defaults 0.9, 0.999, 1e-8.
        {float_options}

    Returns:
        FusedTransformation: with state :class:`MuonState`.
    """
    from fastopt.optim.muon import ADJUST_LR_FNS, NS_DTYPES

    learning_rate = _learning_rate(learning_rate)
    if not isinstance(ns_coeffs, (tuple, list)) or len(ns_coeffs) != 3:
        raise ValueError(f"ns_coeffs: expected a triple (a, b, c), got {ns_coeffs!r:.60}")
    ns_coeffs = tuple(real(f"ns_coeffs[{k}]", c) for k, c in enumerate(ns_coeffs))
    if isinstance(ns_steps, jax.Array):
        raise TypeError("ns_steps: expected a Python int, got a jax array (optax."
                        "inject_hyperparams injects numeric arguments: pass "
                        "static_args=('ns_steps',))")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, (int, np.integer)) \
            or not 0 <= ns_steps < 100:
        raise ValueError(f"ns_steps: expected an integer in [0, 100), got {ns_steps!r:.60}")
    beta = _real("beta", beta, lo=0.0, hi=1.0)
    eps = _real("eps", eps, lo=0.0)
    weight_decay = _weight_decay(weight_decay)
    nesterov = flag("nesterov", nesterov)
    for name, value, choices in (("adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS),
                                 ("ns_dtype", ns_dtype, NS_DTYPES)):
        if value not in choices:
            raise ValueError(f"{name}: expected one of {choices}, got {value!r:.60}")
    adam_b1 = _real("adam_b1", adam_b1, lo=0.0, hi=1.0, hi_open=True)
    adam_b2 = _real("adam_b2", adam_b2, lo=0.0, hi=1.0, hi_open=True)
    adam_eps = _real("adam_eps", adam_eps, lo=0.0)
    muon_hyper = dict(weight_decay=weight_decay, momentum=beta, nesterov=nesterov,
                      ns_coefficients=ns_coeffs, ns_steps=int(ns_steps), eps=eps,
                      adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
    fused = _Muon(learning_rate,
                  dict(ns_coeffs=ns_coeffs, ns_steps=int(ns_steps), beta=beta, eps=eps,
                       weight_decay=weight_decay, nesterov=nesterov,
                       adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, adam_b1=adam_b1,
                       adam_b2=adam_b2, adam_eps=adam_eps),
                  muon_hyper, dict(betas=(adam_b1, adam_b2), eps=adam_eps),
                  _options(max_grad_norm, max_grad_value, maximize, skip_nonfinite, None, None,
                           False, None, n_threads))
    return fused.transformation()


class ProdigyState(NamedTuple):
    r"""The state of :func:`prodigy`: the step count (an int32 scalar); the estimate
    :math:`d`, its largest value, the numerator of its estimate and the last estimate
    :math:`\hat d` and denominator (the reference's ``d``, ``d_max``, ``d_numerator``,
    ``d_hat``, ``d_denom``), 0-d arrays of jax's default float type (float64 with
    ``jax_enable_x64``, as the reference's Python floats); and ``s``, ``p0`` (a copy of
    the parameters made by ``init``), ``exp_avg`` (None with ``b1=0``) and
    ``exp_avg_sq``, pytrees shaped like the parameters (the array API's names)."""
    count: Any
    d: Any
    d_max: Any
    d_numerator: Any
    d_hat: Any
    d_denom: Any
    s: Any
    p0: Any
    exp_avg: Any
    exp_avg_sq: Any


_ESTIMATE = ("d", "d_max", "d_numerator", "d_hat", "d_denom")


class _Prodigy(_Fused):
    """fastopt.jax.prodigy: the update pass, the sums over every tensor (and the mesh), the
    new estimate, then the apply pass, inside one jitted step."""

    def __init__(self, learning_rate, hyper, rule, options):
        # without a first moment (b1 = 0): the kernels that keep none
        self.variant = "_nom" if rule["first_moment"] is False else ""
        super().__init__("prodigy", "prodigy_update" + self.variant, ProdigyState, None,
                         learning_rate, hyper,
                         ("Prodigy", dict(betas=(rule["beta1"], rule["beta2"]),
                                          **{k: rule[k] for k in _PRODIGY_GROUP})),
                         None, dict(p0=_PARAMS), None,
                         dict(d=rule["d0"], d_max=rule["d0"], d_numerator=0.0, d_hat=0.0,
                              d_denom=0.0), None, *options)
        self.rule = rule

    def _apply(self, params, grads, state, grads_name, delta, masks):
        _, (paths, leaves, treedef), dtype = _params(params)
        if dtype not in _FLOATS:
            raise TypeError(f"fastopt.jax.prodigy: not with {dtype} parameters yet (float32 "
                            f"or float64)")
        if self.rule["first_moment"] is None and isinstance(state, ProdigyState):
            self.variant = "" if state.exp_avg is not None else "_nom"  # a traced b1
            self.kernel = _rules.KERNELS["prodigy_update" + self.variant]
        grads = _like(grads, grads_name, paths, leaves, treedef)
        masks = _mask_leaves(masks, paths, leaves, treedef)
        count, states = self._state(state, paths, leaves, treedef, dtype)
        step = optax.safe_increment(count)
        if not leaves:
            return treedef, [], state._replace(count=step)
        lr, grad_scale, finite = self._step_inputs(step, grads, masks, dtype)
        r = self.rule
        beta1, beta2, beta3 = r["beta1"], r["beta2"], r["beta3"]
        wide = state.d.dtype
        d, d_max = state.d, state.d_max
        done = count.astype(wide)
        bias_correction = (_one_minus_power(beta2, done + 1) ** 0.5
                           / _one_minus_power(beta1, done + 1)
                           if r["use_bias_correction"] else 1.0)
        lr = jnp.asarray(lr, wide)
        dlr = d * lr * bias_correction
        common = dict(d=d, dlr=dlr, beta1=beta1, beta2=beta2, beta3=beta3, eps=r["eps"],
                      weight_decay=r["weight_decay"], decouple=r["decouple"], d0=r["d0"],
                      safeguard_warmup=r["safeguard_warmup"], maximize=self.maximize,
                      grad_scale=grad_scale, grad_clip=self.grad_clip)
        update, _ = _scalars.prodigy_scalars(dtype, d_next=d, **common)
        record = _record(self.kernel.args, dtype, update)
        apply_name = "prodigy_apply" + self.variant
        apply_args = _rules.KERNELS[apply_name].args

        def run(record, params, grads, states):
            # the terms of the dot product (the kernel's "new parameter") and |s| summed in
            # the pass, while in cache, the terms never stored (as the array API's); a step
            # skip_nonfinite skips (the guard) sums 0, so it does not move either
            _, states, sums = _jax_ffi.elementwise(
                self.kernel.name, record, params, grads, states, self.n_threads, masks=masks,
                sums=((1, 3), (3, 1)), discard=True, guard=finite)
            states = _varying_states(states, params)
            dots = sum(_shard_total(sums[t, 0], p) for t, p in enumerate(params))
            denominator = sum(_shard_total(sums[t, 1], p) for t, p in enumerate(params))
            numerator = state.d_numerator * beta3 + (d / r["d0"]) * dlr * dots
            d_hat = jnp.where(lr > 0, r["d_coef"] * numerator
                              / jnp.where(denominator == 0, 1, denominator), d)
            d_next = jnp.where((lr > 0) & (d == r["d0"]), jnp.maximum(d, d_hat), d)
            new_max = jnp.where(lr > 0, jnp.maximum(d_max, d_hat), d_max)
            d_next = jnp.where(lr > 0, jnp.minimum(new_max, d_next * r["growth_rate"]), d_next)
            # s all 0 (no progress): the reference changes no parameter, nor the estimate,
            # nor its step count; the state arrays keep their update. The apply pass then
            # runs with moves 0, which returns each parameter as it is (with delta an update
            # of +0 for a finite parameter): a lax.cond around the pass would copy its
            # result, which aliases the gradients with delta (a fresh buffer per step). With
            # pruning masks the pass zeroes the pruned entries whatever moves says, so a
            # cond keeps them then. The apply pass without a first moment reads the
            # gradients; with one it does not
            moved = denominator != 0
            _, fields = _scalars.prodigy_scalars(dtype, d_next=d_next, **common,
                                                 moves=moved.astype(jnp.int32))

            def apply(record, params, grads, moments):
                new, moments = _jax_ffi.elementwise(apply_name, record, params, grads,
                                                    moments, self.n_threads, delta=delta,
                                                    masks=masks, guard=finite)
                # under shard_map a kernel's results carry no varying axes; keep's do
                return _varying_lists(new, params), _varying_states(moments, params)

            def keep(record, params, grads, moments):
                return [jnp.zeros_like(p) for p in params] if delta else params, moments
            operands = (_record(apply_args, dtype, fields), params, grads,
                        [list(s[2:]) for s in states])
            new, moments = (apply(*operands) if masks is None
                            else jax.lax.cond(moved, apply, keep, *operands))
            states = [s[:2] + list(m) for s, m in zip(states, moments)]
            estimate = dict(d=d_next, d_max=new_max, d_numerator=numerator, d_hat=d_hat,
                            d_denom=denominator)
            estimate = {k: jnp.where(moved, v, getattr(state, k)).astype(wide)
                        for k, v in estimate.items()}
            return new, states, estimate, moved

        new, new_states, estimate, moved = run(record, leaves, grads,
                                               [list(s) for s in zip(*states)])
        return treedef, new, ProdigyState(
            count=jnp.where(moved, step, count), **estimate,
            **{name: treedef.unflatten([s[k] for s in new_states])
               for k, name in enumerate(self.kernel.state)}, **self._absent())

    def state_dict(self, state, params=None):
        """The array API's fastopt.Prodigy state dict: the estimate and the step count in
        its param group, as the reference keeps them."""
        saved = super().state_dict(state, params)
        saved["param_groups"][0].update({k: float(getattr(state, k)) for k in _ESTIMATE},
                                        k=int(state.count))
        return saved

    def load_state_dict(self, state_dict, params):
        loaded = super().load_state_dict(state_dict, params)
        groups = state_dict.get("param_groups") or [{}]
        group = groups[0] if isinstance(groups[0], dict) else {}
        return loaded._replace(**{k: jnp.asarray(float(group[k]), loaded.d.dtype)
                                  for k in _ESTIMATE if k in group})


def _one_minus_power(beta, k):
    """1 - beta**k for a count k (an array of jax's default float type), as the reference
    computes it in float64. In float32 (without jax_enable_x64) as -expm1(k log beta):
    1 - beta**k itself cancels (1 - 0.999**k loses about 1/(1 - 0.999**k) ulps, 1000 at
    k = 1), which moved Prodigy's d by 240 ulps over 200 steps with bias correction."""
    if k.dtype == np.float64:
        return 1 - beta ** k
    if isinstance(beta, jax.core.Tracer):  # optax.inject_hyperparams; log(0) = -inf works
        return -jnp.expm1(k * jnp.log(beta))
    return -jnp.expm1(k * math.log(beta)) if 0 < beta < 1 else 1 - beta ** k


# the array API's Prodigy group keys that fastopt.jax.prodigy's arguments give
_PRODIGY_GROUP = ("beta3", "eps", "weight_decay", "decouple", "use_bias_correction",
                  "safeguard_warmup", "d0", "d_coef", "growth_rate")


def _varying_lists(xs, params):
    """_varying_like over lists of arrays (None stays None)."""
    return [x if x is None else _varying_like(x, p) for x, p in zip(xs, params)]


def _varying_states(states, params):
    """_varying_like over each tensor's list of state arrays."""
    return [_varying_lists(ss, [p] * len(ss)) for ss, p in zip(states, params)]


def _varying_like(x, param):
    """`x`, a kernel's result shaped like `param`, marked as varying along the shard_map
    mesh axes the parameter varies along (XLA's custom call does not mark its results)."""
    axes = tuple(a for a in _varying_axes(param) if a not in _varying_axes(x))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


@_options_doc
def prodigy(learning_rate=1.0, b1=0.9, b2=0.999, beta3=None, eps=1e-8, weight_decay=0.0,
            *, decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6,
            d_coef=1.0, growth_rate=math.inf, max_grad_norm=None, max_grad_value=None,
            maximize=False, skip_nonfinite=False, n_threads=None):
    r"""Prodigy (Mishchenko & Defazio 2023) as an optax transformation run by fastopt's
    kernels: the authors' reference (``prodigyopt``) as :class:`fastopt.Prodigy` follows
    it (its docstring gives the update), with optax.contrib's argument names for the
    betas (optax.contrib.prodigy itself differs from the reference). One jitted step: the
    update pass, which sums its dot-product terms and :math:`|s|` per tensor as it goes
    (fixed-order float64 sums, as :class:`fastopt.Prodigy`'s, rounded to float32 without
    ``jax_enable_x64``; under ``shard_map`` summed over the mesh) and stores no terms, the
    new estimate :math:`d`, the apply pass. A step whose gradients are all 0 changes no
    parameter, nor :math:`d`, nor the count, as the reference. Parameters float32 or
    float64 (with ``jax_enable_x64``). With ``b1=0`` no first moment is kept (the state's
    ``exp_avg`` is None) and the step is the gradient over the second moment's root, as the
    reference's. Under ``optax.inject_hyperparams``, whose ``init`` inside ``jax.jit`` sees
    ``b1`` traced, a first moment is kept unless ``b1`` is static
    (``static_args=('b1',)``) or ``init`` runs outside jit.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a multiplier of the estimate, a number or an
            optax schedule. Default 1.
        b1, b2 (float): :math:`\beta_1` in [0, 1), :math:`\beta_2` in [0, 1). Defaults 0.9,
            0.999.
        beta3 (float or None): :math:`\beta_3` in [0, 1); None for :math:`\sqrt{\beta_2}`.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        decouple (bool): AdamW's decoupled decay (else added to the gradient). Default True.
        use_bias_correction (bool): Adam's bias correction in the step. Default False.
        safeguard_warmup (bool): leave the learning rate out of :math:`s`. Default False.
        d0 (float): the initial estimate, > 0. Default 1e-6.
        d_coef (float): > 0. Default 1.
        growth_rate (float): the largest factor :math:`d` grows by per step, > 0. Default
            inf.
        {float_options}

    Returns:
        FusedTransformation: with state :class:`ProdigyState`.
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, hi_open=True)
    # whether a first moment is kept; with a traced b1 (optax.inject_hyperparams), where
    # the state has one (init keeps one for a traced b1: inside jit its value is unknown)
    first_moment = None if isinstance(b1, jax.core.Tracer) else b1 > 0
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    if beta3 is None:
        beta3 = jnp.sqrt(b2) if isinstance(b2, jax.core.Tracer) else math.sqrt(b2)
    else:
        beta3 = _real("beta3", beta3, lo=0.0, hi=1.0, hi_open=True)
    rule = dict(beta1=b1, beta2=b2, beta3=beta3, first_moment=first_moment,
                eps=_real("eps", eps, lo=0.0),
                weight_decay=_weight_decay(weight_decay), decouple=flag("decouple", decouple),
                use_bias_correction=flag("use_bias_correction", use_bias_correction),
                safeguard_warmup=flag("safeguard_warmup", safeguard_warmup),
                d0=_real("d0", d0, lo=0.0, lo_open=True),
                d_coef=_real("d_coef", d_coef, lo=0.0, lo_open=True),
                growth_rate=(math.inf if not isinstance(growth_rate, jax.core.Tracer)
                             and growth_rate == math.inf else
                             _real("growth_rate", growth_rate, lo=0.0, lo_open=True)))
    hyper = dict(b1=b1, b2=b2, **{k: rule[k] for k in _PRODIGY_GROUP})
    return _Prodigy(learning_rate, hyper, rule,
                    _options(max_grad_norm, max_grad_value, maximize, skip_nonfinite, None,
                             None, False, None, n_threads)).transformation()


@_low_precision_fields
class AdafactorState(NamedTuple):
    """The state of :func:`adafactor`: the step count (an int32 scalar); optax's
    second-moment statistics, ``v_row`` and ``v_col`` for a factored parameter (each shaped
    as optax's: the parameter's shape without its largest, resp. its second largest,
    factored dimension) and ``v`` for the others (the parameter's shape), None where a
    parameter keeps none of that kind; and ``momentum`` (shaped like the parameters; None
    without ``momentum``)."""
    count: Any
    v_row: Any
    v_col: Any
    v: Any
    momentum: Any


def _factored_dims(shape, factored, min_dim_size_to_factor):
    """optax's choice: the parameter's second largest and largest dimensions (d1, d0), or
    None (not factored)."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


class _Layout(NamedTuple):
    """A parameter as the factored handler sees it: `dims` optax's (d1, d0) or None;
    `perm` the transpose that puts the two factored dimensions last in their order (None:
    none needed); (B, R, C, mode) the handler's info."""
    dims: Any
    perm: Any
    info: tuple


def _layout(shape, factored, min_dim):
    dims = _factored_dims(shape, factored, min_dim)
    size = int(np.prod(shape, dtype=np.int64))
    if dims is None:
        return _Layout(None, None, (1, 1, size, 0))
    d1, d0 = dims
    lo, hi = min(dims), max(dims)
    perm = [k for k in range(len(shape)) if k not in dims] + [lo, hi]
    b = size // (shape[lo] * shape[hi]) if shape[lo] * shape[hi] else 0
    return _Layout(dims, None if perm == list(range(len(shape))) else tuple(perm),
                   (b, shape[lo], shape[hi], 1 if d1 == lo else 2))


def _statistics(v, skipped, keep, to_handler):
    """A factored parameter's optax statistics `v` (shaped as the parameter without its
    dimension `skipped`; `keep` the other factored one) with that dimension last, as the
    handler reads them (B L elements, in any shape: the handler counts elements, and a
    reshape of a donated array would be a copy); or back (`to_handler` False)."""
    axis = keep if keep < skipped else keep - 1
    if axis == v.ndim - 1:
        return v
    return jnp.moveaxis(v, axis, -1) if to_handler else jnp.moveaxis(v, -1, axis)


def _state_shapes(leaves, layouts):
    """The shapes of optax's v_row, v_col and v per parameter (None where it keeps none):
    a factored parameter's shape without its largest, resp. second largest, factored
    dimension; the others' own shape."""
    def without(p, lay, k):
        return None if lay.dims is None else tuple(n for j, n in enumerate(p.shape)
                                                   if j != lay.dims[k])
    return ([without(p, lay, 1) for p, lay in zip(leaves, layouts)],
            [without(p, lay, 0) for p, lay in zip(leaves, layouts)],
            [p.shape if lay.dims is None else None for p, lay in zip(leaves, layouts)])


class _Adafactor(_Fused):
    """fastopt.jax.adafactor: optax's update in three calls of the factored handler
    (kernels/cpu/xla_factored.h) with XLA's small reductions between them."""

    def __init__(self, learning_rate, rule, options):
        hyper = {k: v for k, v in rule.items() if k not in ("decay_mask", "learning_rate_given")}
        if rule["decay_mask"] is not None:
            hyper["weight_decay_mask"] = rule["decay_mask"]
        super().__init__("adafactor", "adafactor_vector", AdafactorState, None, learning_rate,
                         hyper, None, None, {}, None, {}, None, *options,
                         decay_mask=rule["decay_mask"], mask_name="weight_decay_mask")
        if not rule["learning_rate_given"]:  # the repr's; the step multiplies by none
            self.hyper["learning_rate"] = None
        self.rule = rule

    def _layouts(self, leaves):
        r = self.rule
        return [_layout(p.shape, r["factored"], r["min_dim_size_to_factor"]) for p in leaves]

    def _check(self, dtype, leaves, masks=None):
        if dtype not in _FLOATS:
            raise TypeError(f"fastopt.jax.adafactor: not with {dtype} parameters yet (float32 "
                            f"or float64)")
        wanted = self.rule["dtype_momentum"]
        if self.rule["momentum"] is not None and wanted is not None and wanted != dtype:
            raise TypeError(f"dtype_momentum: fastopt.jax.adafactor keeps the momentum in the "
                            f"parameters' dtype, {dtype}; pass dtype_momentum={dtype.name!r}")
        if masks is not None and any(m is not None for m in masks):
            raise ValueError("masks: fastopt.jax.adafactor takes no pruning masks yet")
        for p in leaves:
            if _varying_axes(p):
                raise ValueError("fastopt.jax.adafactor: a parameter is sharded under "
                                 "shard_map; its factored statistics need the whole tensor: "
                                 "step it under plain jit (XLA gathers what it needs)")

    def init(self, params):
        _, (_, leaves, treedef), dtype = _params(params)
        self._check(dtype, leaves)
        self._decayed(params)
        shapes = _state_shapes(leaves, self._layouts(leaves))
        rows, cols, vs = ([None if shape is None else jnp.zeros(shape, dtype) for shape in kind]
                          for kind in shapes)
        momentum = None
        if self.rule["momentum"] is not None:
            momentum = treedef.unflatten([jnp.zeros_like(p) for p in leaves])
        return AdafactorState(jnp.zeros([], jnp.int32), treedef.unflatten(rows),
                              treedef.unflatten(cols), treedef.unflatten(vs), momentum)

    def _leaf_state(self, state, paths, leaves, treedef, layouts):
        """(v_row, v_col, v, momentum) leaves of `state`, checked against the parameters."""
        def arrays(tree, name, shapes):
            return _optional_leaves(tree, f"state.{name}", "AdafactorState", paths, leaves,
                                    treedef, shapes, lambda p: f"keeps no {name}")

        row_shapes, col_shapes, v_shapes = _state_shapes(leaves, layouts)
        rows = arrays(state.v_row, "v_row", row_shapes)
        cols = arrays(state.v_col, "v_col", col_shapes)
        vs = arrays(state.v, "v", v_shapes)
        momentum = None
        if self.rule["momentum"] is not None:
            momentum = arrays(state.momentum, "momentum", [p.shape for p in leaves])
        elif state.momentum is not None:
            raise ValueError("state.momentum: expected None (no momentum)")
        return rows, cols, vs, momentum

    def _apply(self, params, grads, state, grads_name, delta, masks):
        _, (paths, leaves, treedef), dtype = _params(params)
        grads = _like(grads, grads_name, paths, leaves, treedef)
        masks = _mask_leaves(masks, paths, leaves, treedef)
        self._check(dtype, leaves, masks)
        count = self._count(state)
        layouts = self._layouts(leaves)
        rows, cols, vs, momentum = self._leaf_state(state, paths, leaves, treedef, layouts)
        step = optax.safe_increment(count)
        if not leaves:
            return treedef, [], state._replace(count=step)
        r = self.rule
        lr, grad_scale, finite = self._step_inputs(step, grads, masks, dtype)
        gscale = -grad_scale if self.maximize else grad_scale
        # optax's decay_rate_t, in float32 as optax computes it
        t = jnp.asarray(count - r["decay_offset"] + 1, jnp.float32)
        decay = 1.0 - t ** (-r["decay_rate"])  # float32 unless injected as a float64 array
        scalars = jnp.stack([jnp.asarray(x, dtype) for x in (
            self.grad_clip, gscale, decay, 1.0 - decay, r["eps"])])
        decayed = self._decayed(params)
        infos = [jnp.asarray(lay.info, jnp.int32) for lay in layouts]

        def moved(x, lay):  # the parameter's layout as the handler reads it
            return x if lay.perm is None else jnp.transpose(x, lay.perm)

        def moved_back(x, lay):
            return x if lay.perm is None else jnp.transpose(x, np.argsort(lay.perm))

        # the handler takes the non-empty parameters; an empty one keeps its state, but
        # for optax's statistics over its factored dimensions (NaN means over none)
        live = [i for i, p in enumerate(leaves) if p.size]

        def kept(new, old):  # what a step makes outside the handler, kept by a skipped one
            return new if finite is None else jnp.where(finite, new, old)

        def run(params, grads, rows, cols, vs, momentum):
            rows, cols, vs = list(rows), list(cols), list(vs)
            for i, (p, g, lay) in enumerate(zip(params, grads, layouts)):
                if not p.size and lay.dims is not None:
                    sq = g * g + r["eps"]
                    rows[i] = kept(decay * rows[i] + (1.0 - decay)
                                   * jnp.mean(sq, axis=lay.dims[1]), rows[i])
                    cols[i] = kept(decay * cols[i] + (1.0 - decay)
                                   * jnp.mean(sq, axis=lay.dims[0]), cols[i])
            lays = [layouts[i] for i in live]
            ps = [moved(params[i], layouts[i]) for i in live]
            gs = [moved(grads[i], layouts[i]) for i in live]
            info = [infos[i] for i in live]
            firsts, seconds = [], []
            for i, lay in zip(live, lays):
                if lay.dims is None:
                    firsts.append(vs[i])
                    seconds.append(jnp.zeros(0, dtype))
                else:
                    d1, d0 = lay.dims
                    firsts.append(_statistics(rows[i], d0, d1, True))
                    seconds.append(_statistics(cols[i], d1, d0, True))
            fac = [k for k, lay in enumerate(lays) if lay.dims is not None]
            if fac:
                new_a, new_b = _jax_ffi.factored(
                    0, scalars, None, [gs[k] for k in fac], [firsts[k] for k in fac],
                    [seconds[k] for k in fac], [info[k] for k in fac], self.n_threads,
                    guard=finite)
                for j, k in enumerate(fac):
                    firsts[k], seconds[k] = new_a[j], new_b[j]
            # optax's factors of the new statistics (a the row factor, b the column one)
            a_ops, b_ops = list(firsts), list(seconds)
            for k in fac:
                row = firsts[k].reshape(lays[k].info[0], -1)
                a_ops[k] = (row / jnp.mean(row, axis=1, keepdims=True)) ** -0.5
                b_ops[k] = seconds[k] ** -0.5
            new_v, means = _jax_ffi.factored(1, scalars, ps, gs, a_ops, b_ops, info,
                                             self.n_threads, guard=finite)
            for k, lay in enumerate(lays):
                if lay.dims is None:
                    a_ops[k] = firsts[k] = new_v[k]
            ones = jnp.ones(len(live), dtype)
            clip = ones if r["clipping_threshold"] is None else jnp.maximum(
                1.0, jnp.sqrt(means[:, 0]) / jnp.asarray(r["clipping_threshold"], dtype))
            rate = ones if r["learning_rate_given"] is False else jnp.broadcast_to(
                jnp.asarray(lr, dtype), (len(live),))
            scale = ones if not r["multiply_by_parameter_scale"] else jnp.maximum(
                jnp.sqrt(means[:, 1]), jnp.asarray(1e-3, dtype))
            wd = 0.0 if r["weight_decay_rate"] is None else r["weight_decay_rate"]
            decays = jnp.asarray([wd if decayed[i] else 0.0 for i in live], dtype)
            mu = 0.0 if r["momentum"] is None else r["momentum"]
            coefs = jnp.stack([clip, rate, scale, decays,
                               jnp.broadcast_to(jnp.asarray(1 - mu, dtype), clip.shape),
                               jnp.broadcast_to(jnp.asarray(mu, dtype), clip.shape)], axis=1)
            new_p, new_m = _jax_ffi.factored(
                2, scalars, ps, gs, a_ops, b_ops, info, self.n_threads, coefs=coefs,
                moments=None if momentum is None else [moved(momentum[i], layouts[i])
                                                       for i in live],
                decay=r["weight_decay_rate"] is not None, delta=delta, guard=finite)
            new = [jnp.zeros_like(p) for p in params] if delta else list(params)
            momentum = None if momentum is None else list(momentum)
            for k, (i, lay) in enumerate(zip(live, lays)):
                new[i] = moved_back(new_p[k], lay)
                if momentum is not None:
                    momentum[i] = moved_back(new_m[k], lay)
                if lay.dims is None:
                    vs[i] = firsts[k]
                else:
                    d1, d0 = lay.dims
                    rows[i] = _statistics(firsts[k], d0, d1, False)
                    cols[i] = _statistics(seconds[k], d1, d0, False)
            return new, rows, cols, vs, momentum

        new, rows, cols, vs, momentum = run(leaves, grads, rows, cols, vs, momentum)
        if self.skip_nonfinite:
            step = jnp.where(finite, step, count)
        return treedef, new, AdafactorState(
            step, treedef.unflatten(rows), treedef.unflatten(cols), treedef.unflatten(vs),
            None if momentum is None else treedef.unflatten(momentum))


@_options_doc
def adafactor(learning_rate=None, min_dim_size_to_factor=128, decay_rate=0.8, decay_offset=0,
              multiply_by_parameter_scale=True, clipping_threshold=1.0, momentum=None,
              dtype_momentum=jnp.float32, weight_decay_rate=None, eps=1e-30, factored=True,
              weight_decay_mask=None, *, max_grad_norm=None, max_grad_value=None,
              maximize=False, skip_nonfinite=False, n_threads=None):
    r"""Adafactor (Shazeer & Stern 2018) as an optax transformation run by fastopt's
    kernels: ``optax.adafactor``'s rule, names and defaults (not torch's Adafactor, which
    :class:`fastopt.Adafactor` follows). With gradient :math:`g_t`, step :math:`t`,
    :math:`\beta_t = 1 - (t - \text{decay\_offset})^{-\text{decay\_rate}}`: a parameter
    whose two largest dimensions are both at least ``min_dim_size_to_factor`` keeps row and
    column statistics over them,

    .. math::

        r_t &= \beta_t r_{t-1} + (1 - \beta_t)\,\operatorname{mean}_{d_0}(g_t^2 + \epsilon),
        \qquad
        c_t = \beta_t c_{t-1} + (1 - \beta_t)\,\operatorname{mean}_{d_1}(g_t^2 + \epsilon)\\
        u_t &= g_t \, (r_t / \operatorname{mean}(r_t))^{-1/2} \, c_t^{-1/2}
        \quad\text{(others: } v_t = \beta_t v_{t-1} + (1 - \beta_t)(g_t^2 + \epsilon),\
        u_t = g_t v_t^{-1/2}\text{)}

    (:math:`d_0` the largest dimension, :math:`d_1` the second), then per tensor
    :math:`w_t = \gamma\, u_t / \max(1, \operatorname{rms}(u_t) / \text{clipping\_threshold})
    \cdot \max(\operatorname{rms}(p_{t-1}), 10^{-3})`, with momentum
    :math:`m_t = \mu m_{t-1} + (1 - \mu) w_t` (:math:`w_t = m_t`), with weight decay
    :math:`w_t \mathrel{+}= \lambda p_{t-1}`, and :math:`p_t = p_{t-1} - w_t`. Each factor
    is optional as in optax (``learning_rate=None``: no :math:`\gamma`).

    Three calls of a handler of its own (the statistics in one read of the gradients,
    their float64 sums in a fixed order; the norms in one read of the gradients and the
    parameters; the update in place), XLA's small reductions between them: the same within
    a few float rounding steps as optax's (whose reductions sum in the parameters' dtype).
    The handler computes with IEEE subnormals where XLA flushes them to zero, which shows
    only with ``eps=0`` and squared gradients below the dtype's smallest normal. A
    parameter whose factored dimensions are not its last two is transposed for the
    handler (a copy each way). Parameters float32 or float64 (with ``jax_enable_x64``);
    not under ``shard_map`` (plain ``jit`` on sharded inputs gathers); no pruning masks
    yet.

    Args:
        learning_rate: :math:`\gamma`, a number or an optax schedule, or None (none).
        min_dim_size_to_factor (int): factor a parameter whose two largest dimensions are
            at least this. Default 128.
        decay_rate (float): Default 0.8.
        decay_offset (int): Default 0.
        multiply_by_parameter_scale (bool): Default True.
        clipping_threshold (float or None): Default 1.0.
        momentum (float or None): :math:`\mu`. Default None.
        dtype_momentum: the momentum's dtype, which must be the parameters' (or None,
            the parameters'); optax's default, float32, fits float32 parameters.
        weight_decay_rate (float or None): :math:`\lambda`. Default None.
        eps (float): :math:`\epsilon`. Default 1e-30.
        factored (bool): Default True.
        {weight_decay_mask}
        {float_options}

    Returns:
        FusedTransformation: with state :class:`AdafactorState`.
    """
    given = learning_rate is not None
    learning_rate = _learning_rate(learning_rate if given else 1.0)
    if isinstance(min_dim_size_to_factor, jax.Array):
        raise TypeError("min_dim_size_to_factor: expected a Python int, got a jax array (it "
                        "decides the state's shapes; optax.inject_hyperparams: pass "
                        "static_args=('min_dim_size_to_factor',))")
    min_dim_size_to_factor = integer("min_dim_size_to_factor", min_dim_size_to_factor, lo=0)
    if not isinstance(decay_offset, jax.Array):  # traced under optax.inject_hyperparams
        decay_offset = integer("decay_offset", decay_offset, lo=-2**31, hi=2**31 - 1)
    rule = dict(
        learning_rate_given=given, min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=_real("decay_rate", decay_rate, lo=0.0), decay_offset=decay_offset,
        multiply_by_parameter_scale=flag("multiply_by_parameter_scale",
                                         multiply_by_parameter_scale),
        clipping_threshold=None if clipping_threshold is None else _real(
            "clipping_threshold", clipping_threshold, lo=0.0, lo_open=True),
        momentum=None if momentum is None else _real("momentum", momentum, lo=0.0, hi=1.0),
        dtype_momentum=None if dtype_momentum is None else np.dtype(dtype_momentum),
        weight_decay_rate=None if weight_decay_rate is None else _real(
            "weight_decay_rate", _no_schedule("weight_decay_rate", weight_decay_rate), lo=0.0),
        eps=_real("eps", eps, lo=0.0), factored=flag("factored", factored),
        decay_mask=weight_decay_mask)
    options = _options(max_grad_norm, max_grad_value, maximize, skip_nonfinite, None, None,
                       False, None, n_threads)
    return _Adafactor(learning_rate, rule, options).transformation()


class RpropState(NamedTuple):
    """The state of :func:`rprop`: the step count (an int32 scalar), the previous gradients
    and the step sizes, each a pytree shaped like the parameters (torch's names)."""
    count: Any
    prev: Any
    step_size: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def rprop(learning_rate, eta_minus=0.5, eta_plus=1.2, min_step_size=1e-6, max_step_size=50.0,
          *, max_grad_norm=None, max_grad_value=None, maximize=False, skip_nonfinite=False,
          state_dtype=None, stochastic_rounding=None, master_weights=False, seed=None,
          n_threads=None):
    r"""Rprop (Riedmiller & Braun 1993) as an optax transformation run by fastopt's fused
    kernel.

    Takes ``optax.rprop``'s arguments and defaults, and follows ``torch.optim.Rprop``
    (:class:`fastopt.Rprop`'s kernel): ``optax.rprop`` as released applies each step's
    update one step late (its first step moves nothing; optax pull request 1725 fixes it to
    torch's). With gradient :math:`g_t`, the previous one :math:`g^-` and the step sizes
    :math:`\delta` (each starting at ``learning_rate``):

    .. math::

        f &= \eta_+, \eta_- \text{ or } 1 \text{ as } \operatorname{sign}(g_t g^-)
            = 1, -1 \text{ or } 0 \\
        \delta &\leftarrow \operatorname{clamp}(\delta f, \delta_{\min}, \delta_{\max}) \\
        g_t &\leftarrow 0 \text{ where } f = \eta_- \\
        p_{t+1} &= p_t - \operatorname{sign}(g_t) \delta, \qquad g^- \leftarrow g_t

    Its results equal :class:`fastopt.Rprop`'s, bit for bit.

    Args:
        learning_rate (float): the initial step size :math:`\delta_0 \ge 0`, a number (read
            once, by ``init``, as optax and torch read it).
        eta_minus (float): :math:`\eta_-` in (0, 1). Default 0.5.
        eta_plus (float): :math:`\eta_+ > 1`. Default 1.2.
        min_step_size (float): :math:`\delta_{\min} \ge 0`. Default 1e-6.
        max_step_size (float): :math:`\delta_{\max} \ge \delta_{\min}`. Default 50.
        {options}

    Returns:
        FusedTransformation: with state :class:`RpropState`.
    """
    if callable(learning_rate):
        raise TypeError("learning_rate: expected a number, the initial step size (Rprop "
                        "reads it once, when the state is made; a schedule has no effect)")
    learning_rate = _real("learning_rate", learning_rate, lo=0.0)
    eta_minus = _real("eta_minus", eta_minus, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    eta_plus = _real("eta_plus", eta_plus, lo=1.0, lo_open=True)
    min_step_size = _real("min_step_size", min_step_size, lo=0.0)
    max_step_size = _real("max_step_size", max_step_size, lo=0.0)
    if isinstance(min_step_size, float) and isinstance(max_step_size, float) \
            and min_step_size > max_step_size:
        raise ValueError(f"min_step_size must be <= max_step_size, got {min_step_size} and "
                         f"{max_step_size}")

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        return _scalars.rprop_scalars(dtype, etaminus=eta_minus, etaplus=eta_plus,
                                      step_size_min=min_step_size, step_size_max=max_step_size,
                                      maximize=maximize, grad_scale=grad_scale,
                                      grad_clip=grad_clip)

    return _make("rprop", "rprop", RpropState, scalars, learning_rate,
                 dict(eta_minus=eta_minus, eta_plus=eta_plus, min_step_size=min_step_size,
                      max_step_size=max_step_size),
                 ("Rprop", dict(etas=(eta_minus, eta_plus),
                                step_sizes=(min_step_size, max_step_size))),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads),
                 fills=dict(step_size=learning_rate))


@_low_precision_fields
class ASGDState(NamedTuple):
    r"""The state of :func:`asgd`: the step count (an int32 scalar) and the running average
    of the parameters, a pytree shaped like them (torch's name). The step's
    :math:`\eta` and :math:`\mu`, which torch keeps per parameter, follow from the count."""
    count: Any
    ax: Any
    master_param: Any = None
    absmax: Any = None


@_options_doc
def asgd(learning_rate=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, *,
         max_grad_norm=None, max_grad_value=None, maximize=False, skip_nonfinite=False,
         state_dtype=None, stochastic_rounding=None, master_weights=False, seed=None,
         n_threads=None):
    r"""Averaged SGD (Polyak & Juditsky 1992) as an optax transformation run by fastopt's
    fused kernel.

    optax has no ASGD: this follows ``torch.optim.ASGD`` (:class:`fastopt.ASGD`'s kernel),
    with torch's argument names and defaults. With gradient :math:`g_t` at step
    :math:`t = 1, 2, \ldots` and learning rate :math:`\gamma_t` (a number, or the
    schedule's value at count :math:`t - 1`):

    .. math::

        g_t &\leftarrow g_t + \lambda_{wd} p_t \\
        p_{t+1} &= p_t (1 - \lambda \eta_t) - \eta_t g_t \\
        a_{t+1} &= a_t + (p_{t+1} - a_t) \mu_t \quad (a_{t+1} = p_{t+1} \text{ while }
            \mu_t = 1) \\
        \eta_1 &= \gamma_1, \quad \eta_t = \frac{\gamma_{t-1}}{(1 + \lambda \gamma_{t-1}
            (t - 1))^\alpha}, \qquad \mu_1 = 1, \quad \mu_t = \frac{1}{\max(1, t - 1 - t_0)}

    As torch keeps them, :math:`\eta_t` and :math:`\mu_t` are rounded to float32; torch
    computes them in float64 first, which here needs ``jax_enable_x64`` (without it they
    are computed in float32: a few float32 ulps apart). The running average :math:`a` is
    the parameters' average, ``state.ax``; evaluate with it as torch users do.

    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule (a function of
            the step count, evaluated inside the jitted step). Default 1e-2.
        lambd (float): the decay term :math:`\lambda \ge 0`. Default 1e-4.
        alpha (float): the power :math:`\alpha` of the step size's decay. Default 0.75.
        t0 (float): the step :math:`t_0` after which averaging starts. Default 1e6.
        weight_decay (float): the L2 coefficient :math:`\lambda_{wd} \ge 0`. Default 0.
        {options}

    Returns:
        FusedTransformation: with state :class:`ASGDState`.
    """
    learning_rate = schedule = _learning_rate(learning_rate)
    lambd = _real("lambd", lambd, lo=0.0)
    alpha = _real("alpha", alpha)
    t0 = _real("t0", t0)
    weight_decay = _weight_decay(weight_decay)

    def eta_mu(step, lr):
        """This step's eta and mu: torch's state after step - 1 (jnp values)."""
        wide = jnp.result_type(float)  # float64 with jax_enable_x64, else float32
        done = (step - 1).astype(wide)
        lr_before = schedule(jnp.maximum(step - 2, 0)) if callable(schedule) else lr
        lr_before = jnp.asarray(lr_before, wide)
        eta = jnp.where(step == 1, jnp.asarray(lr, wide),
                        lr_before / (1 + lambd * lr_before * done) ** alpha)
        mu = jnp.where(step == 1, 1, 1 / jnp.maximum(1, done - t0))
        # rounded to float32 as torch keeps them, then used in the wide type (1 - lambd eta)
        return eta.astype(jnp.float32).astype(wide), mu.astype(jnp.float32).astype(wide)

    def scalars(dtype, *, step, lr, grad_scale, maximize, grad_clip):
        eta, mu = eta_mu(step, lr)
        return _scalars.asgd_scalars(dtype, eta=eta, mu=mu, lambd=lambd,
                                     weight_decay=weight_decay, maximize=maximize,
                                     grad_scale=grad_scale, grad_clip=grad_clip)

    def numbers(count):
        """eta and mu after `count` steps, as fastopt.ASGD's state holds them."""
        lr = float(schedule(count - 1)) if callable(schedule) else schedule
        eta, mu = _scalars.asgd_next(lr, lambd, alpha, t0, count)
        return dict(eta=eta, mu=mu)

    return _make("asgd", "asgd", ASGDState, scalars, learning_rate,
                 dict(lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay),
                 ("ASGD", dict(lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay)),
                 (max_grad_norm, max_grad_value, maximize, skip_nonfinite, state_dtype,
                  stochastic_rounding, master_weights, seed, n_threads),
                 numbers=numbers)



@_low_precision_fields
class ScheduleFreeState(NamedTuple):
    r"""The state of :func:`schedule_free_adamw` and :func:`schedule_free_sgd`: the step
    count (an int32 scalar); the weight of :math:`z` in the evaluation point,
    :math:`1 - 1/\beta_1` (computed in float64 when the transformation is made, for
    :func:`schedule_free_eval_params`), the largest learning rate so far and the sum of
    the averaging weights, 0-d arrays of jax's default float type (float64 with
    ``jax_enable_x64``, as the reference's Python floats; in float32 the sum, added once a
    step, loses accuracy over very long runs, as optax's does); the base sequence
    :math:`z` (a copy of the parameters made by ``init``) and, for AdamW, the second
    moment, pytrees shaped like the parameters (the array API's names)."""
    count: Any
    eval_weight: Any
    lr_max: Any
    weight_sum: Any
    z: Any
    exp_avg_sq: Any = None
    master_param: Any = None
    absmax: Any = None


_SCHEDULE_FREE_DOC = r"""
    The parameters the step takes and returns are :math:`y`, where the gradients are
    taken; evaluate (and save for inference) at the average :math:`x`, which
    :func:`schedule_free_eval_params` computes from them and the state. With gradient
    :math:`g_t` at step :math:`t = 1, 2, \ldots`, learning rate :math:`\gamma` (a number,
    or the schedule's value at count :math:`t - 1`), warmup :math:`T` and
    :math:`\gamma_t = \gamma \min(t / T, 1)`:

    .. math::

        w_t &= t^r \left(\max_{s \le t} \gamma_s\right)^P, \qquad
            c_t = w_t \Big/ \textstyle\sum_{s \le t} w_s \\
        MOMENT\hat g_t &= NORMALIZED + \lambda y_t \\
        y_{t+1} &= (1 - c_t) y_t + c_t z_t + \gamma_t (\beta_1 (1 - c_t) - 1) \hat g_t \\
        z_{t+1} &= z_t - \gamma_t \hat g_t

    with :math:`z_1 = y_1` (``init`` copies the parameters; the array API copies them at
    the first step). This follows the authors' reference
    (``facebookresearch/schedule_free``, the ``schedulefree`` package), as
    :class:`fastopt.CLASS` does, not
    ``optax.contrib.SELF``, which lags the warmup by one step; the
    arguments are optax's (its ``state_dtype`` by keyword), plus the reference's ``r``
    (by keyword). The weights are computed
    in jax's default float type: with ``jax_enable_x64`` in float64, as the reference's
    Python floats, else in float32. XLA fuses a multiply and an add of that arithmetic
    into one FMA where the host rounds twice, so the step's scalars can differ from the
    array API's by an ulp.

"""


def _schedule_free_doc(cls, moment, normalized):
    """A Schedule-Free factory's docstring: _SCHEDULE_FREE_DOC in place of its
    ``{schedule_free}`` line, then the options (_options_doc)."""
    def decorate(factory):
        factory.__doc__ = factory.__doc__.replace("    {schedule_free}\n", _SCHEDULE_FREE_DOC
                                                  .replace("MOMENT", moment)
                                                  .replace("NORMALIZED", normalized)
                                                  .replace("CLASS", cls)
                                                  .replace("SELF", factory.__name__))
        return _options_doc(factory)
    return decorate


def _schedule_free(name, kernel, learning_rate, warmup_steps, weight_decay, r,
                   weight_lr_power, b1, hyper, group, options, rule_scalars):
    """The Schedule-Free factories' common part: the averaging weights advanced inside
    the jitted step as the reference advances them on the host
    (fastopt._scalars.schedulefree_weights); `rule_scalars(dtype, *, step, lr, ckp1,
    grad_scale, maximize, grad_clip)` gives the kernel's fields."""
    if warmup_steps is None:
        warmup_steps = 0
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) \
            or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected None or an integer >= 0, got "
                         f"{warmup_steps!r:.60}")
    warmup_steps = int(warmup_steps)

    def scalars(dtype, *, step, lr, carried, **grad):
        wide = carried["weight_sum"].dtype
        t = step.astype(wide)
        lr_k = lr * jnp.where(step - 1 < warmup_steps, t / max(warmup_steps, 1), 1)
        lr_max = jnp.maximum(lr_k, carried["lr_max"])
        weight = t ** r * lr_max ** weight_lr_power
        weight_sum = carried["weight_sum"] + weight
        ckp1 = jnp.where(weight_sum != 0, weight / jnp.where(weight_sum != 0, weight_sum, 1),
                         0)
        fields = rule_scalars(dtype, step=step, lr=lr_k, ckp1=ckp1, **grad)
        return fields, dict(carried, lr_max=lr_max, weight_sum=weight_sum)

    common = dict(weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                  weight_lr_power=weight_lr_power)
    return _make(name, kernel, ScheduleFreeState, scalars, learning_rate,
                 dict(b1=b1, **hyper, **common),
                 (group[0], dict(group[1], **common, train_mode=True)), options,
                 fills=dict(z=_PARAMS),
                 carried=dict(eval_weight=1 - 1 / b1, lr_max=-1.0, weight_sum=0.0))


@_schedule_free_doc("AdamWScheduleFree",
                    "v_t &= \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2 \\\\\n        ",
                    r"\frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}")
def schedule_free_adamw(learning_rate=0.0025, warmup_steps=None, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=0.0, weight_lr_power=2.0, *, r=0.0, max_grad_norm=None,
                        max_grad_value=None, maximize=False, skip_nonfinite=False,
                        state_dtype=None, stochastic_rounding=None, master_weights=False,
                        seed=None, n_threads=None):
    r"""Schedule-Free AdamW (Defazio et al. 2024) as an optax transformation run by
    fastopt's fused kernel: no learning-rate schedule, an average of the iterates instead.
    {schedule_free}
    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule. Default 0.0025.
        warmup_steps (int or None): :math:`T`, the steps of linear warmup (None: 0).
            Default None.
        b1 (float): :math:`\beta_1` in (0, 1), the interpolation between :math:`z` and
            :math:`x`. Default 0.9.
        b2 (float): :math:`\beta_2` in [0, 1). Default 0.999.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`, taken at :math:`y`. Default 0.
        weight_lr_power (float): :math:`P`. Default 2.
        r (float): :math:`r`, the polynomial weighting of the average. Default 0.
        {options}

    Returns:
        FusedTransformation: with state :class:`ScheduleFreeState`.

    Example:
        >>> import jax.numpy as jnp, numpy as np, fastopt.jax
        >>> opt = fastopt.jax.schedule_free_adamw(0.1)
        >>> params = [jnp.zeros(2)]
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     params, state = opt.step(params, [jnp.array([1.0, -1.0])], state)
        >>> np.asarray(params[0]).round(4)  # y
        array([-0.155,  0.155], dtype=float32)
        >>> np.asarray(fastopt.jax.schedule_free_eval_params(state, params)[0]).round(4)  # x
        array([-0.15,  0.15], dtype=float32)
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    b2 = _real("b2", b2, lo=0.0, hi=1.0, hi_open=True)
    eps = _real("eps", eps, lo=0.0)
    weight_decay = _weight_decay(weight_decay)
    r = _real("r", r)
    weight_lr_power = _real("weight_lr_power", weight_lr_power)

    def rule_scalars(dtype, *, step, lr, ckp1, grad_scale, maximize, grad_clip):
        return _scalars.adamw_schedulefree_scalars(
            dtype, step=step, lr=lr, ckp1=ckp1, beta1=b1, beta2=b2, eps=eps,
            weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
            grad_clip=grad_clip)

    return _schedule_free("schedule_free_adamw", "adamw_schedulefree", learning_rate,
                          warmup_steps, weight_decay, r, weight_lr_power, b1,
                          dict(b2=b2, eps=eps),
                          ("AdamWScheduleFree", dict(betas=(b1, b2), eps=eps)),
                          (max_grad_norm, max_grad_value, maximize, skip_nonfinite,
                           state_dtype, stochastic_rounding, master_weights, seed, n_threads),
                           rule_scalars)


@_schedule_free_doc("SGDScheduleFree", "", "g_t")
def schedule_free_sgd(learning_rate=1.0, warmup_steps=None, b1=0.9, weight_decay=None,
                      weight_lr_power=2.0, *, r=0.0, max_grad_norm=None, max_grad_value=None,
                      maximize=False, skip_nonfinite=False, state_dtype=None,
                      stochastic_rounding=None, master_weights=False, seed=None, n_threads=None):
    r"""Schedule-Free SGD (Defazio et al. 2024) as an optax transformation run by
    fastopt's fused kernel: no learning-rate schedule, an average of the iterates instead.
    {schedule_free}
    Args:
        learning_rate: :math:`\gamma \ge 0`, a number or an optax schedule. Default 1.
        warmup_steps (int or None): :math:`T`, the steps of linear warmup (None: 0).
            Default None.
        b1 (float): :math:`\beta_1` in (0, 1), the interpolation between :math:`z` and
            :math:`x` (the reference's ``momentum``). Default 0.9.
        weight_decay (float or None): :math:`\lambda \ge 0`, taken at :math:`y` (None: 0).
            Default None.
        weight_lr_power (float): :math:`P`. Default 2.
        r (float): :math:`r`, the polynomial weighting of the average. Default 0.
        {options}

    Returns:
        FusedTransformation: with state :class:`ScheduleFreeState` (its ``exp_avg_sq``
        None).
    """
    learning_rate = _learning_rate(learning_rate)
    b1 = _real("b1", b1, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    weight_decay = _weight_decay(0.0 if weight_decay is None else weight_decay)
    r = _real("r", r)
    weight_lr_power = _real("weight_lr_power", weight_lr_power)

    def rule_scalars(dtype, *, step, lr, ckp1, grad_scale, maximize, grad_clip):
        return _scalars.sgd_schedulefree_scalars(
            dtype, lr=lr, ckp1=ckp1, momentum=b1, weight_decay=weight_decay,
            maximize=maximize, grad_scale=grad_scale, grad_clip=grad_clip)

    return _schedule_free("schedule_free_sgd", "sgd_schedulefree", learning_rate,
                          warmup_steps, weight_decay, r, weight_lr_power, b1, {},
                          ("SGDScheduleFree", dict(momentum=b1)),
                          (max_grad_norm, max_grad_value, maximize, skip_nonfinite,
                           state_dtype, stochastic_rounding, master_weights, seed, n_threads),
                           rule_scalars)


def schedule_free_eval_params(state, params):
    r"""The point to evaluate for the Schedule-Free parameters `params` (:math:`y`) and
    their :class:`ScheduleFreeState`: :math:`x = y + (1 - 1/\beta_1)(z - y)`, computed as
    torch's ``lerp`` in the parameters' compute dtype (float32 for bfloat16 / float16
    ones, then rounded to nearest), as :meth:`fastopt.AdamWScheduleFree.eval` sets it
    (optax.contrib's function of the same name, for fastopt's state). Before the first
    step :math:`x = y`. With master weights :math:`y` is their float32 copy
    (``state.master_param``); with 8-bit state :math:`z` is dequantized first. Jit it, or
    call it outside jit."""
    if not isinstance(state, ScheduleFreeState):
        raise TypeError(f"state: expected the ScheduleFreeState of fastopt.jax."
                        f"schedule_free_adamw or schedule_free_sgd, got "
                        f"{type(state).__name__}")
    _, (paths, leaves, treedef), dtype = _params(params)
    if state.absmax is not None:  # 8-bit z (state_dtype="int8"): codes and block scales
        each = _q8_dtypes(leaves)
        zs = _like(state.z, "state.z", paths, leaves, treedef, each=each)
        scales = state.absmax.get("z") if isinstance(state.absmax, dict) else None
        scales = _like(scales, "state.absmax['z']", paths, [
            jax.ShapeDtypeStruct(_scales_shape(p, d), np.float32)
            for p, d in zip(leaves, each)], treedef)
        zs = [_q8_dequantize(z, a, _formats.Q8S) if d == _U8 else z
              for z, a, d in zip(zs, scales, each)]
    else:
        zs = _like(state.z, "state.z", paths, leaves, treedef,
                   None if dtype == np.float64 else (dtype, *_STATE_DTYPES.values()))
    if state.master_param is not None:
        leaves = _like(state.master_param, "state.master_param", paths, leaves, treedef,
                       (np.dtype(np.float32),))
    compute = np.dtype(np.float32) if dtype in _LOWP else dtype
    weight = jnp.asarray(state.eval_weight).astype(compute)  # the host's, rounded

    def lerp(y, z):
        y, z = y.astype(compute), z.astype(compute)
        low = y + weight * (z - y)
        high = z - (z - y) * (1 - weight)
        return jnp.where(jnp.abs(weight) < 0.5, low, high).astype(dtype)

    return treedef.unflatten([lerp(y, z) for y, z in zip(leaves, zs)])
