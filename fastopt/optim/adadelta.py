"""Adadelta (torch.optim.Adadelta's semantics)."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_bool,
    check_real,
    ensure_state,
)


class Adadelta(Optimizer):
    __doc__ = r"""Adadelta (Zeiler), following ``torch.optim.Adadelta``.

    With gradient :math:`g_t` (negated if maximize, plus :math:`\lambda p_t`):

    .. math::

        v_t &= \rho v_{t-1} + (1 - \rho) g_t^2, \qquad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t \\
        u_t &= \rho u_{t-1} + (1 - \rho) \Delta_t^2, \qquad p_{t+1} = p_t - \gamma \Delta_t

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 1.0.
        rho (float): :math:`\rho \in [0, 1]`. Default 0.9.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-6.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``square_avg`` (v), ``acc_delta`` (u).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(1)
        >>> _ = fastopt.Adadelta([w], eps=1e-2).step([np.array([1.0])])
        >>> w.round(4)
        array([-0.3015])
    """

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False,
                 **options):
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_real(group, "rho", where, lo=0.0, hi=1.0)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        advance_step(states)
        kernel(params, out, grads, ensure_state(states, "square_avg", params),
               ensure_state(states, "acc_delta", params), lr=group["lr"], rho=group["rho"],
               eps=group["eps"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)
