"""RMSprop (torch.optim.RMSprop's semantics)."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_bool,
    check_real,
    ensure_state,
)


class RMSprop(Optimizer):
    __doc__ = r"""RMSprop (Hinton), following ``torch.optim.RMSprop``.

    With gradient :math:`g_t` (negated if maximize, plus :math:`\lambda p_t`):

    .. math::

        v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1 - \alpha) g_t, \quad
            r_t = \sqrt{v_t - \bar g_t^2} + \epsilon \text{ (centered)}, \quad
            r_t = \sqrt{v_t} + \epsilon \text{ (otherwise)} \\
        b_t &= \mu b_{t-1} + g_t / r_t, \quad p_{t+1} = p_t - \gamma b_t \text{ if } \mu > 0,
            \text{ else } p_{t+1} = p_t - \gamma g_t / r_t

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 1e-2.
        alpha (float): smoothing :math:`\alpha \in [0, 1]`. Default 0.99.
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`. Default 0.
        momentum (float): :math:`\mu \ge 0`. Default 0.
        centered (bool): normalize by the variance estimate. Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``square_avg``, ``grad_avg`` (centered),
    ``momentum_buffer`` (momentum > 0).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> _ = fastopt.RMSprop([w], lr=0.01, alpha=0.75).step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([-0.02,  0.02])
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False, **options):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_real(group, "alpha", where, lo=0.0, hi=1.0)
        for key in ("eps", "weight_decay", "momentum"):
            check_real(group, key, where, lo=0.0)
        check_bool(group, "centered", where)
        check_bool(group, "maximize", where)

    def _state_names(self, group, first):
        return ("square_avg",) + (("grad_avg",) if group["centered"] else ()) + (
            ("momentum_buffer",) if group["momentum"] > 0 else ())

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        advance_step(states)
        kernel(params, out, grads, ensure_state(states, "square_avg", params),
               ensure_state(states, "grad_avg", params) if group["centered"] else None,
               ensure_state(states, "momentum_buffer", params) if group["momentum"] > 0
               else None,
               lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
               weight_decay=group["weight_decay"], momentum=group["momentum"],
               centered=group["centered"], maximize=group["maximize"], n_threads=n_threads,
               **grad)
