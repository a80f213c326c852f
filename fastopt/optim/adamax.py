"""Adamax (torch.optim.Adamax's semantics)."""

from fastopt.optim._base import OPTIONS_DOC, Optimizer, advance_step, check_adam_group, ensure_state


class Adamax(Optimizer):
    __doc__ = r"""Adamax (Kingma & Ba: Adam with the infinity norm), following
    ``torch.optim.Adamax``.

    With gradient :math:`g_t` (negated if maximize, plus :math:`\lambda p_t`) at step t:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \qquad
        p_{t+1} = p_t - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{u_t}

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 2e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_inf`` (u).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> _ = fastopt.Adamax([w], lr=0.1).step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([-0.1,  0.1])
    """

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_adam_group(group, where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_inf", params), step=advance_step(states), lr=group["lr"],
               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
               maximize=group["maximize"], n_threads=n_threads, **grad)
