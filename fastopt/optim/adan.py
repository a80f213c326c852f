"""Adan (Xie et al. 2022), as the authors' reference."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)


class Adan(Optimizer):
    __doc__ = r"""Adan: adaptive Nesterov momentum, from averages of the gradient, of its
    change since the last step and of the square of their Nesterov combination.

    Follows the authors' reference (``sail-sg/Adan``, ``adan.py`` at commit 2c65bea, its
    single-tensor path); not ``optax.adan`` 0.2.8, which weights the difference term by
    :math:`1 - \beta_2` where the reference uses :math:`\beta_2`. Unlike the reference,
    which counts steps per param group, the step count is each parameter's, as every
    fastopt optimizer's (the same when every parameter gets a gradient at every step); and
    fastopt's ``max_grad_norm`` is torch's ``clip_grad_norm_`` (the reference's option
    divides by the norm plus ``eps`` rather than plus 1e-6). With gradient :math:`g_t`
    (negated if maximize) at step :math:`t` and :math:`g_0 = g_1`:

    .. math::

        d_t &= g_t - g_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        \delta_t &= \beta_2 \delta_{t-1} + (1 - \beta_2) d_t \\
        n_t &= \beta_3 n_{t-1} + (1 - \beta_3) (g_t + \beta_2 d_t)^2 \\
        u_t &= \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\eta_t}
            + \frac{\gamma \beta_2}{1 - \beta_2^t} \frac{\delta_t}{\eta_t}, \qquad
            \eta_t = \sqrt{n_t} / \sqrt{1 - \beta_3^t} + \epsilon \\
        p_{t+1} &= (p_t - u_t) / (1 + \gamma \lambda)
            \quad (\text{no\_prox: } p_t (1 - \gamma \lambda) - u_t)

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2, \beta_3)`, each in [0, 1).
            Default (0.98, 0.92, 0.99).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): decoupled :math:`\lambda \ge 0`. Default 0.
        no_prox (bool): decay the parameter before the step instead of the proximal
            division after it. Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`n`),
    ``exp_avg_diff`` (:math:`\delta`), ``neg_pre_grad`` (:math:`-g_{t-1}`), the
    reference's names.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> _ = fastopt.Adan([w], lr=0.1).step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([-0.1,  0.1])
    """

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 no_prox=False, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        no_prox=no_prox, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where, count=3)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "no_prox", where)
        check_bool(group, "maximize", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        step = advance_step(states)
        beta1, beta2, beta3 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params),
               ensure_state(states, "exp_avg_diff", params),
               ensure_state(states, "neg_pre_grad", params),
               step=step, lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3,
               eps=group["eps"], weight_decay=group["weight_decay"], no_prox=group["no_prox"],
               maximize=group["maximize"], n_threads=n_threads, **grad)
