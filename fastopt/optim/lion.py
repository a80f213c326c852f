"""Lion (Chen et al. 2023), with optax.lion's semantics."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    cautious_doc,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)

# what the cautious option masks
_DIRECTION = r"the sign :math:`\operatorname{sign}((1 - \beta_1) g_t + \beta_1 m_{t-1})`"

class Lion(Optimizer):
    __doc__ = r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    Follows ``optax.lion`` (torch has no Lion). With gradient :math:`g_t` (negated if
    maximize):

    .. math::

        u_t &= \operatorname{sign}((1 - \beta_1) g_t + \beta_1 m_{t-1}) + \lambda p_t \\
        m_t &= (1 - \beta_2) g_t + \beta_2 m_{t-1} \\
        p_{t+1} &= p_t - \gamma u_t

    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): :math:`\gamma \ge 0`. Default 1e-4 (Lion wants 3-10x smaller than AdamW).
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1]. Default (0.9, 0.99).
        weight_decay (float): decoupled :math:`\lambda \ge 0`. Default 0.
        maximize (bool): ascend instead of descend. Default False.
""" + cautious_doc(_DIRECTION) + OPTIONS_DOC + r"""

    State per parameter: ``exp_avg`` (m; optax calls it ``mu``). Lion keeps no step count.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(3)
        >>> _ = fastopt.Lion([w], lr=0.1).step([np.array([2.0, -0.5, 0.0])])
        >>> w
        array([-0.1,  0.1,  0. ])
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False,
                 cautious=False, **options):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        cautious=cautious)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where, closed=True)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "maximize", where)
        check_bool(group, "cautious", where)

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params), lr=group["lr"],
               beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
               maximize=group["maximize"], caution=self._caution(group, states, params),
               n_threads=n_threads, **grad)
