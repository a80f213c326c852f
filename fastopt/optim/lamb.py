"""Lamb (You et al. 2019), with optax.lamb's semantics."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)

# the update, which fastopt.jax.lamb's docstring shows too
MATH = r"""
    .. math::

        m_t &= (1 - \beta_1) g_t + \beta_1 m_{t-1}, \qquad
        v_t = (1 - \beta_2) g_t^2 + \beta_2 v_{t-1} \\
        u_t &= \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda p_t, \qquad
        r_t = \frac{\|p_t\|}{\|u_t\|} \text{ per tensor (1 if either norm is 0)} \\
        p_{t+1} &= p_t - \gamma \, r_t u_t
"""


class Lamb(Optimizer):
    __doc__ = r"""Lamb (You et al. 2019): Adam's update scaled per tensor by a trust ratio.

    Follows ``optax.lamb`` (torch has no Lamb). With gradient :math:`g_t` (negated if
    maximize) at step t:
""" + MATH + r"""
    Two passes over the data (the trust ratio needs both norms first): the update pass
    writes :math:`u_t` to a scratch buffer per parameter, the norms are one reduction in the
    fixed order every backend shares, and the apply pass scales and adds.

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1]. Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-6.
        weight_decay (float): decoupled :math:`\lambda \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg`` (m; optax's ``mu``), ``exp_avg_sq`` (v, ``nu``).

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.array([3.0, 4.0])
        >>> _ = fastopt.Lamb([w], lr=0.1).step([np.array([1.0, 1.0])])
        >>> w.round(4)  # moved by lr * ||w|| / ||u|| * u = 0.1 * 5 / sqrt(2) * (1, 1)
        array([2.6464, 3.6464])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where, closed=True)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params), self._scratch_like(states, params),
               step=advance_step(states),
               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], maximize=group["maximize"],
               n_threads=n_threads, **grad)
