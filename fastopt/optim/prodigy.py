"""Prodigy (Mishchenko & Defazio 2023), as the authors' prodigyopt."""

import math

from fastopt._check import integer, number
from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)

# the estimate of d and what it is made of, kept in every param group as the reference
# keeps them (the same in each): the step's numbers, not hyperparameters
ESTIMATE = ("d", "d_max", "d_numerator", "d_hat", "d_denom", "k")


class Prodigy(Optimizer):
    __doc__ = r"""Prodigy: Adam whose step size :math:`d` is estimated on the fly from how far
    the parameters moved from their start, so that ``lr`` stays 1.

    Follows the authors' reference (``konstmish/prodigy``, the ``prodigyopt`` package
    1.1.2, with ``slice_p=1``). With gradient :math:`g_t` (negated if maximize; plus
    :math:`\lambda p` when not ``decouple``), :math:`\beta_3` defaulting to
    :math:`\sqrt{\beta_2}`, the learning rate :math:`\gamma` and
    :math:`\eta_t = d_t \gamma b_t` (:math:`b_t = \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)`
    with ``use_bias_correction``, else 1):

    .. math::

        m_t &= \beta_1 m_{t-1} + d_t (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + d_t^2 (1 - \beta_2) g_t^2 \\
        s_t &= \beta_3 s_{t-1} + \tfrac{d_t}{d_0} \eta_t g_t
            \quad (\text{safeguard\_warmup: } \tfrac{d_t}{d_0} d_t g_t) \\
        r_t &= \beta_3 r_{t-1} + \tfrac{d_t}{d_0} \eta_t \langle g_t, p_0 - p_t \rangle,
        \qquad \hat d_t = c\, r_t / \lVert s_t \rVert_1 \\
        d_{t+1} &= \min(\max_{\tau \le t} \hat d_\tau, \; d_t \cdot \text{growth\_rate})
            \quad (\text{at first } \max(d_t, \hat d_t) \text{ while } d_t = d_0) \\
        p_{t+1} &= p_t - \eta_t \lambda p_t - \eta_t \frac{m_t}{\sqrt{v_t} + d_{t+1} \epsilon}

    The sums run over every parameter of every group, in a fixed order (the clipping norm's),
    so every backend gets the same :math:`d`; :math:`d`, its maximum and the numerator are
    kept in each param group as ``d``, ``d_max``, ``d_numerator`` (with ``d_hat``,
    ``d_denom`` and the step count ``k``, as the reference), so that
    ``opt.param_groups[0]["d"]`` reads the estimate. Hyperparameters that shape :math:`d`
    (betas, ``beta3``, ``d_coef``, ``growth_rate``, ``use_bias_correction``,
    ``decouple``) are read from the first group, as the reference reads them; groups may
    only differ in ``lr`` by being 0 (frozen). A step whose :math:`\lVert s \rVert_1` is 0
    (every gradient 0) changes no parameter, as the reference.

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`, a multiplier of the estimate. Default 1.0.
        betas (tuple): :math:`(\beta_1, \beta_2)` in [0, 1). Default (0.9, 0.999).
        beta3 (float or None): :math:`\beta_3` in [0, 1); None for :math:`\sqrt{\beta_2}`.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        decouple (bool): AdamW's decoupled decay (else added to the gradient). Default True.
        use_bias_correction (bool): Adam's bias correction in :math:`\eta_t`. Default False.
        safeguard_warmup (bool): leave :math:`\gamma b_t` out of :math:`s`. Default False.
        d0 (float): :math:`d_0 > 0`, the initial estimate. Default 1e-6.
        d_coef (float): :math:`c > 0`. Default 1.0.
        growth_rate (float): the largest factor :math:`d` grows by per step, > 0.
            Default inf.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``s``, ``p0`` (the parameter at its first step),
    ``exp_avg`` (:math:`m`; none when :math:`\beta_1 = 0`), ``exp_avg_sq`` (:math:`v`).
    ``state_dtype="int8"`` quantizes ``p0`` too, and :math:`p_0 - p` is then mostly
    quantization error early on: keep Prodigy's state in float32 or bfloat16.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(3)
        >>> opt = fastopt.Prodigy([w])
        >>> for _ in range(30):
        ...     _ = opt.step([w - np.array([1.0, -2.0, 3.0])])
        >>> opt.param_groups[0]["d"] > 1e-3  # grown from d0 = 1e-6
        True
    """

    _group_state = ESTIMATE

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8,
                 weight_decay=0.0, decouple=True, use_bias_correction=False,
                 safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
                 maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
                        decouple=decouple, use_bias_correction=use_bias_correction,
                        safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
                        growth_rate=growth_rate, maximize=maximize, d=d0, d_max=d0,
                        d_numerator=0.0, d_hat=0.0, d_denom=0.0, k=0)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where)
        if group["beta3"] is not None:
            check_real(group, "beta3", where, lo=0.0, hi=1.0, hi_open=True)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        for key in ("decouple", "use_bias_correction", "safeguard_warmup", "maximize"):
            check_bool(group, key, where)
        check_real(group, "d0", where, lo=0.0, lo_open=True)
        check_real(group, "d_coef", where, lo=0.0, lo_open=True)
        if group["growth_rate"] != math.inf:
            check_real(group, "growth_rate", where, lo=0.0, lo_open=True)
        # the estimate: the step's own numbers, which may overflow as the reference's do
        for key in ESTIMATE[:-1]:
            group[key] = number(f"{where}: {key}", group[key])
        group["k"] = integer(f"{where}: k", group["k"], lo=0)

    def _momentum(self):
        """Whether the rule keeps a first moment: from the first group's beta1, as the
        reference decides it once for every group."""
        return self.param_groups[0]["betas"][0] > 0

    def _state_names(self, group, first):
        return self._state_keys if first["betas"][0] > 0 else ("s", "p0", "exp_avg_sq")

    def _step(self, grads, unscale=1.0):
        lr = max(group["lr"] for group in self.param_groups)
        for i, group in enumerate(self.param_groups):
            if group["lr"] not in (lr, 0.0):
                raise ValueError(f"param_groups[{i}]: lr {group['lr']!r} differs from the "
                                 f"largest, {lr!r}; Prodigy's param groups share one step "
                                 f"size, so each group's lr must be it or 0")
        return super()._step(grads, unscale)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        advance_step(states)
        m = ensure_state(states, "exp_avg", params) if self._momentum() else None
        kernel(params, out, grads, ensure_state(states, "s", params),
               ensure_state(states, "p0", params, copy=True), m,
               ensure_state(states, "exp_avg_sq", params), self._scratch_like(states, params),
               eps=group["eps"], weight_decay=group["weight_decay"], d0=group["d0"],
               safeguard_warmup=group["safeguard_warmup"], maximize=group["maximize"],
               n_threads=n_threads, **grad)

    def _run_staged(self, staged):
        """The update pass of every bucket, the new estimate from their sums (in bucket
        order, each tensor's in turn), then the apply pass of every bucket."""
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k, d, d_max = first["k"], first["d"], first["d_max"]
        lr = max(group["lr"] for group in self.param_groups)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1))
                           if first["use_bias_correction"] else 1.0)
        dlr = d * lr * bias_correction
        shared = dict(d=d, dlr=dlr, beta1=beta1, beta2=beta2, beta3=beta3,
                      decouple=first["decouple"])
        numerator, delta, denominator = first["d_numerator"] * beta3, 0.0, 0.0
        try:
            for call, (_, _, group, _) in staged:
                if group["lr"] > 0:
                    dots, sums = call(phase="update", d_next=d, **shared)
                    for dot, total in zip(dots, sums):
                        delta += (d / group["d0"]) * dlr * dot
                        denominator += total
        except BaseException:
            self._undo(staged)
            raise
        if denominator == 0:  # no progress: the reference changes no parameter, nor d, nor
            for _, (bucket, states, _, out) in staged:  # its step counts
                for (_, _, pv, *_), state, o in zip(bucket, states, out):
                    if o is not pv.array:  # a new array for an immutable framework
                        o[...] = pv.array
                    dict.__setitem__(state, "step", state["step"] - 1)
            return
        numerator += delta
        d_hat = d
        if lr > 0:
            d_hat = first["d_coef"] * numerator / denominator
            # the reference compares with the d0 of its loop's last group
            if d == self.param_groups[-1]["d0"]:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * first["growth_rate"])
        for call, _ in staged:
            call(phase="apply", d_next=d, **shared)
        for group in self.param_groups:
            group.update(d=d, d_max=d_max, d_numerator=numerator, d_hat=d_hat,
                         d_denom=denominator, k=k + 1)
