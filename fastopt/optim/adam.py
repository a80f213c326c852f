"""Adam and AdamW (torch.optim.Adam / torch.optim.AdamW semantics)."""

from fastopt.optim._base import (
    OPTIONS_DOC,
    Optimizer,
    advance_step,
    cautious_doc,
    check_betas,
    check_bool,
    check_real,
    ensure_state,
)

_MATH = r"""
    With gradient :math:`g_t` of parameter :math:`p_t` at step :math:`t` (from 1):

    .. math::

        g_t &\leftarrow -g_t \text{ if maximize} \\
        DECAY
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
        p_{t+1} &= p_t - \frac{\gamma}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
"""


# what the cautious option masks
_DIRECTION = r"the first moment :math:`m_t`"

class Adam(Optimizer):
    __doc__ = r"""Adam (Kingma & Ba), with optional AMSGrad and L2 weight decay.

    Follows ``torch.optim.Adam`` (its for-loop implementation's operation order).
    """ + _MATH.replace("DECAY", r"g_t &\leftarrow g_t + \lambda p_t \\") + r"""
    Args:
        params: list of arrays or of param-group dicts (NumPy, PyTorch, JAX, TensorFlow, CuPy).
        lr (float): learning rate :math:`\gamma \ge 0`. Default 1e-3.
        betas (tuple): :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps (float): :math:`\epsilon \ge 0`. Default 1e-8.
        weight_decay (float): L2 penalty :math:`\lambda \ge 0`, added to the gradient. Default 0.
        amsgrad (bool): keep the running maximum of :math:`v_t`. Default False.
        maximize (bool): ascend instead of descend. Default False.
        decoupled_weight_decay (bool): decay the parameter as :class:`AdamW` does instead of
            adding :math:`\lambda p_t` to the gradient (torch's option). Default False.
""" + cautious_doc(_DIRECTION) + OPTIONS_DOC + r"""

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), and
    ``max_exp_avg_sq`` with amsgrad.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.zeros(2)
        >>> opt = fastopt.Adam([w], lr=0.1)
        >>> _ = opt.step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([-0.1,  0.1])
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=False, cautious=False,
                 **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious)
        super().__init__(params, defaults, **options)

    def _check_group(self, group, where):
        check_real(group, "lr", where, lo=0.0)
        check_betas(group, where)
        check_real(group, "eps", where, lo=0.0)
        check_real(group, "weight_decay", where, lo=0.0)
        check_bool(group, "amsgrad", where)
        check_bool(group, "maximize", where)
        check_bool(group, "cautious", where)
        if not self._decoupled:
            check_bool(group, "decoupled_weight_decay", where)

    def _state_names(self, group, first):
        return self._state_keys if group["amsgrad"] else self._state_keys[:2]

    def _update(self, kernel, group, params, out, grads, states, n_threads, grad):
        step = advance_step(states)
        beta1, beta2 = group["betas"]
        kernel(params, out, grads, ensure_state(states, "exp_avg", params),
               ensure_state(states, "exp_avg_sq", params),
               ensure_state(states, "max_exp_avg_sq", params) if group["amsgrad"] else None,
               step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"],
               decoupled=self._decoupled or group["decoupled_weight_decay"],
               maximize=group["maximize"], caution=self._caution(group, states, params),
               n_threads=n_threads, **grad)


class AdamW(Adam):
    __doc__ = r"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay.

    Follows ``torch.optim.AdamW``: the parameter is shrunk by :math:`1 - \gamma\lambda`
    before the Adam update instead of adding :math:`\lambda p` to the gradient.
    """ + _MATH.replace("DECAY", r"p_t &\leftarrow p_t (1 - \gamma \lambda) \\") + r"""
    Args:
        Same as :class:`Adam`, except ``weight_decay`` (decoupled :math:`\lambda \ge 0`),
        default 1e-2.

    Example:
        >>> import numpy as np, fastopt
        >>> w = np.ones(2)
        >>> opt = fastopt.AdamW([w], lr=0.1, weight_decay=0.5)
        >>> _ = opt.step([np.array([1.0, -1.0])])
        >>> w.round(6)
        array([0.85, 1.05])
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, cautious=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, cautious=cautious)
        Optimizer.__init__(self, params, defaults, **options)
