"""RAdam (torch.optim.RAdam's semantics)."""

from fastopt.optim._base import OPTIONS_DOC, Optimizer, advance_step, check_adam_group, ensure_state


class RAdam(Optimizer):
    __doc__ = r"""RAdam (Liu et al.: rectified Adam), following ``torch.optim.RAdam``.

    With gradient :math:`g_t` (negated if maximize; plus :math:`\lambda p_t`, or
    :math:`p_t \leftarrow p_t (1 - \gamma\lambda)` with decoupled weight decay), m and v as
    in Adam, :math:`\hat m_t = m_t / (1 - \beta_1^t)`,
    :math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`:

    .. math::

        p_{t+1} = p_t - \gamma \hat m_t \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}
            \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                        {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
        \text{ if } \rho_t > 5, \text{ else } p_{t+1} = p_t - \gamma \hat m_t

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        decoupled_weight_decay (bool): AdamW-style decay. Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(1)
        >>> _ = fastopt.RAdam([w], lr=0.1).step([np.array([1.0])])
        >>> w.round(4)
        array([-0.1])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_adam_group(group, where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params), step=advance_step(states),
               lr=group["lr"],
               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
               decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
               n_threads=n_threads, **grad)
