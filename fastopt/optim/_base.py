"""The machinery every optimizer shares: param groups, state, validation, dispatch.

A rule (SGD, Adam, ...) has a row in the rule table (fastopt._rules), found by its class
name, which gives the class its registry operation (``_op``), state arrays (``_state_keys``)
and state numbers (``_state_scalars``); the class supplies
- ``_check_group(group, where)``: hyperparameter checks, raising errors that name them,
- ``_bucket_key(group, state)``: what must be equal for params to share one kernel call
  (the state numbers, such as Adam's step count, always are),
- ``_update(kernel, group, params, out, grads, states, n_threads, grad)``: one kernel call
  for a bucket, its state lists from ``ensure_state`` (which creates missing state);
  ``grad`` holds the gradient-clipping arguments every kernel takes (``grad_scale``,
  ``grad_clip``). It changes state through ``ensure_state``, ``advance_step`` and
  ``set_number`` only, which note how to undo it, and its `kernel` records the call
  (``_stage``): the kernels run once every call of the step is staged,
- ``_state_names(group, first)`` where some state arrays depend on the hyperparameters
  (`first`: the first param group, whose hyperparameters Prodigy reads for every group).

``step(grads)`` checks everything first (arrays, frameworks, devices, dtypes, shapes,
strides, state, overlapping memory, hyperparameters, backend), and only then creates state
and runs the kernels, so a call that raises leaves every parameter and state buffer as it
was. A checked parameter is not checked again while nothing it depends on changed (see
``_interop.view_still_valid``; its state is a ``_State``, which notes changes made to it),
nor a param group while its hyperparameters keep their values and types (``_snapshot``).
A step's plan is kept for the next step, which then checks only what can change between
steps (``_Plan``, ``Optimizer._steady_grads``).
"""

import bisect
import functools
import itertools
import math
import numbers
import threading
import types

import numpy as np

from fastopt import _backends, _ema, _interop, _rules
from fastopt._backends import _formats
from fastopt._check import MAX_COUNT, integer, real
from fastopt._config import check_threads, get_num_threads
from fastopt.optim import _clip

# param-group keys that fastopt.schedules adds (initial_lr, ...): accepted in a loaded state
SCHEDULE_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"})


def check_real(group, key, where, **bounds):
    """group[key] as a float, if it is a finite real number within `bounds` (lo, hi,
    lo_open, hi_open of fastopt._check.real).

    A 0-d array of a real dtype, of any framework (torch.tensor(0.01), np.float32 array),
    is accepted and stored back in the group as a Python float, the form the kernels' host
    scalars need."""
    value = real(f"{where}: {key}", group[key], **bounds)
    if _interop.framework_of(group[key]) is not None:
        group[key] = value
    return value


def check_bool(group, key, where):
    value = group[key]
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {key} must be True or False, got {value!r}")
    return value


def check_betas(group, where, *, closed=False, count=2, key="betas"):
    """group[key] as a tuple of `count` floats (2 or 3) in [0, 1) (or [0, 1] with
    closed=True)."""
    betas = group[key]
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        kind = "a pair (beta1, beta2)" if count == 2 else "a triple (beta1, beta2, beta3)"
        raise ValueError(f"{where}: {key} must be {kind}, got {betas!r}")
    group[key] = tuple(
        check_real({f"{key}[{k}]": beta}, f"{key}[{k}]", where, lo=0.0, hi=1.0,
                   hi_open=not closed)
        for k, beta in enumerate(betas))


def check_adam_group(group, where):
    """The hyperparameters the Adam family shares: lr, betas, eps, weight_decay, maximize,
    and decoupled_weight_decay where the rule has it."""
    check_real(group, "lr", where, lo=0.0)
    check_betas(group, where)
    check_real(group, "eps", where, lo=0.0)
    check_real(group, "weight_decay", where, lo=0.0)
    check_bool(group, "maximize", where)
    if "decoupled_weight_decay" in group:
        check_bool(group, "decoupled_weight_decay", where)


OPTIONS_DOC = """        **options: keyword-only ``backend``, ``n_threads``, ``max_grad_norm``,
            ``grad_norm_type``, ``max_grad_value``, ``skip_nonfinite``, ``masks``,
            ``state_dtype``, ``stochastic_rounding``, ``master_weights``, ``seed``,
            ``ema_decay``; see :class:`fastopt.optim.Optimizer`."""

def cautious_doc(direction):
    """The Args entry of the ``cautious`` argument, `direction` naming what it masks."""
    return r"""        cautious (bool): the cautious variant (C-Optim, Liang et al. 2024, as
            timm's ``caution=True``): with :math:`u_t` """ + direction + r""", the step
            uses :math:`u_t K_t / \max(\operatorname{mean}(K_t), 10^{-3})` in its place,
            where :math:`K_t = 1[u_t g_t > 0]` elementwise and the mean is over each tensor
            (the stored state is unchanged). A pruned entry (``masks=``) has
            :math:`K_t = 0` and still counts in the mean, as when its gradient is zero
            (``torch.nn.utils.prune``). Costs a counting pass over the gradient and
            state before the step. Default False.
"""

MASTER = "master_param"  # the float32 copy of a low-precision parameter (master_weights)
EMA = "ema"  # the moving average of a parameter (ema_decay)
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
ABSMAX = "_absmax"  # suffix of the block scales of a state array kept in 8 bits
_U8 = np.dtype(np.uint8)
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def compute_dtype(dtype):
    """The dtype the kernels compute in for parameters of `dtype`."""
    return _F64 if dtype == _F64 else _F32


class _Bucket(list):
    """The states of one kernel call (a list), with what undoes the changes its rule makes
    to them (``undo``: step counts, numbers, new buffers) should the call fail: they are
    made through ensure_state, advance_step and set_number only. ``dtype``: the dtype of
    the state arrays it creates (None: the parameter's). ``ema``: whether the call moves the
    weight EMA itself (ema_decay, in its update pass). ``mutable``: whether its parameters
    are updated in place (else new arrays are handed back to their framework)."""

    __slots__ = ("undo", "dtype", "ema", "mutable")


class _Call:
    """One kernel call of a step's plan: the stepped parameters of one param group that
    share their dtypes, masking and the rule's bucket key, as ``items`` (flat index, index
    in the group, checked view, state or None before the first step); ``positions``: theirs
    among the step's gradients (None: all of them, in order); ``params``: their kernel
    views; ``states``: their states; ``fresh``: whether some state is still to be made."""

    __slots__ = ("group", "items", "positions", "dtype", "masked", "params", "states",
                 "fresh", "mutable")

    def __init__(self, group, dtype, masked):
        self.group, self.dtype, self.masked = group, dtype, masked
        self.items, self.positions = [], []

    def close(self, n_stepped):
        """Fill in what follows from the items, once they are all in."""
        items = self.items
        self.params = [item[2].array for item in items]
        self.states = [item[3] for item in items]
        self.fresh = any(state is None for state in self.states)
        self.mutable = all(item[2].framework in _interop.MUTABLE for item in items)
        if self.positions == list(range(n_stepped)):
            self.positions = None


class _Plan:
    """How a step runs: its stepped parameters (``items``: (flat index, index in the group,
    view, state), in order; ``stepped``: their flat indices), the kernel calls they split
    into (``calls``), the parameters' dtypes and device. A plan is kept for the next step
    when that step can reuse it (Optimizer._keep): ``expect``, what that step checks (see
    Optimizer._steady_grads); ``numpy`` and ``torch``, whether the check can run in C
    (every stepped parameter a NumPy array, or a torch tensor); ``groups`` and
    ``state_dtype``, the param groups and the optimizer's state_dtype it was made for."""

    __slots__ = ("items", "stepped", "calls", "dtypes", "device", "groups", "expect",
                 "numpy", "torch", "state_dtype")


def ensure_state(states, name, likes, fill=0.0, shape=None, copy=False):
    """``state[name]`` of each state, created filled with `fill` where missing, shaped like
    the parameter or as ``shape(param)`` (None: the state has no such array, and its entry
    of the list is None): the list the kernel takes. ``copy=True``: created as a copy of
    the parameter's value instead (`likes`, as the kernels take them), rounded to the
    state's dtype to nearest even."""
    if shape is None:
        try:
            return [state[name] for state in states]  # after the first step
        except KeyError:
            pass
    created = []
    quantized = states.dtype == _U8 and shape is None
    for k, (state, like) in enumerate(zip(states, likes)):
        if name not in state:
            size = None if shape is None else shape(like)
            if quantized:
                codes, absmax = _quantized_full(like, _formats.load(
                    like, _formats.code_of(like.dtype)) if copy else fill, name)
                dict.__setitem__(state, name, codes)
                dict.__setitem__(state, name + ABSMAX, absmax)
                created.append(k)
            elif shape is None or size is not None:
                dtype = _F32 if states.dtype == _U8 else states.dtype
                if copy:
                    buf = _interop.empty_like(like, dtype=dtype)
                    _formats.store(buf, _formats.load(like, _formats.code_of(like.dtype)),
                                   _formats.code_of(dtype), stochastic=False)
                else:
                    buf = _interop.full_like(like, fill, size, dtype)
                dict.__setitem__(state, name, buf)
                created.append(k)
    if created:
        states.undo.append((name, created))
        if quantized:
            states.undo.append((name + ABSMAX, created))
    return [state.get(name) for state in states]


def _quantized_full(like, values, name):
    """(codes, absmax) of 8-bit state `name` holding `values` (an array of the shape of
    parameter `like`, or one number everywhere)."""
    codes = _interop.empty_like(like, dtype=_U8)
    absmax = _interop.empty_like(like, (-(-like.size // _formats.BLOCK),), _F32)
    _formats.q8_store(codes, absmax, np.broadcast_to(np.float32(values), like.shape),
                      _q8_code(name))
    return codes, absmax


def load_state(state, name):
    """State array `name` as the kernels compute with it (float32 or float64): bfloat16
    and 8-bit state loaded (a new array), float32 and float64 as they are."""
    buf = state[name]
    if buf.dtype == _U8:
        return _formats.q8_load(buf, state[name + ABSMAX], _q8_code(name))
    return _formats.load(buf, _formats.code_of(buf.dtype))


def _q8_code(name):
    return _formats.Q8S if name in _rules.SIGNED_STATE else _formats.Q8U


def _state_count(value, where):
    """A loaded step count as an int: an integer (Python's, NumPy's, or an integral float)
    in [0, MAX_COUNT] (exact as the float64 the host scalars take it as)."""
    # the range test comes first: it fails NaN, inf and 10**400 before int() could raise
    if isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and 0 <= value <= MAX_COUNT and value == int(value):
        return int(value)
    raise ValueError(f"{where}: expected an integer >= 0 (at most {MAX_COUNT}), got {value!r}")


def _state_number(kind, value, where):
    """A state number (``step``, NAdam's ``mu_product``) checked: int counts, finite floats."""
    if kind is int:
        return _state_count(value, where)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


_NO_STATE = types.MappingProxyType({})  # the state of a parameter not stepped yet

# hyperparameter types whose values cannot change in place (a group holding only these, and
# tuples of them, is not checked again while they stay equal: see _snapshot)
_PLAIN = frozenset((float, int, bool, str, type(None)))


def _snapshot(group):
    """The group's hyperparameters as a tuple that compares equal only while each keeps its
    value and type (``1 == 1.0 == True``, so the types are part of it), or None if one is
    of another type (a list, an array: it may change in place, so the group is checked at
    every step)."""
    items = []
    for key, value in group.items():
        cls = value.__class__
        if cls in _PLAIN:
            items.append((key, cls, value))
        elif cls is tuple and all(v.__class__ in _PLAIN for v in value):
            items.append((key, tuple(v.__class__ for v in value), value))
        elif key != "params":
            return None
    return tuple(items)


class _State(dict):
    """One parameter's state: a dict that notes any change made through it (a buffer added,
    replaced or removed, a step count edited), so that a step checks the state again only
    after it changed. The optimizer's own writes during a step leave it checked.

    ``checked``: False after a change; else true: the (shape, dtype, device) of the
    parameter view it was checked for, or True for a state made empty by the optimizer."""

    checked = False


def _unchecking(name):
    method = getattr(dict, name)

    @functools.wraps(method)
    def changed(self, *args, **kwargs):
        self.checked = False
        return method(self, *args, **kwargs)
    return changed


for _name in ("__setitem__", "__delitem__", "__ior__", "update", "setdefault", "pop",
              "popitem", "clear"):
    setattr(_State, _name, _unchecking(_name))


def set_number(states, key, value):
    """Set a state number (the same across a bucket, as step counts are) in each state."""
    states.undo.append((key, states[0].get(key)))
    for state in states:
        dict.__setitem__(state, key, value)


def advance_step(states):
    """Count one more step in each state (the same count across a bucket); return it."""
    step = states[0].get("step", 0) + 1
    set_number(states, "step", step)
    return step


def _ensure_master(states, params):
    """The float32 copies of low-precision parameters (``state["master_param"]``), created
    from the parameters where missing (noted in the bucket's undo list)."""
    created = []
    for k, (state, p) in enumerate(zip(states, params)):
        if MASTER not in state:
            master = _interop.empty_like(p, dtype=_F32)
            master[...] = _formats.load(p, _formats.code_of(p.dtype))
            dict.__setitem__(state, MASTER, master)
            created.append(k)
    if created:
        states.undo.append((MASTER, created))
    return [state[MASTER] for state in states]


def _undo(states):
    """Take back what the rule's call changed in its bucket's states (see _Bucket)."""
    for key, before in reversed(states.undo):
        if isinstance(before, list):  # buffers created in these states
            for k in before:
                dict.__delitem__(states[k], key)
        else:
            for state in states:
                if before is None:
                    dict.pop(state, key, None)
                else:
                    dict.__setitem__(state, key, before)


def _group_ends(groups):
    """The flat index just past each group's parameters."""
    return itertools.accumulate(len(g["params"]) for g in groups)


def _check_buffer(buf, pv, shape, dtype, where):
    """A state array the kernels can write for parameter view pv: of the kernels' array
    type, on its device, of `dtype` and `shape`, C-contiguous and writable."""
    p = pv.array
    if not isinstance(buf, type(p)):
        raise TypeError(f"{where}: expected a {type(p).__module__}.{type(p).__name__} like "
                        f"its parameter's kernel view, got {_interop.describe(buf)}")
    if buf.dtype != dtype or buf.shape != shape:
        raise ValueError(f"{where}: dtype {buf.dtype} and shape {tuple(buf.shape)} do not fit "
                         f"its parameter ({dtype} and {shape} expected, parameter shape "
                         f"{tuple(p.shape)} and dtype {p.dtype}); was the parameter or the "
                         f"state replaced, or the optimizer's state_dtype changed?")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{where}: not C-contiguous; the kernels write it in place")
    if isinstance(buf, np.ndarray):
        if not buf.flags.writeable:
            raise ValueError(f"{where}: read-only; the kernels write it in place (use a "
                             f"writable copy)")
    elif buf.device.id != pv.device[1]:
        raise ValueError(f"{where}: on cuda:{buf.device.id}, its parameter on "
                         f"cuda:{pv.device[1]}")


def _is_array(x):
    """An array of a framework (not a container such as torch.nn.ParameterList)."""
    return _interop.framework_of(x) is not None


_SHARED = ("{} and {} share memory, so an update would change both; give each parameter, "
           "gradient and state buffer its own memory (a copy)")


class Optimizer:
    """Base class of fastopt's optimizers (torch.optim's structure, arrays of any framework).

    Args:
        params: a list of arrays, or a list of param-group dicts ``{"params": [...], **hyper}``.
        defaults: hyperparameters for groups that do not set them.
        backend: ``"auto"`` (CuPy for GPU arrays, Cython on the CPU), or one of ``"numpy"``,
            ``"cython"``, ``"numba"``, ``"cupy"``.
        n_threads: CPU threads for the kernels; default ``fastopt.get_num_threads()``.
        max_grad_norm (float or None): clip the gradients' total norm to this (torch's
            ``clip_grad_norm_`` before each step), folded into the update pass: the norm is
            one extra read of the gradients, the gradients themselves are not changed.
        grad_norm_type: the norm for max_grad_norm and skip_nonfinite: 1, 2 (default), inf.
        max_grad_value (float or None): clamp every gradient element to
            [-max_grad_value, max_grad_value] (torch's ``clip_grad_value_``), in the update
            pass. Not together with max_grad_norm.
        skip_nonfinite (bool): a step whose gradients hold NaN or inf (a non-finite total
            norm) changes nothing - no parameter, state or step count - and sets
            ``last_step_skipped``. Its check rides on the norm pass.
        masks: pruning masks (fastopt.prune), a list aligned with the parameters (flattened
            over groups): a ``bool``/``uint8`` array of the parameter's shape and device
            (0 prunes an entry), or None for a parameter left whole. After every step the
            pruned entries of the parameter and of its state arrays are exactly +0, and
            a pruned entry's gradient counts as 0 wherever gradients are summed up:
            max_grad_norm, skip_nonfinite, Adafactor's row and column factors (which then
            read a masked copy of the gradient), Lamb's and Adafactor's update norms; the
            cautious option counts it as disagreeing. The
            Cython backend zeroes the pruned entries inside the update loop, the others
            right after each pass. Change the masks with ``set_masks``.

        state_dtype: the dtype of the state arrays: None (default: float32 for bfloat16 and
            float16 parameters, the parameter's dtype otherwise), ``"float32"`` or
            ``"bfloat16"`` (for float32, bfloat16 and float16 parameters; float64
            parameters keep float64 state). The kernels compute in float32 for every
            parameter but float64 ones, loading each operand from its dtype and rounding
            what they write back.
        stochastic_rounding (bool or None): how values are rounded to bfloat16/float16
            (parameters, and state with ``state_dtype="bfloat16"``): stochastically (up
            with probability equal to the discarded fraction, taken to 16 bits, from
            Philox-4x32-10 keyed by ``seed``, the parameter, the step count and the element,
            so that every backend and thread count gives the same bits) or to nearest even.
            Default: stochastic unless ``master_weights``.
        master_weights (bool): keep a float32 copy of each bfloat16/float16 parameter in its
            state (``"master_param"``), update it in float32 and write the parameter as its
            rounded value. Default False.
        seed (int): the seed of stochastic rounding, in [0, 2**64). Default 0.
        ema_decay (float or None): keep an exponential moving average of each parameter in
            its state (``state["ema"]``; float32 for bfloat16 and float16 parameters, of
            the master weights where there are some): a copy of the parameter after its
            first step, then after each step moved toward it by ``1 - ema_decay``, as
            :func:`fastopt.ema_update_` and torch's ``AveragedModel`` with
            ``get_ema_multi_avg_fn(ema_decay)`` do. A skipped step leaves it. Default None.

    Gradients have their parameter's dtype, or float32 for a bfloat16/float16 parameter.
    Rules without a step count (SGD, Lion) count steps in ``state["step"]`` for the parameters
    they round stochastically.

    After each step, ``last_step_skipped`` says whether it was skipped and
    ``last_grad_norm`` holds the gradients' total norm (None when nothing computed it).
    """

    _rule = None  # the rule's row of the table (set for each subclass named in it)
    _sums_gradients = False  # whether the rule sums gradients across entries (Adafactor)
    # whether torch parameters may require grad: fastopt.torch's optimizers update autograd
    # leaves in place, as torch.optim does under no_grad
    _leaves = False
    # combines the gradient norm's partial total with other processes' (see _clip.total_norm)
    _norm_reduce = None
    # whether _check_group reads the parameters' shapes (Muon's, which wants matrices)
    _checks_shapes = False
    # param-group keys the rule updates itself (Prodigy's estimate, Schedule-Free's mode),
    # which fastopt.torch copies back into torch's param groups
    _group_state = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        rule = _rules.BY_NAME.get(cls.__name__)
        if rule is not None and cls.__module__ == rule.module:
            cls._rule = rule
            cls._op = rule.op  # the registry operation
            cls._state_keys = rule.state  # the per-parameter state arrays
            cls._state_scalars = dict(rule.state_scalars)  # the per-parameter state numbers
            # the numbers a state may hold: also a step count for stochastic rounding
            cls._state_numbers = {"step": int, **cls._state_scalars}

    def __init__(self, params, defaults, *, backend="auto", n_threads=None, max_grad_norm=None,
                 grad_norm_type=2.0, max_grad_value=None, skip_nonfinite=False, masks=None,
                 state_dtype=None, stochastic_rounding=None, master_weights=False, seed=0,
                 ema_decay=None):
        self.defaults = dict(defaults)
        self.ema_decay = None if ema_decay is None else _ema.check_decay(ema_decay, "ema_decay")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be None, 'float32', 'bfloat16' or 'int8', got "
                             f"{state_dtype!r}")
        self.state_dtype = state_dtype
        if stochastic_rounding is not None and not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be True, False or None, got "
                            f"{stochastic_rounding!r}")
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be True or False, got {master_weights!r}")
        self.master_weights = master_weights
        self.stochastic_rounding = (not master_weights if stochastic_rounding is None
                                    else stochastic_rounding)
        self.seed = integer("seed", seed, lo=0, hi=2 ** 64 - 1)
        self._keys = {}  # flat parameter index -> its Philox key for stochastic rounding
        self.backend = _backends.check_name(backend)
        self.n_threads = None if n_threads is None else check_threads(n_threads, "n_threads")
        self._norm_kind = _clip.norm_kind(grad_norm_type, "grad_norm_type")
        self.grad_norm_type = float(grad_norm_type)
        self.max_grad_norm = None if max_grad_norm is None else _clip._positive(
            max_grad_norm, "max_grad_norm")
        self.max_grad_value = None if max_grad_value is None else _clip._positive(
            max_grad_value, "max_grad_value")
        if self.max_grad_norm is not None and self.max_grad_value is not None:
            raise ValueError("max_grad_norm and max_grad_value: pass one of them, not both")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        self.skip_nonfinite = skip_nonfinite
        self.last_step_skipped = False
        self.last_grad_norm = None
        self.param_groups = []
        # sorted (lo, hi, name) of the parameters' memory when they were added, for checking
        # each group added against them by bisection (1,000 groups of one parameter: built
        # in 0.09 s, against 1.4 s when each group re-read every parameter's extent)
        self._extents = []
        self.state = {}  # flat parameter index -> {name: array or step count}
        # flat index -> (param, checked view, token): a mutable parameter whose view was
        # checked (also against its state) is not imported and checked again while the token
        # says it is the same memory; see _interop.view_still_valid
        self._views = {}
        # (stepped flat indices, their memory spans): what a step writes, for the per-step
        # check of the gradients against it; rebuilt when a parameter or state changed
        self._spans = None
        self._scratch = {}  # id of a state dict -> scratch buffer like its parameter
        # group index -> (group, _snapshot of it) when it was last checked (_group_checked)
        self._checked_groups = {}
        # the previous step's _Plan, kept where the next step can run as it did (_keep)
        self._steady = None
        # serializes step, load_state_dict, set_masks and add_param_group
        self._lock = threading.Lock()
        if _is_array(params):
            raise TypeError("params: expected a list of arrays or of param-group dicts, got a "
                            "single array; wrap it in a list: [param]")
        if isinstance(params, (dict, set)) or not hasattr(params, "__iter__"):
            raise TypeError("params: expected a list of arrays or of param-group dicts, got "
                            f"{type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params: the optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)
        self._masks = {}  # flat parameter index -> uint8 kernel view of its pruning mask
        self._mask_sources = {}  # flat parameter index -> (mask, its View, token)
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks):
        """Set the pruning masks (see the class docstring; None removes them all): a list
        with one entry per parameter, flattened over groups. Checked before anything
        changes. Pruned entries become 0 at the next step; ``fastopt.prune.apply_mask_``
        zeroes them at once."""
        with self._lock:  # not in the middle of a step
            self._set_masks(masks)

    def _set_masks(self, masks):
        if masks is None:
            self._masks, self._mask_sources, self._steady = {}, {}, None
            return
        if _interop.framework_of(masks) is not None or isinstance(masks, (dict, set)):
            raise TypeError("masks: expected a list with one mask (or None) per parameter")
        masks = list(masks)
        params = self.params()
        if len(masks) != len(params):
            raise ValueError(f"masks: expected {len(params)} entries (one per parameter, "
                             f"flattened over param groups; None for an unpruned one), got "
                             f"{len(masks)}")
        sources = {}
        for i, (mask, p) in enumerate(zip(masks, params)):
            if mask is not None:
                pv = _interop._check_array(p, f"params[{i}]", _interop.PARAM_DTYPES)
                sources[i] = self._import_mask(i, mask, tuple(p.shape), pv[1])
        self._mask_sources = sources
        self._masks = {i: source[1].array.view(np.uint8) for i, source in sources.items()}
        self._steady = None

    @staticmethod
    def _import_mask(i, mask, shape, device):
        """(mask, its View, token) for the pruning mask of parameter i, checked."""
        view = _interop.import_input(mask, f"masks[{i}]", ("bool", "uint8"))
        if tuple(view.array.shape) != shape:
            raise ValueError(f"masks[{i}]: shape {tuple(view.array.shape)} does not match "
                             f"params[{i}] shape {shape}")
        if view.device != device:
            raise ValueError(f"masks[{i}] is on {view.device[0]}:{view.device[1]} but "
                             f"params[{i}] is on {device[0]}:{device[1]}")
        # immutable masks (JAX, TensorFlow) cannot change: no token
        mutable = view.framework in _interop.MUTABLE
        return mask, view, _interop.view_token(mask, view) if mutable else None

    def _refresh_masks(self, plan):
        """Import again the masks of the stepped parameters (of `plan`) that changed since
        they were checked (a torch mask rebound with ``mask.data = ...``), or whose
        parameter did."""
        for flat, _, pv, _ in plan.items:
            source = self._mask_sources.get(flat)
            if source is None:
                continue
            mask, view, token = source
            if (token is not None and not _interop.view_still_valid(mask, view, token,
                                                                    writable=False)
                    or view.array.shape != pv.array.shape):
                source = self._import_mask(flat, mask, tuple(pv.array.shape), pv.device)
                self._mask_sources[flat] = source
                self._masks[flat] = source[1].array.view(np.uint8)

    def __repr__(self):
        lines = [f"{type(self).__name__} (backend={self.backend!r})"]
        for i, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in group.items() if k != "params")
            lines.append(f"  param_groups[{i}]: {len(group['params'])} params, {hyper}")
        return "\n".join(lines)

    def add_param_group(self, param_group):
        """Add a group ``{"params": [...], **hyperparameters}``; missing ones take defaults."""
        with self._lock:  # not in the middle of a step
            self._add_param_group(param_group)

    def _add_param_group(self, param_group):
        where = f"param_groups[{len(self.param_groups)}]"
        if not isinstance(param_group, dict):
            raise TypeError(f"{where}: expected a dict with key 'params', got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"{where}: missing key 'params'")
        group = dict(param_group)
        params = group["params"]
        if _is_array(params):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{where}: params must be an ordered list, not a set")
        group["params"] = params = list(params)
        for j, p in enumerate(params):
            if _interop.framework_of(p) is None:
                raise TypeError(f"{where}['params'][{j}]: expected an array, got "
                                f"{type(p).__name__}")
        self._check_keys(group, where)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, where)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or seen & {id(p) for p in params}:
            raise ValueError(f"{where}: some parameters appear more than once (in this group "
                             f"or another); each parameter may be given once")
        first = sum(len(g["params"]) for g in self.param_groups)
        extents = list(self._extents)  # the list stays as it was if the group is refused
        for j, p in enumerate(params):
            e = _interop.extent(p)
            if e is not None:
                k = bisect.bisect_left(extents, e)
                span = (e[0], e[1], f"params[{first + j}]")
                for other in extents[max(k - 1, 0):k + 1]:  # the neighbours: disjoint spans
                    if other[0] < span[1] and span[0] < other[1]:
                        raise ValueError(_SHARED.format(other[2], span[2]))
                extents.insert(k, span)
        self._extents = extents
        self.param_groups.append(group)
        self._spans = self._steady = None

    def _check_keys(self, group, where):
        """Refuse keys that are no hyperparameter of this rule (a typo would be ignored)."""
        unknown = set(group) - set(self.defaults) - SCHEDULE_KEYS - {"params"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} for "
                             f"{type(self).__name__}; its hyperparameters are "
                             f"{sorted(self.defaults)}")


    def params(self):
        """The current parameters, flattened over groups (new arrays for JAX/TF after a step)."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        """The optimizer's state in torch.optim's structure::

            {"state": {index: {"step": int, name: array, ...}},
             "param_groups": [{**hyperparameters, "params": [index, ...]}]}

        Indices count parameters flattened over groups. As in torch, the arrays are the
        optimizer's own buffers, not copies; ``fastopt.save(opt.state_dict(), path)`` writes
        them out at once.
        """
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(start, start + n))
            groups.append(saved)
            start += n
        return {"state": {i: dict(s) for i, s in self.state.items() if s},
                "param_groups": groups}

    def __getstate__(self):  # copy.deepcopy, pickle: a fresh lock, not the held one
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_steady")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_checked_groups", {})  # pickled before it was kept
        self._lock = threading.Lock()
        self._steady = None

    def load_state_dict(self, state_dict):
        """Load a ``state_dict()`` (of this rule, for the same parameters), by copy.

        Hyperparameters are taken from it; state arrays are copied into new buffers on each
        parameter's device, so a run resumed after k steps (on any backend) continues exactly
        as the unbroken run. Everything is checked before anything changes: the number of
        groups and of parameters per group, unknown keys, state array shapes and dtypes.
        """
        with self._lock:
            self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict):
        where = "state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError(f"{where}: expected a dict with keys 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, dict) for g in saved_groups):
            raise TypeError(f"{where}['param_groups']: expected a list of dicts, got "
                            f"{type(saved_groups).__name__}")
        if not isinstance(saved_state, dict):
            raise TypeError(f"{where}['state']: expected a dict, got "
                            f"{type(saved_state).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        index_of = {}  # saved parameter id -> flat index
        new_groups = []
        flat = 0
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            gwhere = f"{where}['param_groups'][{gi}]"
            ids = saved.get("params", ())
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"{gwhere}['params']: expected a list of parameter indices, "
                                f"got {type(ids).__name__}")
            if len(ids) != len(group["params"]):
                raise ValueError(f"{gwhere}: holds {len(ids)} parameters, the optimizer's "
                                 f"group {len(group['params'])}")
            unknown = set(saved) - set(group) - SCHEDULE_KEYS
            if unknown:
                raise ValueError(f"{gwhere}: unknown keys {sorted(unknown)} for "
                                 f"{type(self).__name__}")
            merged = dict(group)
            merged.update((k, v) for k, v in saved.items() if k != "params")
            self._check_group(merged, gwhere)
            for key in SCHEDULE_KEYS & set(merged):
                check_real(merged, key, gwhere, lo=0.0)
            new_groups.append(merged)
            for saved_id in ids:
                if not isinstance(saved_id, numbers.Integral) or saved_id in index_of:
                    raise ValueError(f"{gwhere}['params']: expected distinct integer indices, "
                                     f"got {saved_id!r}")
                index_of[saved_id] = flat
                flat += 1
        params = self.params()
        new_state = {}
        for saved_id, entry in saved_state.items():
            swhere = f"{where}['state'][{saved_id!r}]"
            if saved_id not in index_of:
                raise ValueError(f"{swhere}: no parameter has this index")
            i = index_of[saved_id]
            view = self._import_param(params[i], i).array
            group = new_groups[next(g for g, n in enumerate(_group_ends(self.param_groups))
                                    if i < n)]
            loaded = self._load_state_entry(entry, view, group, new_groups[0], swhere)
            if loaded:
                new_state[i] = loaded
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self.state = new_state
        self._views.clear()
        self._spans = self._steady = None
        self._scratch.clear()  # keyed by the state dicts just replaced

    def _state_shapes(self, param):
        """Name -> shape of the state arrays a parameter has; rules whose state is not
        shaped like the parameter (Adafactor's factors) override this."""
        return {name: tuple(param.shape) for name in self._state_keys}

    def _array_shapes(self, param):
        """Name -> shape of every state array a parameter may have (with master weights,
        also its float32 copy; with 8-bit state, each array's block scales)."""
        shapes = self._state_shapes(param)
        if self._state_dtype(param.dtype, param.size) == _U8:
            blocks = (-(-param.size // _formats.BLOCK),)
            shapes.update({name + ABSMAX: blocks for name in list(shapes)})
        if self._has_master(param.dtype):
            shapes[MASTER] = tuple(param.shape)
        if self.ema_decay is not None:
            shapes[EMA] = tuple(param.shape)
        return shapes

    def _numbers(self, dtype):
        """The numbers the state of a parameter of `dtype` may hold: the rule's, and a step
        count where it is rounded stochastically (for rules that have none)."""
        if self.stochastic_rounding and (dtype.itemsize == 2
                                         or self._state_dtype(dtype, 0).itemsize == 2):
            return self._state_numbers
        return self._state_scalars

    def _has_master(self, dtype):
        return self.master_weights and dtype.itemsize == 2  # bfloat16, float16

    def _state_dtype(self, dtype, size):
        """The dtype of the state arrays of a parameter of `dtype` (NumPy dtypes) and `size`
        elements: uint8 for the codes of 8-bit state (of the rules that keep their state
        shaped like the parameter, for tensors of MIN_QUANTIZED elements or more)."""
        if dtype == _F64 or self.state_dtype is None and dtype == _F32:
            return dtype
        if self.state_dtype == "bfloat16":
            return _interop.bfloat16()
        if (self.state_dtype == "int8" and size >= _formats.MIN_QUANTIZED
                and type(self)._state_shapes is Optimizer._state_shapes):
            return _U8
        return _F32

    def _buffer_dtype(self, key, dtype, size):
        if key == EMA:
            return compute_dtype(dtype)
        if key == MASTER or key.endswith(ABSMAX):
            return _F32
        return self._state_dtype(dtype, size)

    def _state_names(self, group, first):
        """The state arrays a step with `group`'s hyperparameters keeps, `first` the first
        param group's (rules with optional state, such as Adam's ``max_exp_avg_sq`` with
        amsgrad, override this)."""
        return self._state_keys

    def _load_state_entry(self, entry, like, group, first, where):
        """A loaded state entry, checked and copied onto the parameter's device: complete
        (every array and number a step with `group` uses) unless empty."""
        if not isinstance(entry, dict):
            raise TypeError(f"{where}: expected a dict, got {type(entry).__name__}")
        shapes = self._array_shapes(like)
        known_numbers = self._numbers(like.dtype)
        known = set(shapes) | set(known_numbers)
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} for "
                             f"{type(self).__name__}; expected some of {sorted(known)}")
        names = set(self._state_names(group, first))
        names |= {name + ABSMAX for name in names}
        needed = (set(shapes) & names) | set(self._state_scalars)
        missing = needed - set(entry) if entry else ()
        if missing:
            raise ValueError(f"{where}: incomplete, missing {sorted(missing)} (a state entry "
                             f"holds all of {sorted(needed)}, or is empty)")
        loaded = _State()
        for key, value in entry.items():
            kind = known_numbers.get(key)
            if kind is not None:
                loaded[key] = _state_number(kind, value, f"{where}[{key!r}]")
                continue
            if not _is_array(value):
                raise TypeError(f"{where}[{key!r}]: expected an array, got "
                                f"{type(value).__name__}")
            dtype = self._buffer_dtype(key, like.dtype, like.size)
            if tuple(value.shape) != shapes[key] or str(value.dtype) != str(dtype).removeprefix(
                    "torch."):
                raise ValueError(f"{where}[{key!r}]: shape {tuple(value.shape)} and dtype "
                                 f"{value.dtype} do not fit the parameter's "
                                 f"({shapes[key]}, {dtype}); parameter shape "
                                 f"{tuple(like.shape)} and dtype {like.dtype} (convert "
                                 f"another state_dtype's state with fastopt.convert_state)")
            loaded[key] = _interop.copy_to_like(value, like, shapes[key], dtype)
        return loaded

    def step(self, grads):
        """Apply one update with ``grads`` (one per parameter, flattened over groups, in
        order; ``None`` skips that parameter). Returns ``self.params()``.

        Steps of one optimizer called from several threads at once run one after the other
        (different optimizers run in parallel)."""
        with self._lock:
            return self._step(grads)

    def _step(self, grads, unscale=1.0):
        """The step; `unscale` multiplies the gradients first (the inverse of an AMP loss
        scale, folded into the update pass: see fastopt.torch)."""
        try:
            return self._planned_step(grads, unscale)
        except BaseException:
            self._steady = None  # the next step is planned anew, with every check
            raise

    def _planned_step(self, grads, unscale):
        plan, garrs = self._plan(grads)
        imported = garrs
        if self._masks and (self._sums_gradients or self.max_grad_norm is not None
                            or self.skip_nonfinite):
            garrs = self._masked_grads(plan, garrs)
        n_threads = self.n_threads or get_num_threads()
        grad_args, norm = self._grad_args(garrs, plan, n_threads, unscale)
        if grad_args is None:
            self.last_grad_norm, self.last_step_skipped = norm, True
            self._keep(plan, imported)
            return self.params()
        staged = []  # (kernel call, its bucket): all bookkeeping done before any kernel runs
        try:
            for call in plan.calls:
                kernel = _backends.resolve(self._op_of(call.group), self.backend, plan.device,
                                           compute_dtype(call.dtype))
                fuse_ema = self.ema_decay is not None and _backends.takes_ema(kernel)
                if call.masked:
                    kernel = functools.partial(
                        kernel, masks=[self._masks[item[0]] for item in call.items])
                grads_k = garrs if call.positions is None else [garrs[k] for k in call.positions]
                staged.append(self._stage(kernel, call, grads_k, n_threads,
                                          grad_args[call.dtype], fuse_ema))
        except BaseException:
            self._undo(staged)
            raise
        self._run_staged(staged)
        self._settle(staged)
        self.last_grad_norm, self.last_step_skipped = norm, False
        self._keep(plan, imported)
        return self.params()

    def _run_staged(self, staged):
        """Run the staged kernel calls, one per bucket; a call that fails takes back its
        own bookkeeping and that of the calls after it (those before it wrote their
        parameters and state, which are settled: handed to immutable frameworks, their
        averages moved). Rules with a reduction over every bucket between passes (Prodigy)
        override this."""
        for k, (call, _) in enumerate(staged):
            try:
                call()
            except BaseException:
                self._undo(staged[k:])
                self._settle(staged[:k])
                raise

    def _settle(self, staged):
        """After staged kernel calls ran: their new arrays handed to immutable frameworks,
        their weight EMA moved where the calls did not move it themselves."""
        self._finish(staged)
        if self.ema_decay is not None:
            self._update_ema(staged, self.n_threads or get_num_threads())

    def _masked_grads(self, plan, garrs):
        """The gradients with each masked one replaced by a copy whose pruned entries are 0
        (for the norm and Adafactor's factors; the elementwise updates do not need it)."""
        masked = list(garrs)
        for k, flat in enumerate(plan.stepped):
            mask = self._masks.get(flat)
            if mask is not None:
                g = masked[k]
                xp = _interop.array_module(g)
                masked[k] = xp.where(mask.reshape(g.shape) != 0, g, xp.zeros((), g.dtype))
        return masked

    def _grad_args(self, garrs, plan, n_threads, unscale=1.0):
        """(args, norm): per dtype (of the plan's parameters), the gradient prologue's
        arguments (clip_grad_norm_'s coefficient and clip_grad_value_'s bound) for the
        kernels, None if the step is to be skipped; and the gradients' total norm where one
        was computed, else None. The kernels clamp, then scale: with gradients to be
        multiplied by `unscale` first, the bound is divided by it and the scale multiplied
        (both exact for the powers of two that loss scales are)."""
        clip = math.inf if self.max_grad_value is None else self.max_grad_value / unscale
        norm = None
        if garrs and (self.max_grad_norm is not None or self.skip_nonfinite):
            by_dtype = {}
            for g in garrs:
                if g.dtype.itemsize == 2:  # the norm passes read float32 and float64
                    g = _formats.load(g, _formats.code_of(g.dtype))
                by_dtype.setdefault(g.dtype, []).append(g)
            norm = _clip.total_norm(by_dtype, self._norm_kind, self.backend, plan.device,
                                    n_threads, self._norm_reduce) * unscale
            if self.skip_nonfinite and not math.isfinite(norm):
                return None, norm
        args = {dtype: dict(grad_scale=unscale, grad_clip=clip) for dtype in plan.dtypes}
        if norm is not None and self.max_grad_norm is not None:
            for dtype in plan.dtypes:
                args[dtype]["grad_scale"] = unscale * _clip.clip_coefficient(
                    self.max_grad_norm, norm, compute_dtype(dtype))
        return args, norm

    # -- internals --------------------------------------------------------------------

    def _plan(self, grads):
        """(plan, gradients): the step's _Plan (the one kept from the previous step while it
        stands, else made anew by _prepare) and the stepped parameters' gradients as
        kernel views, in order."""
        garrs = self._steady_grads(grads)
        if garrs is None:
            return self._prepare(grads)
        plan = self._steady
        for gi, group in enumerate(self.param_groups):
            self._group_checked(gi, group)
        self._check_memory(plan, garrs, False)
        if self._mask_sources:
            self._refresh_masks(plan)
        self._check_kernels(plan)
        return plan, garrs

    def _steady_grads(self, grads):
        """The gradients as kernel views if the plan kept from the previous step
        (``_steady``) stands for this one, else None: the same param groups and parameters
        (the same objects, their views still valid), the same states (not changed since
        they were checked), and gradients for the same parameters, of the kind the plan
        took (a C-contiguous NumPy array of the parameter's shape and the same dtype, or
        the common torch CPU tensor), and the same state_dtype. Raises nothing: a step it
        turns down is planned anew by _prepare, which checks everything and names what is
        wrong. In C for NumPy parameters (_runtime.steady_grads, about 0.05 us per
        parameter, against 2 us for _prepare)."""
        plan = self._steady
        if plan is None or plan.state_dtype != self.state_dtype:
            return None
        if type(grads) is not list:
            if type(grads) is not tuple:
                return None
            grads = list(grads)
        if plan.numpy and _interop._runtime is not None:
            return _interop._runtime.steady_grads(self.param_groups, plan.groups, grads,
                                                  plan.expect, self.state)
        if plan.torch and _interop._runtime is not None:
            return _interop._runtime.steady_grads(self.param_groups, plan.groups, grads,
                                                  plan.expect, self.state,
                                                  _interop.torch_floats(), self._leaves)
        groups, expect, states = self.param_groups, plan.expect, self.state
        n = len(expect)
        if (len(grads) != n or not isinstance(groups, (list, tuple))
                or not isinstance(states, dict) or len(groups) != len(plan.groups)):
            return None
        garrs, flat = [], 0
        for group, kept in zip(groups, plan.groups):
            params = group.get("params") if group is kept else None
            if type(params) is not list:
                return None
            for p in params:
                if flat == n:
                    return None
                entry, g = expect[flat], grads[flat]
                flat += 1
                if entry is None:
                    if g is not None:
                        return None
                    continue
                q, _, _, gdtype, key, state, pv, token = entry
                if (p is not q or states.get(key) is not state or not state.checked
                        or not _interop.view_still_valid(p, pv, token, leaf=self._leaves)):
                    return None
                ga = _interop.plain_grad(g, pv.framework)
                if ga is None or ga.dtype is not gdtype or ga.shape != pv.array.shape:
                    return None
                garrs.append(ga)
        return garrs if flat == n else None

    def _prepare(self, grads):
        """Check everything a step needs; write nothing. Returns (plan, gradients) as _plan
        does."""
        self._steady = None
        if _is_array(grads) or isinstance(grads, (dict, set)) or not hasattr(grads, "__iter__"):
            raise TypeError("grads: expected a list of arrays (one per parameter, None to skip)")
        grads = list(grads)
        n_params = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n_params:
            raise ValueError(f"grads: expected {n_params} arrays (one per parameter, flattened "
                             f"over param groups; None to skip one), got {len(grads)}")
        first = None  # (index, framework, device) of the first stepped parameter
        by_group, stepped, garrs = [], [], []
        plan = _Plan()
        plan.items, plan.stepped, plan.dtypes = [], stepped, set()
        last_dtype = None
        changed = False  # whether a parameter or state was checked anew
        flat = 0
        for gi, group in enumerate(self.param_groups):
            self._group_checked(gi, group)
            items = []
            for j, p in enumerate(group["params"]):
                g = grads[flat]
                if g is not None:
                    state = self.state.get(flat)
                    cached = self._views.get(flat)
                    if (cached is not None and cached[0] is p
                            and _interop.view_still_valid(p, cached[1], cached[2],
                                                          leaf=self._leaves)
                            and (state is None or state.__class__ is _State and state.checked)):
                        pv = cached[1]
                    else:
                        pv, renewed = self._import_checked(flat, p, state)
                        state = self.state.get(flat)  # now a checked _State
                        changed = changed or renewed
                    gv = _interop.import_grad(g, "grads", flat)
                    if first is None:
                        first = (flat, pv.framework, pv.device)
                    pa, ga = pv.array, gv.array
                    if (pv.framework != first[1] or gv.framework != first[1]
                            or pv.device != first[2] or gv.device != first[2]
                            or pa.shape != ga.shape or pa.dtype != ga.dtype
                            and not (ga.dtype == _F32 and pa.dtype.itemsize == 2)):
                        self._pair_error(flat, pv, gv, first)
                    if pa.dtype is not last_dtype:
                        last_dtype = pa.dtype
                        plan.dtypes.add(last_dtype)
                    items.append((flat, j, pv, state))
                    stepped.append(flat)
                    garrs.append(ga)
                flat += 1
            if items:
                by_group.append((group, items))
                plan.items += items
        if len(self._checked_groups) > len(self.param_groups):  # groups removed since
            for gi in [gi for gi in self._checked_groups if gi >= len(self.param_groups)]:
                del self._checked_groups[gi]
        if first is None:
            plan.calls, plan.device = [], None
            return plan, garrs
        plan.device = first[2][0]
        self._check_memory(plan, garrs, changed)
        if self._mask_sources:
            self._refresh_masks(plan)
        self._check_kernels(plan)
        plan.calls = self._calls(by_group, garrs)
        return plan, garrs

    def _check_kernels(self, plan):
        """Refuse a step whose parameters' dtypes the backend has no kernels for."""
        for dtype in plan.dtypes:
            if dtype.itemsize == 2 and plan.device != "cpu":
                raise TypeError(f"{dtype} parameters on {plan.device} are not supported yet; "
                                f"use float32 or float64 there, or CPU arrays")
            _backends.resolve(self._op, self.backend, plan.device, compute_dtype(dtype))
            if self.max_grad_norm is not None or self.skip_nonfinite:
                _backends.resolve("norm_partials", self.backend, plan.device,
                                  compute_dtype(dtype))

    def _calls(self, by_group, garrs):
        """The kernel calls of a step: per param group ((group, items) in `by_group`), its
        stepped parameters split by their dtypes (and their gradients', `garrs`), masking,
        8-bit state and bucket key (_key), one call per key in the order keys first
        appear."""
        calls = []
        k = 0
        for group, items in by_group:
            buckets = {}
            for item in items:
                key = self._key(group, item, garrs[k].dtype)
                call = buckets.get(key)
                if call is None:
                    call = buckets[key] = _Call(group, key[0], key[2])
                call.items.append(item)
                call.positions.append(k)
                k += 1
            calls += buckets.values()
        for call in calls:
            call.close(len(garrs))
        return calls

    def _key(self, group, item, grad_dtype):
        """What parameters of one kernel call share: the dtypes of the parameter and its
        gradient, whether it is masked and its state 8-bit, its step count (the same across
        a call: the count of stochastic rounding too) and the rule's bucket key."""
        state = item[3] or _NO_STATE
        pa = item[2].array
        key = (pa.dtype, grad_dtype, item[0] in self._masks,
               self.state_dtype == "int8" and pa.size >= _formats.MIN_QUANTIZED,
               state.get("step", 0))
        # the default bucket key is the step count: 200 method calls cost 15 us
        if type(self)._bucket_key is Optimizer._bucket_key:
            return key
        return key + (self._bucket_key(group, state),)

    def _keep(self, plan, garrs):
        """After a step of `plan` (a new one) that read `garrs`: keep the plan for the next
        step (``_steady``, see _steady_grads) if that step can reuse it: each stepped
        parameter updated in place on the CPU (NumPy, torch), its checked view cached, its
        state made and checked (the states made by this step taken into its calls), and
        the plan's calls those a new plan would make from the states as they are now."""
        if plan is self._steady or not plan.items:
            return
        states = self.state
        expect = [None] * sum(len(group["params"]) for group in self.param_groups)
        numpy = torch = True
        for (flat, _, pv, _), g in zip(plan.items, garrs):
            state, cached = states.get(flat), self._views.get(flat)
            if (state is None or state.__class__ is not _State or not state.checked
                    or cached is None or cached[1] is not pv or pv.device[0] != "cpu"
                    or pv.framework not in ("numpy", "torch")):
                return
            p, pa = cached[0], pv.array
            numpy = numpy and type(p) is np.ndarray and pa is p
            torch = torch and pv.framework == "torch"
            expect[flat] = (p, tuple(pa.shape), pa.dtype, g.dtype, flat, state, pv, cached[2])
        # the calls as the next step's plan would split them (keys that differed may now be
        # equal: SGD's momentum buffer made for parameters skipped before)
        seen = set()
        for call in plan.calls:
            positions = range(len(garrs)) if call.positions is None else call.positions
            keys = {self._key(call.group, (flat, j, pv, states[flat]), garrs[k].dtype)
                    for k, (flat, j, pv, _) in zip(positions, call.items)}
            if len(keys) != 1 or (id(call.group), *keys) in seen:
                return
            seen.add((id(call.group), *keys))
        for call in plan.calls:
            if call.fresh:
                call.states = [states[item[0]] for item in call.items]
                call.fresh = False
        plan.groups, plan.expect, plan.numpy = tuple(self.param_groups), expect, numpy
        plan.torch = torch
        plan.state_dtype = self.state_dtype
        self._steady = plan

    def _group_checked(self, gi, group):
        """Check param group `gi` unless it was checked with the same hyperparameters (a
        check costs 10-20 us; the snapshot that tells 1-2)."""
        snapshot = self._group_snapshot(group)
        cached = self._checked_groups.get(gi)
        if snapshot is not None and cached is not None and cached[0] is group \
                and cached[1] == snapshot:
            return
        self._check_group(group, f"param_groups[{gi}]")
        snapshot = self._group_snapshot(group)  # after the check, which may normalize values
        if snapshot is None:
            self._checked_groups.pop(gi, None)
        else:
            self._checked_groups[gi] = (group, snapshot)

    def _group_snapshot(self, group):
        """What the group check depends on (_snapshot; with _checks_shapes, also the
        parameters' shapes)."""
        snapshot = _snapshot(group)
        if snapshot is not None and self._checks_shapes:
            snapshot += tuple(tuple(p.shape) for p in group["params"])
        return snapshot

    def _import_checked(self, i, p, state):
        """(view, changed): the checked view of parameter i, its state checked against it
        (the state then a checked _State), and whether what the step writes may have
        changed. The view is cached for the next steps where the framework is mutable; an
        immutable one (JAX, TensorFlow: a new array each step) is imported each step, its
        state checked again only if it changed or no longer fits the parameter's shape,
        dtype and device."""
        pv = self._import_param(p, i)
        mutable = pv.framework in _interop.MUTABLE
        fits = (pv.array.shape, pv.array.dtype, pv.device)
        recheck = state is not None and not (state.__class__ is _State
                                             and state.checked == fits)
        if recheck:
            self._check_state(i, pv, state)
        if mutable:
            self._views[i] = (p, pv, _interop.view_token(p, pv))
        else:
            self._views.pop(i, None)
        return pv, mutable or recheck

    def _import_param(self, p, i):
        """The checked kernel view of parameter i."""
        if self._leaves and p.requires_grad:
            p = p.detach()
        return _interop.import_param(p, "params", i)

    def _check_memory(self, plan, grads, changed):
        """Refuse a step (of `plan`, reading `grads`) whose parameters or state buffers
        share memory, or whose gradients overlap memory it writes (other than a gradient
        that is exactly its parameter).

        What a step writes (the parameters and state buffers) is worked out again only when
        a parameter or state was checked anew or other parameters are stepped; the
        gradients are new arrays each step and checked each step."""
        stepped = plan.stepped
        if changed or self._spans is None or (self._spans[0] is not stepped
                                              and self._spans[0] != stepped):
            written = [(_interop.extent(p), f"params[{i}]")
                       for i, p in enumerate(self.params())]
            for flat, _, pv, _ in plan.items:
                if pv.framework in _interop.MUTABLE:  # else written to a new buffer
                    written[flat] = (_interop.extent(pv.array), f"params[{flat}]")
                for name, buf in self.state.get(flat, {}).items():
                    if name not in self._state_numbers:
                        written.append((_interop.extent(buf), f"state[{flat}][{name!r}]"))
            spans = _interop.WrittenSpans(written, [f"params[{i}]" for i in stepped])
            if spans.clash is not None:
                raise ValueError(_SHARED.format(*spans.clash))
            self._spans = (stepped, spans)
        spans = self._spans[1]
        k = spans.first_bad_read(grads, plan.device == "cpu")
        if k is not None:
            owner = spans.overlapped(_interop.extent(grads[k]), spans.allowed_names[k])
            raise ValueError(_SHARED.format(f"grads[{stepped[k]}]", owner))

    @staticmethod
    def _pair_error(i, pv, gv, first):
        f_i, f_fw, f_dev = first
        for name, view in ((f"params[{i}]", pv), (f"grads[{i}]", gv)):
            if view.framework != f_fw:
                raise TypeError(f"{name} is a {view.framework} array but params[{f_i}] is a "
                                f"{f_fw} array; pass parameters and gradients of one framework")
            if view.device != f_dev:
                raise ValueError(f"{name} is on {view.device[0]}:{view.device[1]} but "
                                 f"params[{f_i}] is on {f_dev[0]}:{f_dev[1]}; put all "
                                 f"parameters and gradients on one device")
        p, g = pv.array, gv.array
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}]: shape {tuple(g.shape)} does not match params[{i}] "
                             f"shape {tuple(p.shape)}")
        raise TypeError(f"grads[{i}]: dtype {g.dtype} does not match params[{i}] dtype {p.dtype}"
                        + ("; a bfloat16/float16 parameter also takes float32 gradients"
                           if p.dtype.itemsize == 2 else ""))

    def _check_state(self, i, pv, state):
        """Check the state of parameter i (view pv) as a loaded one is checked: known keys,
        step counts and numbers in range, and arrays the kernels can write for it (of the
        kernels' array type, on its device, of its dtype and their shape, C-contiguous,
        writable). Leaves it a _State, checked for the parameter's shape, dtype and device."""
        where = f"state[{i}]"
        if not isinstance(state, dict):
            raise TypeError(f"{where}: expected a dict, got {type(state).__name__}")
        p = pv.array
        shapes = self._array_shapes(p)
        known_numbers = self._numbers(p.dtype)
        numbers_ = {}
        for key, value in state.items():
            kind = known_numbers.get(key)
            if kind is not None:
                numbers_[key] = _state_number(kind, value, f"{where}[{key!r}]")
            elif key not in shapes:
                raise ValueError(f"{where}: unknown key {key!r} for {type(self).__name__} "
                                 f"and parameter shape {tuple(p.shape)}; expected some of "
                                 f"{sorted(set(shapes) | set(known_numbers))}")
            else:
                _check_buffer(value, pv, shapes[key],
                              self._buffer_dtype(key, p.dtype, p.size), f"{where}[{key!r}]")
        if state.__class__ is not _State:
            state = self.state[i] = _State(state)
        dict.update(state, numbers_)  # the numbers as int and float
        state.checked = (p.shape, p.dtype, pv.device)

    def _stage(self, kernel, call, grads, n_threads, grad, fuse_ema=False):
        """The first half of a kernel call (`call`, a _Call of the step's plan, reading
        `grads`): the rule's bookkeeping (state created, step counts advanced, arguments
        made), so that a failure there leaves every parameter as it was. Returns (call,
        bucket): the kernel call, ready to run, and the bucket: (items, their states (a
        _Bucket, which _undo takes back), group, output arrays). `fuse_ema`: the kernel
        takes the weight EMA (``ema=``), which it then gets when every parameter of the
        bucket has one and nothing is stored in a low-precision format."""
        bucket, group, params = call.items, call.group, call.params
        out = params if call.mutable else [
            pv.array if pv.framework in _interop.MUTABLE else _interop.empty_like(pv.array)
            for _, _, pv, _ in bucket]
        states = _Bucket(call.states)
        states.undo = []
        states.ema = False
        states.mutable = call.mutable
        if call.fresh:  # the first step of some parameters: their state made here
            for k, (flat, *_) in enumerate(bucket):
                if states[k] is None:
                    state = states[k] = self.state[flat] = _State()
                    state.checked = True
        dtype = params[0].dtype
        states.dtype = state_dtype = self._state_dtype(dtype, params[0].size)
        master = self._has_master(dtype)
        calls = []
        try:
            if master:  # the kernels update the float32 copies; the parameters get them rounded
                shadow = out
                params = out = _ensure_master(states, params)
            rounds = dtype.itemsize == 2 or state_dtype.itemsize == 2
            if rounds and self.stochastic_rounding and "step" not in self._state_scalars:
                advance_step(states)  # the step count of the random bits
            self._update(lambda *args, **kwargs: calls.append((args, kwargs)), group, params,
                         out, grads, states, n_threads, grad)
        except BaseException:
            self._undo([(None, (bucket, states, group, out))])
            raise
        (args, kwargs), = calls
        if master or grads[0].dtype != compute_dtype(dtype) or rounds or state_dtype == _U8:
            kwargs["formats"] = self._formats(bucket, args, states, master)
            if master:
                kwargs["shadow"] = out = shadow
        elif fuse_ema and all(EMA in state for state in states):
            kwargs["ema"] = ([state[EMA] for state in states], self.ema_decay)
            states.ema = True
        return functools.partial(kernel, *args, **kwargs), (bucket, states, group, out)

    def _formats(self, bucket, args, states, master):
        """How the operands of a kernel call are stored (fastopt._backends._formats):
        `args` are the call's (params, out, grads, state lists...)."""
        codes, scales = [], []
        for arrays in args:
            if arrays is None:
                continue
            like = next((a for a in arrays if a is not None), None)
            if like is None:
                codes.append(_formats.F32)
            elif like.dtype == _U8:  # 8-bit state: codes, and the block scales beside them
                name = next(key for key, value in states[0].items() if value is arrays[0])
                codes.append(_q8_code(name))
                scales.append([state[name + ABSMAX] for state in states])
            else:
                codes.append(_formats.code_of(like.dtype))
        if master:
            codes.append(_formats.code_of(bucket[0][2].array.dtype))
        keys = np.empty((len(bucket), 2), np.uint32)
        for t, item in enumerate(bucket):
            key = self._keys.get(item[0])
            if key is None:
                key = self._keys[item[0]] = _formats.tensor_key(self.seed, item[0])
            keys[t] = key
        return _formats.Formats(tuple(codes), self.stochastic_rounding,
                                states[0].get("step", 0), keys, master, tuple(scales))

    def _undo(self, staged):
        """Take back the bookkeeping of staged kernel calls (see _Bucket)."""
        for _, (bucket, states, _, _) in reversed(staged):
            _undo(states)
            for (flat, *_), state in zip(bucket, states):
                if not state:
                    del self.state[flat]

    def _finish(self, staged):
        """After the kernel calls: hand new arrays to immutable frameworks; note new state
        buffers (memory the next step writes)."""
        for _, (bucket, states, group, out) in staged:
            if any(isinstance(before, list) for _, before in states.undo):
                # new buffers: memory the next steps write, and state that may change how
                # a new plan splits the calls (SGD's momentum buffer): _keep checks anew
                self._spans = self._steady = None
            if states.mutable:
                continue
            for (_, j, pv, *_), result in zip(bucket, out):
                if pv.framework not in _interop.MUTABLE:
                    group["params"][j] = _interop.export(result, pv.framework)

    def _update_ema(self, staged, n_threads):
        """After the update: each stepped parameter's average moved toward its new value
        (of the master weights, if any), or made a copy of it after its first step."""
        for _, (bucket, states, _, out) in staged:
            if states.ema:  # moved by the kernel call
                continue
            averages, values, flats = [], [], []
            for (flat, *_), state, o in zip(bucket, states, out):
                value = state[MASTER] if MASTER in state else _formats.load(
                    o, _formats.code_of(o.dtype))
                if EMA in state:
                    averages.append(state[EMA])
                    values.append(value)
                    flats.append(flat)
                else:
                    dict.__setitem__(state, EMA, _interop.copy_to_like(value, value))
                    self._spans = None  # memory the next steps write
            if averages:
                masks = ([self._masks[flat] for flat in flats]
                         if flats[0] in self._masks else None)
                _backends.resolve("ema_update", self.backend, bucket[0][2].device[0],
                                  averages[0].dtype)(averages, values, decay=self.ema_decay,
                                                     n_threads=n_threads, masks=masks)

    def _scratch_like(self, states, params):
        """One scratch buffer per parameter, in the compute dtype, kept between steps
        (two-pass rules such as Lamb write their update there before scaling it per
        tensor)."""
        buffers = []
        for state, p in zip(states, params):
            buf = self._scratch.get(id(state))
            dtype = compute_dtype(p.dtype)
            if (buf is None or buf.shape != p.shape or buf.dtype != dtype
                    or type(buf) is not type(p)):
                buf = self._scratch[id(state)] = _interop.empty_like(p, dtype=dtype)
            buffers.append(buf)
        return buffers

    def _caution(self, group, states, params):
        """The kernel's ``caution=`` when the group is cautious, else None: a function
        returning the cautious step's scratch arrays (made on first use and kept: a
        backend that counts in its pass needs none)."""
        if not group["cautious"]:
            return None
        return functools.partial(self._scratch_like, states, params)

    def _check_group(self, group, where):
        raise NotImplementedError

    def _bucket_key(self, group, state):
        return state.get("step", 0)  # rules whose host scalars depend on the step count

    def _op_of(self, group):
        """The registry operation that updates `group` (Muon's AdamW groups run another)."""
        return self._op

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        raise NotImplementedError
