"""Schedule-Free AdamW and SGD (Defazio et al. 2024), as the authors' reference."""

from fastopt import _interop, _scalars
from fastopt._backends import _formats
from fastopt._check import integer
from fastopt.optim._base import (
    MASTER,
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_betas,
    check_bool,
    check_real,
    compute_dtype,
    ensure_state,
    load_state,
    set_number,
)

_MATH = r"""
    The parameters hold :math:`y`, where the gradients are taken; the state keeps the base
    sequence :math:`z`; the average :math:`x`, the point to evaluate, is
    :math:`y` moved away from :math:`z` (:meth:`eval`). With gradient :math:`g_t` (negated
    if maximize) at step :math:`t` (from 1), warmup :math:`T` and
    :math:`\gamma_t = \gamma \min(t / T, 1)`:

    .. math::

        w_t &= t^r \left(\max_{s \le t} \gamma_s\right)^P, \qquad
            c_t = w_t \Big/ \textstyle\sum_{s \le t} w_s \\
        \hat g_t &= {NORMALIZED} + \lambda y_t \\
        y_{t+1} &= (1 - c_t) y_t + c_t z_t + \gamma_t (\beta (1 - c_t) - 1) \hat g_t \\
        z_{t+1} &= z_t - \gamma_t \hat g_t

    with :math:`\beta` = {BETA}, and :math:`z_1 = y_1`. :meth:`eval` sets the parameters to
    :math:`x = y + (1 - 1/\beta)(z - y)` and :meth:`train` back to
    :math:`y = x + (1 - \beta)(z - x)`, each as torch's ``lerp``; a step must be taken in
    train mode. The mode is each param group's ``train_mode`` key (so state dicts carry
    it). Unlike the reference, which starts in eval mode and refuses a step until
    ``train()`` is called, fastopt starts in train mode (before the first step :math:`x =
    y = z`, so the modes differ only in that check); and where the reference counts steps,
    :math:`\max \gamma` and :math:`\sum w` per param group, fastopt keeps them per
    parameter (the same when every parameter gets a gradient at every step). In
    low-precision parameters, :meth:`eval` and :meth:`train` round to nearest even.
    ``state_dtype="int8"`` quantizes :math:`z`, a copy of the weights, to 8 bits per entry
    of a block's range: keep the state in float32 or bfloat16.
"""

_ARGS = r"""
    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default {LR}.
{RULE}        weight_decay (float): :math:`\lambda \ge 0`, taken at :math:`y`. Default 0.
        warmup_steps (int): :math:`T \ge 0`, linear learning-rate warmup. Default 0.
        r (float): :math:`r`, the polynomial weighting of the average. Default 0.
        weight_lr_power (float): :math:`P`, the learning-rate weighting of the average.
            Default 2.
        maximize (bool): ascend instead of descend. Default False.
"""

_ADAMW_ARGS = r"""        betas (tuple): :math:`(\beta_1, \beta_2)`, :math:`\beta_1` in (0, 1) (the
            interpolation between :math:`z` and :math:`x`), :math:`\beta_2` in [0, 1).
            Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
"""

_SGD_ARGS = r"""        momentum (float): :math:`\beta` in (0, 1), the interpolation between
            :math:`z` and :math:`x`. Default 0.9.
"""


class _ScheduleFree(Optimizer):
    """What both Schedule-Free rules share: the averaging weights, kept per parameter as
    state numbers, and the train/eval swap of the parameters."""

    _group_state = ("train_mode",)

    def _beta(self, group):
        raise NotImplementedError

    def _check_schedule(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        group["warmup_steps"] = integer(f"{where}: warmup_steps", group["warmup_steps"], lo=0)
        check_real(group, "r", where)
        check_real(group, "weight_lr_power", where)
        check_bool(group, "maximize", where)
        check_bool(group, "train_mode", where)

    def _bucket_key(self, group, state):
        return state.get("step", 0), state.get("lr_max"), state.get("weight_sum")

    def _weights(self, group, states):
        """Advance the step count, the largest learning rate and the weight sum; return
        (step, this step's learning rate, its weight in the average)."""
        lr_max, weight_sum = states[0].get("lr_max", -1.0), states[0].get("weight_sum", 0.0)
        step = advance_step(states)
        lr, lr_max, weight_sum, ckp1 = _scalars.schedulefree_weights(
            step, group["lr"], group["warmup_steps"], group["r"], group["weight_lr_power"],
            lr_max, weight_sum)
        set_number(states, "lr_max", lr_max)
        set_number(states, "weight_sum", weight_sum)
        return step, lr, ckp1

    def _step(self, grads, unscale=1.0):
        for i, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(f"{type(self).__name__}: param_groups[{i}] is in eval mode; "
                                   f"call opt.train() before opt.step() (and opt.eval() "
                                   f"before evaluating or saving the model)")
        return super()._step(grads, unscale)

    def train(self):
        """Put the parameters at :math:`y`, where the gradients are taken (a no-op in train
        mode). Returns ``self.params()``."""
        return self._swap(True)

    def eval(self):
        """Put the parameters at the average :math:`x`, the point to evaluate or save (a
        no-op in eval mode). Returns ``self.params()``."""
        return self._swap(False)

    def _swap(self, train):
        with self._lock:
            flat = 0
            for group in self.param_groups:
                if group["train_mode"] != train:
                    beta = self._beta(group)
                    weight = 1 - beta if train else 1 - 1 / beta
                    for j, p in enumerate(group["params"]):
                        state = self.state.get(flat + j)
                        if state and "z" in state:
                            self._lerp_param(group, j, p, flat + j, state, weight)
                    group["train_mode"] = train
                flat += len(group["params"])
            return self.params()

    def _lerp_param(self, group, j, p, i, state, weight):
        """Parameter i <- lerp(parameter, z, weight), as torch's lerp, in the compute dtype."""
        pv = self._import_param(p, i)
        y = state.get(MASTER, pv.array)
        dtype = compute_dtype(y.dtype)
        s = dtype.type
        start = _formats.load(y, _formats.code_of(y.dtype))
        end = load_state(state, "z")
        w = s(weight)
        if abs(w) < 0.5:
            value = start + w * (end - start)
        else:
            value = end - (end - start) * (s(1) - w)
        mutable = pv.framework in _interop.MUTABLE
        if MASTER in state:
            state[MASTER][...] = value
        out = pv.array if mutable else _interop.empty_like(pv.array)
        _formats.store(out, value, _formats.code_of(out.dtype), stochastic=False)
        if not mutable:
            group["params"][j] = _interop.export(out, pv.framework)


class AdamWScheduleFree(_ScheduleFree):
    __doc__ = r"""Schedule-Free AdamW: no learning-rate schedule, an average of the iterates
    instead; Adam's normalization of the gradient.

    Follows the authors' reference (``facebookresearch/schedule_free``, the
    ``schedulefree`` package 1.4.1, ``AdamWScheduleFree``), not
    ``optax.contrib.schedule_free``, which differs by about 1e-4 relative over 200 steps
    and lags the warmup by one step.
""" + _MATH.replace("{NORMALIZED}", r"\frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}, "
                    r"\qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2").replace(
        "{BETA}", r":math:`\beta_1`") + _ARGS.replace("{LR}", "0.0025").replace(
        "{RULE}", _ADAMW_ARGS) + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``lr_max``, ``weight_sum`` (numbers), ``z``,
    ``exp_avg_sq`` (:math:`v`).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> opt = fastopt.AdamWScheduleFree([w], lr=0.1)
        >>> for _ in range(2):
        ...     _ = opt.step([np.array([1.0, -1.0])])
        >>> w.round(4), opt.state[0]["z"].round(4)  # y, and z after two steps
        (array([-0.155,  0.155]), array([-0.2,  0.2]))
        >>> _ = opt.eval(); w.round(4)  # the average x of z_1 = -0.1 and z_2 = -0.2
        array([-0.15,  0.15])
    """

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                        maximize=maximize, train_mode=True)
        super().__init__(params, defaults, **options)

    def _beta(self, group):
        return group["betas"][0]

    def _check_group(self, group, where):
        self._check_schedule(group, where)
        check_betas(group, where)
        if group["betas"][0] == 0:
            raise ValueError(f"{where}: betas[0] must be in (0, 1) (the average divides by "
                             f"it), got 0.0")
        check_real(group, "eps", where, lo=0.0)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        step, lr, ckp1 = self._weights(group, states)
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "z", params, copy=True),
               ensure_state(states, "exp_avg_sq", params), step=step, lr=lr, ckp1=ckp1,
               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)


class SGDScheduleFree(_ScheduleFree):
    __doc__ = r"""Schedule-Free SGD: no learning-rate schedule, an average of the iterates
    instead.

    Follows the authors' reference (``facebookresearch/schedule_free``, the
    ``schedulefree`` package 1.4.1, ``SGDScheduleFree``).
""" + _MATH.replace("{NORMALIZED}", "g_t").replace("{BETA}", "``momentum``") + \
        _ARGS.replace("{LR}", "1.0").replace("{RULE}", _SGD_ARGS) + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``lr_max``, ``weight_sum`` (numbers), ``z``.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> opt = fastopt.SGDScheduleFree([w], lr=0.1)
        >>> for _ in range(2):
        ...     _ = opt.step([np.array([1.0, -1.0])])
        >>> w.round(6)  # y
        array([-0.155,  0.155])
        >>> _ = opt.eval(); w.round(6)  # x, the average of z_1 = -0.1 and z_2 = -0.2
        array([-0.15,  0.15])
        >>> _ = opt.train(); w.round(6)
        array([-0.155,  0.155])
    """

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0,
                 r=0.0, weight_lr_power=2.0, maximize=False, **options):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                        maximize=maximize, train_mode=True)
        super().__init__(params, defaults, **options)

    def _beta(self, group):
        return group["momentum"]

    def _check_group(self, group, where):
        self._check_schedule(group, where)
        check_real(group, "momentum", where, lo=0.0, hi=1.0, lo_open=True, hi_open=True)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        _, lr, ckp1 = self._weights(group, states)
        kernel(params, out, grads, ensure_state(states, "z", params, copy=True), lr=lr,
               ckp1=ckp1, momentum=group["momentum"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)
