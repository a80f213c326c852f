"""NAdam (torch.optim.NAdam's semantics)."""

from fastopt import _scalars
from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    check_adam_group,
    check_real,
    ensure_state,
    set_number,
)


class NAdam(Optimizer):
    __doc__ = r"""NAdam (Dozat: Adam with Nesterov momentum), following ``torch.optim.NAdam``.

    With gradient :math:`g_t` (negated if maximize; plus :math:`\lambda p_t`, or
    :math:`p_t \leftarrow p_t (1 - \gamma\lambda)` with decoupled weight decay) at step t,
    :math:`\mu_t = \beta_1 (1 - \frac12 0.96^{t\psi})`:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
        p_{t+1} &= p_t - \gamma \frac{1 - \mu_t}{1 - \prod_{i \le t} \mu_i} \frac{g_t}{d_t}
            - \gamma \frac{\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i} \frac{m_t}{d_t}

    As in torch, the running product of :math:`\mu` is kept in float32.

    Args:
        params: list of arrays or of param-group dicts.
        lr (float): :math:`\gamma \ge 0`. Default 2e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): :math:`\lambda \ge 0`. Default 0.
        momentum_decay (float): :math:`\psi \ge 0`. Default 4e-3.
        decoupled_weight_decay (bool): AdamW-style decay (NAdamW). Default False.
        maximize (bool): ascend instead of descend. Default False.
""" + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(1)
        >>> _ = fastopt.NAdam([w], lr=0.1).step([np.array([1.0])])
        >>> w.round(4)  # torch.optim.NAdam gives the same
        array([-0.1056])
    """

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_adam_group(group, where)
        check_real(group, "momentum_decay", where, lo=0.0)

    def _bucket_key(self, group, state):
        return state.get("step", 0), state.get("mu_product", 1.0)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        step = advance_step(states)
        _, _, mu_product = _scalars.nadam_coefficients(
            step, states[0].get("mu_product", 1.0), beta1=beta1,
            momentum_decay=group["momentum_decay"])
        set_number(states, "mu_product", mu_product)
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params), step=step, mu_product=mu_product,
               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], momentum_decay=group["momentum_decay"],
               decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
               n_threads=n_threads, **grad)
