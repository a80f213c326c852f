"""ASGD (torch.optim.ASGD semantics, its single-tensor path)."""

import numpy as np

from fastopt import _scalars
from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_bool,
    check_real,
    ensure_state,
    set_number,
)


class ASGD(Optimizer):
    __doc__ = r"""Averaged SGD (Polyak & Juditsky 1992): SGD with a decaying step size, and
    a running average of the parameters kept beside them.

    Follows ``torch.optim.ASGD``'s single-tensor implementation, torch's CPU default (its
    foreach implementation computes differently: after 50 steps they differ in most
    elements). As torch, the step's :math:`\eta_t` and :math:`\mu_t` are per-parameter state
    kept in float32. With gradient :math:`g_t` (negated if maximize), at step :math:`t`:

    .. math::

        g_t &\leftarrow g_t + \lambda_{wd} p_t \\
        p_{t+1} &= p_t (1 - \lambda \eta_t) - \eta_t g_t \\
        a_{t+1} &= a_t + (p_{t+1} - a_t) \mu_t \quad (a_{t+1} = p_{t+1} \text{ while }
            \mu_t = 1) \\
        \eta_{t+1} &= \frac{\gamma}{(1 + \lambda \gamma t)^\alpha}, \qquad
        \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

    with :math:`\eta_1 = \gamma`, :math:`\mu_1 = 1`.

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-2.
        lambd (float): decay term :math:`\lambda \ge 0`. Default 1e-4.
        alpha (float): power :math:`\alpha` of the step-size decay. Default 0.75.
        t0 (float): the step :math:`t_0` after which averaging starts. Default 1e6.
        weight_decay (float): L2 penalty :math:`\lambda_{wd} \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``eta``, ``mu`` (numbers) and ``ax`` (the average
    :math:`a`).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.ones(2)
        >>> opt = fastopt.ASGD([w], lr=0.1, lambd=0.0)
        >>> _ = opt.step([np.array([1.0, -1.0])])
        >>> w, opt.state[0]["ax"]
        (array([0.9, 1.1]), array([0.9, 1.1]))
    """

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                 maximize=False, **options):
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_real(group, "lambd", where, lo=0.0)
        check_real(group, "alpha", where)
        check_real(group, "t0", where)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)

    def _bucket_key(self, group, state):
        # parameters that skipped different steps may share a step count, not eta and mu
        return state.get("step", 0), state.get("eta"), state.get("mu")

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        lr = group["lr"]
        # this step's eta and mu: the state's, or at the first step torch's initial values
        eta = states[0].get("eta", float(np.float32(lr)))
        mu = states[0].get("mu", 1.0)
        step = advance_step(states)
        kernel(params, out, grads, ensure_state(states, "ax", params), eta=eta, mu=mu,
               lambd=group["lambd"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)
        eta, mu = _scalars.asgd_next(lr, group["lambd"], group["alpha"], group["t0"], step)
        set_number(states, "eta", eta)
        set_number(states, "mu", mu)
