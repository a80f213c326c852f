"""fastopt's optimizers as ``torch.optim`` optimizers: change one import, keep the loop.

>>> import torch
>>> from fastopt.torch import AdamW
>>> model = torch.nn.Linear(4, 2)
>>> opt = AdamW(model.parameters(), lr=1e-3)
>>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
>>> model(torch.ones(3, 4)).sum().backward()
>>> opt.step(); opt.zero_grad(); sched.step()

Every rule of the table has a class here, a subclass of ``torch.optim.Optimizer``
with torch's argument names and defaults (plus fastopt's keyword options), so that
``torch.optim.lr_scheduler``, ``torch.amp.GradScaler``, ``state_dict`` checkpoints,
DistributedDataParallel and ``ZeroRedundancyOptimizer`` drive it as they drive torch's own.
Each step runs the array API's kernels (:class:`fastopt.AdamW`, ...) on the parameters'
memory in place: one native call per param group, dtype and step count.

State lives twice over the same memory: ``opt.state[p]`` holds torch tensors (what torch
code reads, writes and saves) and the kernels hold NumPy/CuPy views of them. State written
through torch (a loaded checkpoint, ``ZeroRedundancyOptimizer``, an assignment) is taken in
at the next step: floating tensors are cast to the optimizer's state dtype (as torch casts
them to the parameter's), step counts become Python numbers. ``state_dict()`` gives them
back in torch's form (``step`` as a float32 tensor).
"""

import inspect
import itertools
import re
import weakref
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from torch.optim import optimizer as _optimizer

from fastopt import _interop, _rules
from fastopt import optim as _optim
from fastopt.optim import _base

# torch's arguments that choose among its implementations: accepted (and kept in the param
# groups, so checkpoints carry torch's keys) where torch's class has them; fastopt always
# runs its own fused passes. capturable (CUDA graphs) and differentiable (autograd through
# the step) are refused when set.
_IMPLEMENTATION = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
_REFUSED = ("capturable", "differentiable")

# fastopt's keyword options, passed to the array API's optimizer (fastopt.optim.Optimizer)
_OPTION_PARAMETERS = [p for p in inspect.signature(_optim.Optimizer.__init__).parameters.values()
                      if p.kind is p.KEYWORD_ONLY]
OPTIONS = tuple(p.name for p in _OPTION_PARAMETERS)

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "uint8": torch.uint8}


def _to_torch(arr):
    """The torch tensor over a kernel buffer's memory (NumPy: CPU; CuPy: CUDA)."""
    if isinstance(arr, np.ndarray):
        if arr.dtype.name == "bfloat16":  # ml_dtypes': no NumPy DLPack code
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)
    return torch.from_dlpack(arr)


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed
    DTensor = None


def _local(t):
    """The local tensor of a DTensor (FSDP2's sharded parameters and gradients), else t.
    Its ``_local_tensor``: the same object at every step, where ``to_local()`` makes a new
    view of a parameter's each time (and the kernels would check it again each step)."""
    if DTensor is not None and isinstance(t, DTensor):
        local = getattr(t, "_local_tensor", None)
        if local is None:
            with torch.no_grad():
                local = t.to_local()
        return local
    return t


def _like_param(t, p):
    """Tensor t (the memory of a state array of parameter p's local tensor) as the state
    torch keeps: a DTensor of p's mesh and placements for a DTensor p."""
    if DTensor is not None and isinstance(p, DTensor):
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return t


def _sharding(params, kernels):
    """For DTensor parameters (FSDP2's ``fully_shard``): (their local tensors, the
    all-reduce of the gradient norm's partial totals over the mesh dimensions they are
    sharded along, or None where no norm is taken); None without DTensors.

    Refused, naming why: rules whose per-tensor factors or norms each shard cannot compute
    alone (Adafactor, Lamb), 8-bit state (its block scales are not sharded like the
    parameter), and a norm over parameters that are not all DTensors of one mesh and
    placements (the partial sums must be reduced exactly once)."""
    if DTensor is None or not any(isinstance(p, DTensor) for p in params):
        return None
    name = type(kernels).__name__
    if kernels._rule.driver is not None:
        raise TypeError(f"{name} with DTensor parameters (FSDP2) is not supported: its "
                        f"per-tensor factors and norms need the whole tensor; use an "
                        f"elementwise rule (AdamW, ...) there")
    if kernels.state_dtype == "int8":
        raise TypeError("state_dtype='int8' with DTensor parameters (FSDP2) is not "
                        "supported: the block scales are not sharded like the parameter; "
                        "use 'bfloat16' or 'float32'")
    locals_ = [_local(p) for p in params]
    if kernels.max_grad_norm is None and not kernels.skip_nonfinite:
        return locals_, None
    layouts = {(p.device_mesh, p.placements) if isinstance(p, DTensor) else None
               for p in params}
    if len(layouts) != 1 or None in layouts:
        raise ValueError("max_grad_norm / skip_nonfinite with DTensor parameters: every "
                         "parameter must be a DTensor of one mesh and placements (as "
                         "fully_shard makes them), so that the norm's partial sums are "
                         "reduced once")
    (mesh, placements), = layouts
    groups = [mesh.get_group(d) for d, placement in enumerate(placements)
              if placement.is_shard()]

    def reduce(total, kind):
        t = torch.tensor([total], dtype=torch.float64, device=mesh.device_type)
        op = torch.distributed.ReduceOp.MAX if kind == 0 else torch.distributed.ReduceOp.SUM
        for group in groups:
            torch.distributed.all_reduce(t, op=op, group=group)
        return t.item()

    return locals_, reduce


def _to_kernel(t):
    """The kernel view (NumPy or CuPy) of a contiguous torch tensor's memory."""
    t = t.detach()
    if t.is_cuda:
        import cupy
        return cupy.from_dlpack(t)
    if t.dtype == torch.bfloat16:
        from fastopt._interop import bfloat16
        return t.view(torch.int16).numpy().view(bfloat16())
    return t.numpy()


class _Entry(_base._State):
    """One parameter's state as torch sees it (``opt.state[p]``): torch tensors over the
    memory of the kernels' buffers, and numbers. ``kernel``: the kernels' state of the same
    buffers (a fastopt.optim _State). ``checked`` turns False when anything is written
    through the dict; the next step then takes the entry in again."""

    kernel = None
    owner = None  # (handle of the optimizer, flat index of the parameter) it was made for

    def __reduce_ex__(self, protocol):  # copy, deepcopy, pickle: a plain dict of tensors
        return dict, (dict(self),)


def _noting(name):
    method = getattr(defaultdict, name)

    def changed(self, *args, **kwargs):
        self.version += 1
        return method(self, *args, **kwargs)
    changed.__name__ = name
    return changed


class _StateTable(defaultdict):
    """``opt.state``: torch's defaultdict(dict), counting the changes made to it
    (``version``), so that a step looks its entries up again only after one."""

    version = 0


for _name in ("__setitem__", "__delitem__", "__ior__", "update", "setdefault", "pop",
              "popitem", "clear"):
    setattr(_StateTable, _name, _noting(_name))


class Optimizer(torch.optim.Optimizer):
    """Base class of fastopt.torch's optimizers: a ``torch.optim.Optimizer`` whose step
    runs the array API's optimizer of the same rule (``_kernels_cls``).

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        defaults: the hyperparameters (the rule's and torch's implementation flags).
        options: the other arguments of the array API's optimizer: fastopt's keyword
            options (see :class:`fastopt.optim.Optimizer`) and arguments that are no group
            key (ADOPT's ``clip_lambda``).

    After each step, ``last_step_skipped`` and ``last_grad_norm`` are as in
    :class:`fastopt.optim.Optimizer`.
    """

    _kernels_cls = None  # the array API's optimizer of the rule
    _hyper = ()  # its hyperparameters: the param-group keys its kernels read
    # GradScaler hands over grad_scale and found_inf instead of unscaling the gradients:
    # the unscale rides on the update pass (and on the norm pass of max_grad_norm)
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, options):
        for key in _REFUSED:
            if defaults.get(key):
                raise ValueError(f"{key}=True is not supported by fastopt.torch; leave it False")
        self._options = {k: v for k, v in options.items() if k != "masks"}
        self._kernels = None  # the array API's optimizer, built from the param groups
        # (group, its params list, its parameters) of each group the kernels were built for
        self._layout = None
        self._flat = []  # the parameters, flattened over groups
        self._entries = []  # their state entries (or None) as of the last step
        self._seen = None  # (state table, its version) after the last step
        # for DTensor parameters: (their local tensors, the norm's all-reduce)
        self._sharded = None
        self._mask_of = {}
        self._handle = next(_HANDLES)  # names the optimizer to the compiled op
        _LIVE[self._handle] = self
        super().__init__(params, defaults)
        self.state = _StateTable(dict)
        if options.get("masks") is not None:
            self.set_masks(options["masks"])

    # -- param groups ---------------------------------------------------------------------

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, with fastopt's checks of the hyperparameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for key in _REFUSED:
                if group.get(key):
                    raise ValueError(f"param_groups[{len(self.param_groups) - 1}]: {key}=True "
                                     f"is not supported by fastopt.torch; leave it False")
            if self._kernels is None or self._layout is None:
                self._build()
            else:
                self._kernels.add_param_group(self._projection(group))
                self._layout = None  # rebuilt at the next step
        except BaseException:
            self.param_groups.pop()
            self._layout = None
            raise

    def _projection(self, group):
        """The param group as the array API's optimizer takes it: its hyperparameters, and
        the parameters' local tensors (those of FSDP2's DTensors)."""
        projected = {key: group[key] for key in self._hyper}
        projected["params"] = [_local(p) for p in group["params"]]
        return projected

    def _build(self):
        """(Re)build the array API's optimizer for the current param groups; its state is
        taken from ``self.state`` at the next step."""
        groups = self.param_groups
        self._flat = [p for group in groups for p in group["params"]]
        kernels = self._kernels_cls([self._projection(g) for g in groups], **self._options)
        kernels._leaves = True
        self._sharded = _sharding(self._flat, kernels)
        if self._sharded is not None:
            kernels._norm_reduce = self._sharded[1]
        if self._mask_of:
            kernels.set_masks([self._mask_of.get(p) for p in self._flat])
        self._kernels = kernels
        self._layout = tuple((g, g["params"], tuple(g["params"])) for g in groups)
        self._seen = None

    def _current(self):
        """The array API's optimizer, rebuilt if the param groups changed."""
        layout, groups = self._layout, self.param_groups
        if (layout is None or len(layout) != len(groups)
                or any(g is not lg or g["params"] is not lp or len(lp) != len(ps)
                       or any(p is not q for p, q in zip(lp, ps))
                       for g, (lg, lp, ps) in zip(groups, layout))
                or self._sharded is not None and any(
                    _local(p) is not q for p, q in zip(self._flat, self._sharded[0]))):
            self._build()
        return self._kernels

    def set_masks(self, masks):
        """Pruning masks, one per parameter (flattened over groups; None for an unpruned
        one), as :meth:`fastopt.optim.Optimizer.set_masks`; None removes them."""
        kernels = self._current()
        kernels.set_masks(masks)
        self._mask_of = {} if masks is None else {
            p: m for p, m in zip(self._flat, masks) if m is not None}

    @property
    def last_step_skipped(self):
        return self._current().last_step_skipped

    @property
    def last_grad_norm(self):
        return self._current().last_grad_norm

    # -- the step -------------------------------------------------------------------------

    def step(self, *args, **kwargs):
        """``step(closure=None)``: one update of every parameter that has a ``.grad``
        (others are skipped), with torch's step hooks.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).

        Returns the closure's loss, or None.
        """
        # torch's profile_hook_step, without its record_function (20 us a step) unless the
        # profiler is on
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function(
                    f"Optimizer.step#{type(self).__name__}.step"):
                return self._hooked_step(args, kwargs)
        return self._hooked_step(args, kwargs)

    step.hooked = True  # torch.optim.Optimizer wraps step functions without it

    def _hooked_step(self, args, kwargs):
        args = (self,) + args
        for hook in (*_optimizer._global_optimizer_pre_hooks.values(),
                     *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or a tuple "
                                       f"(new_args, new_kwargs), got {result!r}")
                args, kwargs = result
        out = self._step_once(*args[1:], **kwargs)
        self._optimizer_step_code()
        for hook in (*self._optimizer_step_post_hooks.values(),
                     *_optimizer._global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    def _step_once(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            # one opaque op in the graph: it reads the hyperparameters when it runs (a
            # learning rate changed between steps recompiles once: dynamo's float guard)
            params = [p for group in self.param_groups for p in group["params"]]
            torch.ops.fastopt.step(self._handle, params, [p.grad for p in params])
        else:
            self._run()
        return loss

    def _run(self, params=None, grads=None):
        """The step, eagerly; `params` and `grads` (flattened over groups), where given, are
        the tensors to update and read in place of the parameters and their ``.grad`` (the
        compiled op's arguments, which may be other tensors over the same memory)."""
        kernels = self._take_in()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is not None and float(found_inf) != 0.0:
            # torch's fused optimizers skip the whole step
            kernels.last_step_skipped, kernels.last_grad_norm = True, None
            return
        grad_scale = getattr(self, "grad_scale", None)
        own = params is None
        if own:
            params, grads = self._flat, [p.grad for p in self._flat]
        if self._sharded is not None:
            grads = [None if g is None else _local(g) for g in grads]
        if not own:
            self._point(kernels, params)
        try:
            with kernels._lock:
                kernels._step(grads, 1.0 if grad_scale is None else 1.0 / float(grad_scale))
        finally:
            if not own:
                self._point(kernels, self._flat)
        self._give_out(kernels, grads)
        self._give_back_groups(kernels)
        # as torch's in-place updates do: autograd refuses a backward through a graph that
        # saved a parameter's old value
        stepped = [_local(p) for p, g in zip(params, grads) if g is not None]
        if stepped:
            torch.autograd.graph.increment_version(stepped)

    def _give_back_groups(self, kernels):
        """The param-group keys the rule updates itself (Prodigy's d), into torch's groups."""
        for key in kernels._group_state:
            for group, projected in zip(self.param_groups, kernels.param_groups):
                group[key] = projected[key]

    @staticmethod
    def _point(kernels, params):
        """Point the array API's groups at `params` (flattened; their local tensors)."""
        flat = 0
        for projected in kernels.param_groups:
            views = projected["params"]
            for j in range(len(views)):
                views[j] = _local(params[flat])
                flat += 1

    def _take_in(self):
        """The array API's optimizer with the param groups' current hyperparameters (which
        schedulers change) and the state as torch code left it."""
        kernels = self._current()
        for group, projected in zip(self.param_groups, kernels.param_groups):
            for key in self._hyper:
                projected[key] = group[key]
        state = self.state
        if not isinstance(state, _StateTable):  # replaced: opt.state = defaultdict(dict)
            state = self.state = _StateTable(dict, state)
        # nothing written through torch since the last step: no entry to look up again
        if (self._seen is not None and self._seen[0] is state
                and self._seen[1] == state.version
                and all(entry is None or entry.checked for entry in self._entries)):
            return kernels
        kernel_state, entries = kernels.state, []
        for i, p in enumerate(self._flat):
            entry = dict.get(state, p)
            if entry is None:
                kernel_state.pop(i, None)
            elif (entry.__class__ is _Entry and entry.checked
                  and entry.owner == (self._handle, i)):
                if kernel_state.get(i) is not entry.kernel:
                    kernel_state[i] = entry.kernel
            else:
                entry = state[p] = self._adopt(kernels, entry, p, i)
                kernel_state[i] = entry.kernel
            entries.append(entry)
        self._entries = entries
        self._seen = (state, state.version)
        return kernels

    def _adopt(self, kernels, entry, p, i):
        """A state entry written by torch code as an _Entry: numbers as Python numbers,
        floating tensors in the optimizer's state dtype on the parameter's device,
        contiguous (copied only where one of these needs it). The kernels check it at the
        step."""
        if not isinstance(entry, dict):
            raise TypeError(f"state[{i}]: expected a dict, got {type(entry).__name__}")
        view = kernels._import_param(_local(p), i).array
        numbers = kernels._numbers(view.dtype)
        kernel_state = _base._State()
        for key, value in entry.items():
            if key in numbers:
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = value.item()
                dict.__setitem__(kernel_state, key, value)
                continue
            if isinstance(value, torch.Tensor):
                value = _local(value)
                dtype = _TORCH_DTYPES[kernels._buffer_dtype(key, view.dtype, view.size).name]
                if value.is_floating_point() and dtype.is_floating_point:
                    value = value.to(dtype=dtype)
                value = value.detach().to(device=_local(p).device).contiguous()
                value = _to_kernel(value)
            dict.__setitem__(kernel_state, key, value)  # anything else: the kernels refuse it
        return self._entry(kernel_state, numbers, p, (self._handle, i))

    def _give_out(self, kernels, grads):
        """After a step: torch's view of new state buffers, and the new step counts."""
        state, kernel_state, entries = self.state, kernels.state, self._entries
        numbers = kernels._state_numbers
        setitem = dict.__setitem__
        for i, (entry, g) in enumerate(zip(entries, grads)):
            if g is None:
                continue
            # the kernels replace no state they were given; they add buffers to it, or
            # create the state of a parameter stepped for the first time (or again, after a
            # failed first step took back the one they had made)
            ks = kernel_state.get(i)
            if ks is None:
                continue
            if entry is not None and entry.kernel is ks and len(entry) == len(ks):
                for key in numbers:
                    if key in ks:
                        setitem(entry, key, ks[key])
            else:
                p = self._flat[i]
                state[p] = entries[i] = self._entry(ks, numbers, p, (self._handle, i))
        self._seen = (state, state.version)

    @staticmethod
    def _entry(kernel_state, numbers, p, owner):
        """The _Entry of parameter p over `kernel_state` (arrays of p's local tensor), of
        `owner` (the optimizer's handle, p's flat index)."""
        entry = _Entry()
        for key, value in kernel_state.items():
            if key not in numbers and _interop.framework_of(value) is not None:
                value = _to_torch(value)
                if value.shape == _local(p).shape:  # not 8-bit state's block scales
                    value = _like_param(value, p)
            dict.__setitem__(entry, key, value)
        entry.kernel, entry.checked, entry.owner = kernel_state, True, owner
        return entry

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self):
        """torch's ``state_dict()``: ``{"state": {index: {...}}, "param_groups": [...]}``,
        the state tensors the optimizer's own (not copies), step counts as float32 tensors
        as torch keeps them, other numbers (NAdam's ``mu_product``, which torch keeps in
        float32) as float64 tensors that hold fastopt's value exactly. The state dict hooks
        run as in torch; the post-hooks see the tensors."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = type(post_hooks)()
        try:
            saved = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        numbers = self._kernels_cls._state_numbers
        saved["state"] = {
            index: {key: (torch.tensor(float(value), dtype=torch.float32) if key == "step"
                          else torch.tensor(value, dtype=torch.float64) if key in numbers
                          else value)
                    for key, value in entry.items()}
            for index, entry in saved["state"].items()}
        for hook in post_hooks.values():
            result = hook(self, saved)
            if result is not None:
                saved = result
        return saved

    def load_state_dict(self, state_dict):
        """Load a ``state_dict()`` of this rule, of fastopt.torch or of torch.optim, by copy.

        As torch: hyperparameters come from it, saved indices map to the parameters in
        order, load hooks run. Floating state is cast to the optimizer's state dtype (float32
        state of bfloat16 parameters stays float32), checked and copied before anything
        changes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()  # as torch: the hooks may change this one
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict: expected a dict with keys 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                for g in saved_groups):
            raise TypeError("state_dict['param_groups']: expected a list of dicts, each with a "
                            "list of parameter indices under 'params'")
        if not isinstance(saved_state, dict):
            raise TypeError(f"state_dict['state']: expected a dict, got "
                            f"{type(saved_state).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict: has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        kernels = self._current()
        groups, param_of = [], {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{gi}]"
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: holds {len(saved['params'])} parameters, the "
                                 f"optimizer's group {len(group['params'])}")
            for key in _REFUSED:
                if saved.get(key):
                    raise ValueError(f"{where}: {key}=True is not supported by fastopt.torch")
            if len(set(saved["params"]) | set(param_of)) != len(param_of) + len(saved["params"]):
                raise ValueError(f"{where}['params']: parameter indices appear more than once")
            new = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new["param_names"] = group["param_names"]
            kernels._check_group(self._projection(new), where)
            groups.append(new)
            param_of.update(zip(saved["params"], group["params"]))
        state = {}
        flat_index = {id(p): i for i, p in enumerate(self._flat)}
        for index, entry in saved_state.items():
            where = f"state_dict['state'][{index!r}]"
            if index not in param_of:
                raise ValueError(f"{where}: no parameter has this index")
            p = param_of[index]
            i = flat_index[id(p)]
            adopted = self._adopt(kernels, entry, p, i)
            gi = next(g for g, end in enumerate(_base._group_ends(groups)) if i < end)
            loaded = kernels._load_state_entry(dict(adopted.kernel),
                                               kernels._import_param(_local(p), i).array,
                                               self._projection(groups[gi]),
                                               self._projection(groups[0]), where)
            if loaded:
                state[p] = self._entry(loaded, kernels._state_numbers, p, (self._handle, i))
        self.__setstate__({"state": _StateTable(dict, state), "param_groups": groups})
        self._layout = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        state = super().__getstate__()
        state.update(_options=self._options, _mask_of=self._mask_of)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_options", {})
        self.__dict__.setdefault("_mask_of", {})
        if not isinstance(self.state, _StateTable):
            self.state = _StateTable(dict, self.state)
        self._kernels, self._layout, self._flat, self._seen = None, None, [], None
        self._sharded = None
        if "_handle" not in self.__dict__:  # unpickled or copied: a handle of its own
            self._handle = next(_HANDLES)
            _LIVE[self._handle] = self
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


_LIVE = weakref.WeakValueDictionary()  # handle -> optimizer, for the compiled op
_HANDLES = itertools.count()


@torch.library.custom_op("fastopt::step", mutates_args=("params",))
def _compiled_step(handle: int, params: list[torch.Tensor],
                   grads: list[Optional[torch.Tensor]]) -> None:
    """A fastopt.torch optimizer's step as one operator for torch.compile: opaque to the
    compiler, it runs the eager step (reading the hyperparameters and state as they are),
    writing `params` and the state in place."""
    _LIVE[handle]._run(params, grads)


@_compiled_step.register_fake
def _(handle, params, grads):
    return None


def _doc(rule, kernels_cls, torch_keys):
    summary, _, rest = (kernels_cls.__doc__ or "").partition("\n")
    rest = rest.split("    Example:")[0].rstrip()
    # the array API's cross-references (:class:`Adam`) point at fastopt's classes
    rest = re.sub(r":class:`(?!fastopt\.)(\w+)`", r":class:`fastopt.\1`", rest)
    flags = ""
    if torch_keys:
        flags = (f"\n\n    torch's {', '.join(f'``{k}``' for k in torch_keys)} are accepted "
                 f"(``capturable`` and ``differentiable`` only as False) and kept in the "
                 f"param groups; fastopt always runs its own fused passes.")
    return (f"{summary}\n\n    A ``torch.optim.Optimizer`` running the kernels of "
            f":class:`fastopt.{rule.name}` on the parameters in place: schedulers, "
            f"``GradScaler``, checkpoints and ``torch.distributed`` drive it as they drive "
            f"torch's optimizers.{flags}\n{rest}\n")


_MODES = ("train", "eval")  # methods that move the parameters between a rule's two points


def _mode_switch(mode, method):
    def switch(self):
        kernels = self._take_in()
        method(kernels)
        self._give_back_groups(kernels)
        # the parameters changed in place, as a torch.optim step changes them
        torch.autograd.graph.increment_version([_local(p) for p in self._flat])

    switch.__name__ = switch.__qualname__ = mode
    switch.__doc__ = method.__doc__.replace(" Returns ``self.params()``.", "")
    return switch


def _make(rule):
    """The fastopt.torch class of a rule of the table."""
    kernels_cls = getattr(_optim, rule.name)
    parameters = [p for name, p in inspect.signature(kernels_cls.__init__).parameters.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("self", "params")]
    # the param-group keys; the other arguments (ADOPT's clip_lambda) are the optimizer's
    hyper = tuple(kernels_cls([np.zeros((1, 1))]).defaults)  # a matrix: any rule takes it
    torch_keys, fixed = (), {}
    if rule.reference.startswith("torch.optim."):
        torch_cls = getattr(torch.optim, rule.reference.removeprefix("torch.optim."))
        torch_params = inspect.signature(torch_cls.__init__).parameters
        torch_keys = tuple(name for name in torch_params if name in _IMPLEMENTATION)
        # group keys torch's class sets without an argument (AdamW's decoupled_weight_decay)
        fixed = {k: v for k, v in torch_cls([torch.zeros(1)]).defaults.items()
                 if k not in hyper and k not in torch_keys}
        # torch's positional arguments in its order; the others keyword-only, as torch has
        # them (RMSprop(p, lr, alpha, eps, weight_decay, momentum, centered, capturable))
        positional = [name for name, p in torch_params.items()
                      if p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("self", "params")]
        by_name = {p.name: p for p in parameters}
        parameters = [by_name[name] if name in by_name else inspect.Parameter(
                          name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=_IMPLEMENTATION[name])
                      for name in positional] + [
            p.replace(kind=p.KEYWORD_ONLY) for p in parameters if p.name not in positional]
    parameters += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY,
                                     default=_IMPLEMENTATION[k])
                   for k in torch_keys if k not in [p.name for p in parameters]]
    arguments = inspect.Signature(parameters)
    # group keys that are no argument (Schedule-Free's train_mode, Prodigy's estimate)
    derived = [k for k in hyper if k not in arguments.parameters]

    def __init__(self, params, *args, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        try:
            bound = arguments.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{rule.name}: {e}; its arguments are {list(arguments.parameters)} "
                            f"and the options {list(OPTIONS)}") from None
        bound.apply_defaults()
        defaults = dict(bound.arguments)
        for key in set(defaults) - set(hyper) - set(torch_keys):
            options[key] = defaults.pop(key)
        defaults.update(fixed)
        if derived:  # as the array API's class sets them for these arguments (d = d0)
            made = kernels_cls([np.zeros((1, 1))], **{k: defaults[k] for k in hyper
                                                     if k in defaults}).defaults
            defaults.update((k, made[k]) for k in derived)
        Optimizer.__init__(self, params, defaults, options)

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + parameters
        + _OPTION_PARAMETERS)
    namespace = dict(__init__=__init__, __doc__=_doc(rule, kernels_cls, torch_keys),
                     __module__=__name__, __qualname__=rule.name,
                     _kernels_cls=kernels_cls, _hyper=hyper)
    for mode in _MODES:  # Schedule-Free's train() and eval()
        if hasattr(kernels_cls, mode):
            namespace[mode] = _mode_switch(mode, getattr(kernels_cls, mode))
    return type(rule.name, (Optimizer,), namespace)


for _rule in _rules.RULES:
    globals()[_rule.name] = _make(_rule)
del _rule

__all__ = ["Optimizer", "OPTIONS"] + [rule.name for rule in _rules.RULES]
