"""The machinery every optimizer shares: param groups, state, validation, dispatch.

A rule (SGD, Adam, ...) has a row in the rule table (fastopt._rules), found by its class
name, which gives the class its registry operation (``_op``), state arrays (``_state_keys``)
and state numbers (``_state_scalars``); the class supplies
- ``_check_group(group, where)``: hyperparameter checks, raising errors that name them,
- ``_bucket_key(group, state)``: what must be equal for params to share one kernel call
  (for example Adam's step count, or whether SGD's momentum buffer exists yet),
- ``_update(kernel, group, params, out, grads, states, n_threads, grad)``: one kernel call
  for a bucket, its state lists from ``ensure_state`` (which creates missing state);
  ``grad`` holds the gradient-clipping arguments every kernel takes (``grad_scale``,
  ``grad_clip``).

``step(grads)`` checks everything first (arrays, frameworks, devices, dtypes, shapes,
hyperparameters, backend), and only then creates state and runs the kernels, so a call that
raises leaves every parameter and state buffer as it was.
"""

import functools
import math
import numbers
import threading

import numpy as np

from fastopt import _backends, _interop, _rules
from fastopt._check import real
from fastopt._config import check_threads, get_num_threads
from fastopt.optim import _clip

# param-group keys that fastopt.schedules adds (initial_lr, ...): accepted in a loaded state
SCHEDULE_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"})


def check_real(group, key, where, **bounds):
    """group[key] as a float, if it is a finite real number within `bounds` (lo, hi,
    lo_open, hi_open of fastopt._check.real).

    A 0-d array of any framework (torch.tensor(0.01), np.float32 array) is accepted and
    stored back in the group as a Python float, the form the kernels' host scalars need."""
    value = group[key]
    if _interop.framework_of(value) is not None and getattr(value, "ndim", None) == 0:
        value = group[key] = float(value)
    return real(f"{where}: {key}", value, **bounds)


def check_bool(group, key, where):
    value = group[key]
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {key} must be True or False, got {value!r}")
    return value


def check_betas(group, where, *, closed=False):
    """group["betas"] as a tuple of two floats in [0, 1) (or [0, 1] with closed=True)."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    group["betas"] = tuple(
        check_real({f"betas[{k}]": beta}, f"betas[{k}]", where, lo=0.0, hi=1.0,
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
            ``grad_norm_type``, ``max_grad_value``, ``skip_nonfinite``, ``masks``; see
            :class:`fastopt.optim.Optimizer`."""


def ensure_state(states, name, likes, fill=0.0):
    """``state[name]`` of each state, created filled with `fill` and shaped like the
    parameter where missing: the list the kernel takes."""
    for state, like in zip(states, likes):
        if name not in state:
            state[name] = _interop.full_like(like, fill)
    return [state[name] for state in states]


MAX_STEP = 2**53  # step counts stay exact as the float64 the host scalars take them as


def _state_count(value, where):
    """A loaded step count as an int: an integer (Python's, NumPy's, or an integral float)
    in [0, MAX_STEP]."""
    # the range test comes first: it fails NaN, inf and 10**400 before int() could raise
    if isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and 0 <= value <= MAX_STEP and value == int(value):
        return int(value)
    raise ValueError(f"{where}: expected an integer >= 0 (at most {MAX_STEP}), got {value!r}")


def advance_step(states):
    """Count one more step in each state (the same count across a bucket); return it."""
    step = states[0].get("step", 0) + 1
    for state in states:
        state["step"] = step
    return step


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
            read a masked copy of the gradient), Lamb's and Adafactor's update norms. The
            Cython backend zeroes the pruned entries inside the update loop, the others
            right after each pass. Change the masks with ``set_masks``.

    After each step, ``last_step_skipped`` says whether it was skipped and
    ``last_grad_norm`` holds the gradients' total norm (None when nothing computed it).
    """

    _rule = None  # the rule's row of the table (set for each subclass named in it)
    _sums_gradients = False  # whether the rule sums gradients across entries (Adafactor)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        rule = _rules.BY_NAME.get(cls.__name__)
        if rule is not None and cls.__module__ == rule.module:
            cls._rule = rule
            cls._op = rule.op  # the registry operation
            cls._state_keys = rule.state  # the per-parameter state arrays
            cls._state_scalars = dict(rule.state_scalars)  # the per-parameter state numbers

    def __init__(self, params, defaults, *, backend="auto", n_threads=None, max_grad_norm=None,
                 grad_norm_type=2.0, max_grad_value=None, skip_nonfinite=False, masks=None):
        self.defaults = dict(defaults)
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
        self.state = {}  # flat parameter index -> {name: array or step count}
        # flat index -> (param, checked view, token): a mutable parameter whose view was
        # checked (also against its state) is not imported and checked again while the token
        # says it is the same memory; see _interop.view_still_valid
        self._views = {}
        self._scratch = {}  # id of a state dict -> scratch buffer like its parameter
        self._lock = threading.Lock()  # serializes step and load_state_dict
        if _interop.framework_of(params) is not None:
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
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks):
        """Set the pruning masks (see the class docstring; None removes them all): a list
        with one entry per parameter, flattened over groups. Checked before anything
        changes. Pruned entries become 0 at the next step; ``fastopt.prune.apply_mask_``
        zeroes them at once."""
        if masks is None:
            self._masks = {}
            return
        if _interop.framework_of(masks) is not None or isinstance(masks, (dict, set)):
            raise TypeError("masks: expected a list with one mask (or None) per parameter")
        masks = list(masks)
        params = self.params()
        if len(masks) != len(params):
            raise ValueError(f"masks: expected {len(params)} entries (one per parameter, "
                             f"flattened over param groups; None for an unpruned one), got "
                             f"{len(masks)}")
        views = {}
        for i, (mask, p) in enumerate(zip(masks, params)):
            if mask is None:
                continue
            view = _interop.import_input(mask, f"masks[{i}]", ("bool", "uint8"))
            pv = _interop._check_array(p, f"params[{i}]")
            if tuple(view.array.shape) != tuple(p.shape):
                raise ValueError(f"masks[{i}]: shape {tuple(view.array.shape)} does not match "
                                 f"params[{i}] shape {tuple(p.shape)}")
            if view.device != pv[1]:
                raise ValueError(f"masks[{i}] is on {view.device[0]}:{view.device[1]} but "
                                 f"params[{i}] is on {pv[1][0]}:{pv[1][1]}")
            views[i] = view.array.view(np.uint8)
        self._masks = views

    def __repr__(self):
        lines = [f"{type(self).__name__} (backend={self.backend!r})"]
        for i, group in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in group.items() if k != "params")
            lines.append(f"  param_groups[{i}]: {len(group['params'])} params, {hyper}")
        return "\n".join(lines)

    def add_param_group(self, param_group):
        """Add a group ``{"params": [...], **hyperparameters}``; missing ones take defaults."""
        where = f"param_groups[{len(self.param_groups)}]"
        if not isinstance(param_group, dict):
            raise TypeError(f"{where}: expected a dict with key 'params', got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"{where}: missing key 'params'")
        group = dict(param_group)
        params = group["params"]
        if _interop.framework_of(params) is not None:
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{where}: params must be an ordered list, not a set")
        group["params"] = params = list(params)
        for j, p in enumerate(params):
            if _interop.framework_of(p) is None:
                raise TypeError(f"{where}['params'][{j}]: expected an array, got "
                                f"{type(p).__name__}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, where)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or seen & {id(p) for p in params}:
            raise ValueError(f"{where}: some parameters appear more than once (in this group "
                             f"or another); each parameter may be given once")
        self.param_groups.append(group)

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
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

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
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        index_of = {}  # saved parameter id -> flat index
        new_groups = []
        flat = 0
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            gwhere = f"{where}['param_groups'][{gi}]"
            ids = list(saved.get("params", ()))
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
            new_groups.append(merged)
            for saved_id in ids:
                index_of[saved_id] = flat
                flat += 1
        params = self.params()
        new_state = {}
        for saved_id, entry in state_dict["state"].items():
            swhere = f"{where}['state'][{saved_id!r}]"
            if saved_id not in index_of:
                raise ValueError(f"{swhere}: no parameter has this index")
            i = index_of[saved_id]
            view = _interop.import_param(params[i], "params", i).array
            new_state[i] = self._load_state_entry(entry, view, swhere)
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self.state = new_state
        self._views.clear()
        self._scratch.clear()  # keyed by the state dicts just replaced

    def _state_shapes(self, param):
        """Name -> shape of the state arrays a parameter has; rules whose state is not
        shaped like the parameter (Adafactor's factors) override this."""
        return {name: tuple(param.shape) for name in self._state_keys}

    def _load_state_entry(self, entry, like, where):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a dict, got {type(entry).__name__}")
        shapes = self._state_shapes(like)
        known = set(shapes) | set(self._state_scalars)
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} for "
                             f"{type(self).__name__}; expected some of {sorted(known)}")
        loaded = {}
        for key, value in entry.items():
            kind = self._state_scalars.get(key)
            if kind is int:
                loaded[key] = _state_count(value, f"{where}[{key!r}]")
                continue
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                        or not math.isfinite(value):
                    raise ValueError(f"{where}[{key!r}]: expected a finite number, got {value!r}")
                loaded[key] = float(value)
                continue
            if tuple(value.shape) != shapes[key] or str(value.dtype) != str(like.dtype):
                raise ValueError(f"{where}[{key!r}]: shape {tuple(value.shape)} and dtype "
                                 f"{value.dtype} do not fit the parameter's "
                                 f"({shapes[key]}, {like.dtype}); parameter shape "
                                 f"{tuple(like.shape)}")
            loaded[key] = _interop.copy_to_like(value, like, shapes[key])
        return loaded

    def step(self, grads):
        """Apply one update with ``grads`` (one per parameter, flattened over groups, in
        order; ``None`` skips that parameter). Returns ``self.params()``.

        Steps of one optimizer called from several threads at once run one after the other
        (different optimizers run in parallel)."""
        with self._lock:
            return self._step(grads)

    def _step(self, grads):
        plan = self._prepare(grads)
        if self._masks and (self._sums_gradients or self.max_grad_norm is not None
                            or self.skip_nonfinite):
            plan = self._masked_grads(plan)
        n_threads = self.n_threads or get_num_threads()
        grad_args = self._grad_args(plan, n_threads)
        if grad_args is None:
            return self.params()
        for group, items, device in plan:
            buckets = {}
            for item in items:
                state = self.state.get(item[0])
                if state is None:
                    state = self.state[item[0]] = {}
                key = (item[2].array.dtype, item[0] in self._masks,
                       self._bucket_key(group, state))
                bucket = buckets.get(key)
                if bucket is None:
                    buckets[key] = [item]
                else:
                    bucket.append(item)
            for (dtype, masked, _), bucket in buckets.items():
                kernel = _backends.resolve(self._op, self.backend, device, dtype)
                if masked:
                    kernel = functools.partial(
                        kernel, masks=[self._masks[item[0]] for item in bucket])
                self._run_bucket(kernel, group, bucket, n_threads, grad_args[dtype])
        return self.params()

    def _masked_grads(self, plan):
        """The plan with each masked gradient replaced by a copy whose pruned entries are 0
        (for the norm and Adafactor's factors; the elementwise updates do not need it)."""
        masked = []
        for group, items, device in plan:
            new_items = []
            for flat, j, pv, gv in items:
                mask = self._masks.get(flat)
                if mask is not None:
                    g = gv.array
                    xp = _interop.array_module(g)
                    g = xp.where(mask.reshape(g.shape) != 0, g, xp.zeros((), g.dtype))
                    gv = gv._replace(array=g)
                new_items.append((flat, j, pv, gv))
            masked.append((group, new_items, device))
        return masked

    def _grad_args(self, plan, n_threads):
        """Per dtype, the gradient prologue's arguments (clip_grad_norm_'s coefficient and
        clip_grad_value_'s bound) for the kernels; None if the step is to be skipped."""
        self.last_step_skipped = False
        self.last_grad_norm = None
        by_dtype = {}
        for _, items, _ in plan:
            for item in items:
                by_dtype.setdefault(item[3].array.dtype, []).append(item[3].array)
        clip = math.inf if self.max_grad_value is None else self.max_grad_value
        args = {dtype: dict(grad_scale=1.0, grad_clip=clip) for dtype in by_dtype}
        if plan and (self.max_grad_norm is not None or self.skip_nonfinite):
            norm = _clip.total_norm(by_dtype, self._norm_kind, self.backend, plan[0][2],
                                    n_threads)
            self.last_grad_norm = norm
            if self.skip_nonfinite and not math.isfinite(norm):
                self.last_step_skipped = True
                return None
            if self.max_grad_norm is not None:
                for dtype in by_dtype:
                    args[dtype]["grad_scale"] = _clip.clip_coefficient(self.max_grad_norm,
                                                                       norm, dtype)
        return args

    # -- internals --------------------------------------------------------------------

    def _prepare(self, grads):
        """Check everything a step needs; write nothing. Returns (group, items, device)."""
        if _interop.framework_of(grads) is not None or isinstance(grads, (dict, set)):
            raise TypeError("grads: expected a list of arrays (one per parameter, None to skip)")
        grads = list(grads)
        n_params = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n_params:
            raise ValueError(f"grads: expected {n_params} arrays (one per parameter, flattened "
                             f"over param groups; None to skip one), got {len(grads)}")
        first = None  # (index, framework, device) of the first stepped parameter
        plan = []
        dtypes = set()
        flat = 0
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{gi}]")
            items = []
            for j, p in enumerate(group["params"]):
                g = grads[flat]
                if g is not None:
                    cached = self._views.get(flat)
                    fresh = not (cached is not None and cached[0] is p
                                 and _interop.view_still_valid(p, cached[1], cached[2]))
                    pv = _interop.import_param(p, "params", flat) if fresh else cached[1]
                    gv = _interop.import_grad(g, "grads", flat)
                    if first is None:
                        first = (flat, pv.framework, pv.device)
                    pa, ga = pv.array, gv.array
                    if (pv.framework != first[1] or gv.framework != first[1]
                            or pv.device != first[2] or gv.device != first[2]
                            or pa.shape != ga.shape or pa.dtype != ga.dtype):
                        self._pair_error(flat, pv, gv, first)
                    if fresh:
                        state = self.state.get(flat)
                        if state:
                            self._check_state(flat, pa, state)
                        if pv.framework in _interop.MUTABLE:
                            self._views[flat] = (p, pv, _interop.view_token(p, pv))
                    dtypes.add(pa.dtype)
                    items.append((flat, j, pv, gv))
                flat += 1
            if items:
                plan.append((group, items))
        if first is None:
            return []
        device = first[2][0]
        for dtype in dtypes:
            _backends.resolve(self._op, self.backend, device, dtype)
            if self.max_grad_norm is not None or self.skip_nonfinite:
                _backends.resolve("norm_partials", self.backend, device, dtype)
        return [(group, items, device) for group, items in plan]

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
        raise TypeError(f"grads[{i}]: dtype {g.dtype} does not match params[{i}] dtype {p.dtype}")

    def _check_state(self, i, p, state):
        # state buffers are created together: checking the first one present catches a
        # parameter replaced by one of another shape, dtype or device
        for name, shape in self._state_shapes(p).items():
            buf = state.get(name)
            if buf is not None:
                if buf.shape != shape or buf.dtype != p.dtype or type(buf) is not type(p):
                    raise ValueError(f"params[{i}]: shape {tuple(p.shape)}, dtype {p.dtype} no "
                                     f"longer matches its state {name!r} ({tuple(buf.shape)}, "
                                     f"{buf.dtype}, {type(buf).__module__}); was the parameter "
                                     f"replaced?")
                return

    def _run_bucket(self, kernel, group, bucket, n_threads, grad):
        params, out, grads, states = [], [], [], []
        for flat, _, pv, gv in bucket:
            params.append(pv.array)
            mutable = pv.framework in _interop.MUTABLE
            out.append(pv.array if mutable else _interop.empty_like(pv.array))
            grads.append(gv.array)
            states.append(self.state[flat])
        self._update(kernel, group, params, out, grads, states, n_threads, grad)
        for (_, j, pv, _), result in zip(bucket, out):
            if pv.framework not in _interop.MUTABLE:
                group["params"][j] = _interop.export(result, pv.framework)

    def _scratch_like(self, states, params):
        """One scratch buffer per parameter, kept between steps (two-pass rules such as Lamb
        write their update there before scaling it per tensor)."""
        buffers = []
        for state, p in zip(states, params):
            buf = self._scratch.get(id(state))
            if (buf is None or buf.shape != p.shape or buf.dtype != p.dtype
                    or type(buf) is not type(p)):
                buf = self._scratch[id(state)] = _interop.empty_like(p)
            buffers.append(buf)
        return buffers

    def _check_group(self, group, where):
        raise NotImplementedError

    def _bucket_key(self, group, state):
        return state.get("step", 0)  # rules whose host scalars depend on the step count

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        raise NotImplementedError
